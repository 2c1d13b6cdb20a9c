"""The PyTorch backend: safe loading, ONNX export, onnxruntime measurement, and the training,
evaluation and counting helpers every PyTorch technique shares.

Deploy format: FP32 (or quantized) ONNX, opset 18, dynamic batch dimension, one `logits` output,
run by onnxruntime's CPU execution provider. Native format: a torch.export `.pt2` archive.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from optimization.base import (
    InvalidInputError,
    LoadedModel,
    ProgressFn,
    UnsafeModelError,
)
from optimization.atomic import atomic_output
from optimization.backends.pytorch_graph import prepare_exported_module
from optimization.evaluator import steady_latency_ms
from optimization.safety.pickle_scan import check_torch_archive
from optimization.zoo import pytorch as zoo

ONNX_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
# A .pt2 written by EdgeOpt records the zoo architecture it was built from, so loading it back
# gives an eager nn.Module (prunable, trainable) instead of a flat exported graph.
ARCHITECTURE_EXTRA_FILE = "edgeopt_architecture.json"
PREDICT_BATCH = 256
# The batch sizes a model takes unless its export says otherwise (torch.export's Dim range).
DEFAULT_BATCH_RANGE = (1, 4096)
BATCH_RANGE_KEY = "edgeopt_batch_range"

# loss_fn(logits, targets, inputs) -> scalar loss; inputs let distillation ask its teacher.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


class PyTorchBackend:
    framework = "pytorch"
    deploy_suffix = ".onnx"
    native_suffix = ".pt2"

    def load(self, path: Path, input_shape: tuple | None = None,
             architecture: str | None = None, num_classes: int | None = None) -> LoadedModel:
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".onnx":
            return _load_onnx(path, input_shape, num_classes)
        if suffix == ".zip":
            return _load_onnx_archive(path, input_shape, num_classes)
        if suffix not in (".pt2", ".pt", ".pth"):
            raise InvalidInputError(f"{path.name}: upload a .pt2, .pt, .pth or .onnx PyTorch model, or a .zip "
                                    "of an .onnx with its external data")
        check_torch_archive(path)  # before any torch loader: torch.export.load / jit.load unpickle freely
        if suffix == ".pt2":
            return _load_exported(path, num_classes)
        if suffix == ".pt":
            return _load_torchscript(path, input_shape, num_classes)
        return _load_state_dict(path, input_shape, architecture, num_classes)

    def export_deploy(self, model: LoadedModel, path: Path) -> Path:
        path = Path(path)
        if model.source_format == "onnx":
            return write_onnx_upload(model.source_path, path)
        return export_onnx(model.module, model.input_shape, path)

    def save_native(self, model: LoadedModel, path: Path) -> Path:
        if model.source_format == "onnx" and not model.trainable:
            raise InvalidInputError("this ONNX upload has no PyTorch form to save; only its .onnx is kept")
        return save_pt2(model.module, model.input_shape, Path(path), model.architecture, model.num_classes)

    def predict(self, deploy_path: Path, x) -> np.ndarray:
        """Logits for a batch in the model's layout, in chunks of PREDICT_BATCH (or, for a model
        exported with a fixed batch, chunks of that size, the last padded with zeros)."""
        session = ort_session(deploy_path)
        x = np.asarray(x, dtype=np.float32)
        batch_dim = session.get_inputs()[0].shape[0]
        fixed = isinstance(batch_dim, int) and batch_dim > 0
        step = batch_dim if fixed else PREDICT_BATCH
        input_name = session.get_inputs()[0].name
        chunks = [x[i:i + step] for i in range(0, len(x), step)]
        return np.concatenate([
            session.run(None, {input_name: pad_batch(chunk, step) if fixed else chunk})[0][:len(chunk)]
            for chunk in chunks
        ])

    def latency_invoker(self, deploy_path: Path, sample) -> Callable[[], object]:
        """One batch-1 inference in onnxruntime (CPU EP, intra_op_num_threads=1 so numbers
        compare across models on a shared machine), ready to be timed by the evaluator."""
        session = ort_session(deploy_path, threads=1)
        sample = np.asarray(sample, dtype=np.float32)
        if sample.ndim == len(session.get_inputs()[0].shape) - 1:
            sample = sample[None]
        feed = {session.get_inputs()[0].name: sample[:1]}
        return lambda: session.run(None, feed)

    def latency_ms(self, deploy_path: Path, sample) -> float:
        return steady_latency_ms(self.latency_invoker(deploy_path, sample))

    def train_demo_model(self, dataset, path: Path) -> Path:
        return train_demo_model(dataset, path)


BACKEND = PyTorchBackend()


# --------------------------------------------------------------------------- loading

def _load_onnx(path: Path, input_shape: tuple | None, num_classes: int | None) -> LoadedModel:
    """An ONNX upload: its own file is the FP32 deploy model, and where onnx2torch converts it
    to a module giving onnxruntime's outputs, that module is what the training techniques train
    (else they are skipped, with the reason in `preparation`)."""
    from optimization.backends.onnx_to_torch import convert

    session = ort_session(path)
    declared = session.get_inputs()[0].shape[1:]
    shape = tuple(input_shape) if input_shape else tuple(declared)
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise InvalidInputError(f"{path.name} has a symbolic input shape {declared}; give input_shape")
    outputs = session.get_outputs()[0].shape
    classes = num_classes or (outputs[-1] if isinstance(outputs[-1], int) else None)
    module, conversion = convert(path, shape)
    if module is not None:
        try:  # the trained models are exported again: a module torch.export cannot trace is no use
            export_program(module, shape)
        except Exception as error:
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            module, conversion = None, {"converted": False, "reason": f"onnx2torch's module cannot be "
                                                                      f"re-exported by torch.export: {first_line}"}
    preparation = {"pytorch_form": conversion}
    if module is None:
        preparation["training"] = f"not possible: {conversion['reason']}"
    return LoadedModel("pytorch", module if module is not None else str(path), shape, classes, path, "onnx",
                       trainable=module is not None, preparation=preparation,
                       not_trainable_reason="" if module is not None else
                       f"this ONNX file has no trainable PyTorch form ({conversion['reason']})")


def _load_onnx_archive(path: Path, input_shape: tuple | None, num_classes: int | None) -> LoadedModel:
    """A zip of an ONNX file and its external data (torch.onnx.export's default writes
    model.onnx.data beside model.onnx): extracted with the safe extractor into a temporary
    folder that lives as long as the loaded model, the external-data locations checked again
    to name files of that folder, then loaded as an .onnx upload."""
    from optimization.safety.archives import safe_extract_zip
    from optimization.safety.onnx_check import check_onnx_file, onnx_archive_layout

    folder = Path(tempfile.mkdtemp(prefix="edgeopt-onnx-"))
    try:
        written = safe_extract_zip(path, folder)
        model_name, beside = onnx_archive_layout([p.relative_to(folder).as_posix() for p in written], path.name)
        check_onnx_file(folder / model_name, path.name, beside)
        model = _load_onnx(folder / model_name, input_shape, num_classes)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(model, shutil.rmtree, folder, True)
    return model


def write_onnx_upload(source: Path, path: Path) -> Path:
    """The deploy copy of an ONNX upload: the same graph with its initializers as weights only.
    An export made with keep_initializers_as_inputs=True also lists every weight as a graph
    input, which a quantizer then leaves as an input the caller must feed."""
    import onnx

    model = onnx.load(str(source))
    weights = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in weights]
    if len(inputs) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(inputs)
    with atomic_output(path) as partial:
        onnx.save(model, str(partial))
    return path


def _load_exported(path: Path, num_classes: int | None) -> LoadedModel:
    extra_files = {ARCHITECTURE_EXTRA_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra_files)
    placeholder = [node for node in program.graph.nodes if node.op == "placeholder"
                   and node.name in program.graph_signature.user_inputs]
    if len(placeholder) != 1:
        raise InvalidInputError(f"{path.name} takes {len(placeholder)} inputs; EdgeOpt handles one image tensor")
    input_shape = tuple(int(d) for d in placeholder[0].meta["val"].shape[1:])
    spec = _recorded_architecture(extra_files[ARCHITECTURE_EXTRA_FILE], program, input_shape[0])
    if spec:
        module = zoo.build(spec["name"], spec["num_classes"], input_shape[0], **spec["kwargs"])
        module.load_state_dict(program.state_dict)
        return LoadedModel("pytorch", module, input_shape, spec["num_classes"], path, "pt2", spec["name"])
    module, preparation = _prepare_graph(program.module(), input_shape, _exported_batch_range(program, placeholder[0]))
    classes = num_classes or _output_classes(module, input_shape)
    return LoadedModel("pytorch", module, input_shape, classes, path, "pt2", preparation=preparation)


def _exported_batch_range(program, placeholder) -> tuple[int, int] | None:
    """The batch sizes a torch.export program accepts: the range torch recorded for a dynamic
    batch dimension (a `Dim("batch", min=..., max=...)`; torch raises a min of 1 to 2), or None
    for a batch fixed at export."""
    batch = placeholder.meta["val"].shape[0]
    if isinstance(batch, int):
        return None
    limits = program.range_constraints.get(batch.node.expr)
    lower = int(limits.lower) if limits is not None and limits.lower.is_Integer else DEFAULT_BATCH_RANGE[0]
    upper = int(limits.upper) if limits is not None and limits.upper.is_Integer else DEFAULT_BATCH_RANGE[1]
    return max(lower, 1), upper


def _prepare_graph(module, input_shape: tuple, exported_range: tuple[int, int] | None = None):
    """Module-ise an exported graph and, if it was exported for a fixed batch, generalise it to
    any batch; where that fails, mark the batch it only runs (see pytorch_graph). A graph
    exported with a dynamic batch keeps the range it was exported for: its shape check stays in
    the graph, and every step picks its batch sizes within that range."""
    placeholder = next(node for node in module.graph.nodes if node.op == "placeholder")
    batch = placeholder.meta["val"].shape[0]
    module, fixed, preparation = prepare_exported_module(module, batch if isinstance(batch, int) else None,
                                                         input_shape)
    mark_fixed_batch(module, fixed)
    if exported_range:
        mark_batch_range(module, exported_range)
        preparation["batch"] = (f"dynamic in the export, batches {exported_range[0]} to {exported_range[1]}: "
                                f"training, calibration and evaluation use batch sizes in that range")
    set_eval(module)
    return module, preparation


def _recorded_architecture(recorded: str, program, in_channels: int) -> dict | None:
    """The zoo architecture an EdgeOpt .pt2 names, if its weights really fit it. The record is
    user-supplied data: the candidate is built on the meta device first, so absurd arguments
    cost no memory, and any mismatch falls back to the exported graph."""
    if not recorded:
        return None
    try:
        spec = json.loads(recorded)
        spec = {"name": str(spec["name"]), "num_classes": int(spec["num_classes"]),
                "kwargs": dict(spec.get("kwargs") or {})}
        with torch.device("meta"):
            candidate = zoo.build(spec["name"], spec["num_classes"], in_channels, **spec["kwargs"])
    except Exception:  # malformed record or unknown architecture: use the graph as exported
        return None
    expected = {k: tuple(v.shape) for k, v in candidate.state_dict().items()}
    return spec if expected == {k: tuple(v.shape) for k, v in program.state_dict.items()} else None


def _load_torchscript(path: Path, input_shape: tuple | None, num_classes: int | None) -> LoadedModel:
    if not input_shape:
        raise InvalidInputError(
            f"{path.name} is TorchScript, which does not record its input shape: give input_shape "
            "(one sample, e.g. [1, 8, 8] for NCHW)"
        )
    from torch._export.converter import TS2EPConverter  # TorchScript -> ExportedProgram

    scripted = torch.jit.load(str(path), map_location="cpu").eval()
    example = torch.zeros(2, *input_shape)
    try:
        converted = TS2EPConverter(scripted, (example,)).convert().module()
    except Exception as error:  # e.g. a loop or a data-dependent branch: torch.export has no graph for it
        return _load_torchscript_as_onnx(path, scripted, example, num_classes, _first_line(error))
    _restore_parameters(converted, {name for name, _ in scripted.named_parameters()})
    module, preparation = _prepare_graph(converted, tuple(input_shape))
    classes = num_classes or _output_classes(module, tuple(input_shape))
    return LoadedModel("pytorch", module, tuple(input_shape), classes, path, "pt", preparation=preparation)


def _load_torchscript_as_onnx(path: Path, scripted, example: torch.Tensor, num_classes: int | None,
                              reason: str) -> LoadedModel:
    """TorchScript that torch.export cannot convert (a `for`/`while` loop, a branch on a tensor's
    value) still exports to ONNX through the TorchScript exporter, which keeps its control flow
    as ONNX Loop/If: that file is then loaded as an ONNX upload (post-training techniques; the
    training ones where onnx2torch gives a trainable module, else skipped with this reason).
    The file lives in a temporary folder as long as the loaded model."""
    folder = Path(tempfile.mkdtemp(prefix="edgeopt-torchscript-"))
    onnx_path = folder / f"{path.stem}.onnx"
    try:
        try:
            torch.onnx.export(scripted, (example,), str(onnx_path), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        except Exception as error:
            raise InvalidInputError(
                f"{path.name}: this TorchScript cannot be converted for optimization (torch.export: {reason}; "
                f"ONNX export: {_first_line(error)}). Save the model with torch.export (.pt2) or "
                "torch.jit.trace instead of torch.jit.script") from None
        model = _load_onnx(onnx_path, tuple(example.shape[1:]), num_classes)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(model, shutil.rmtree, folder, True)
    cannot = (f"torch.export cannot convert this TorchScript ({reason}); it has no graph for a loop or a branch "
              "on a tensor's value")
    model.preparation["torchscript"] = f"{cannot}; its ONNX export (torch's TorchScript exporter) is the model optimized"
    if not model.trainable:
        model.not_trainable_reason = (f"{cannot} and its ONNX export "
                                      f"has no trainable PyTorch form ({model.preparation['pytorch_form']['reason']}); "
                                      "a torch.export .pt2 or a torch.jit.trace .pt can be trained")
    return model


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _restore_parameters(module: nn.Module, parameter_names: set[str]) -> None:
    """The TorchScript -> torch.export converter turns a parameter that no conv/linear op owns
    (ConvNeXt's layer scale `gamma`, read by a plain multiply) into a buffer: fine-tuning would
    not train it and Torch-Pruning would not narrow it with its channels (a pruned ConvNeXt then
    fails with 'size of tensor a (20) must match ... (40)'). Make the buffers the TorchScript file
    held as parameters parameters again, under the same name."""
    for name in [name for name, _ in module.named_buffers() if name in parameter_names]:
        owner_path, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_path)
        value = owner._buffers.pop(attribute)
        owner._non_persistent_buffers_set.discard(attribute)
        owner.register_parameter(attribute, nn.Parameter(value.detach().clone()))


def _load_state_dict(path: Path, input_shape: tuple | None, architecture: str | None,
                     num_classes: int | None) -> LoadedModel:
    if not architecture:
        raise InvalidInputError(
            f"{path.name} is a state_dict: name its architecture ({', '.join(sorted(zoo.ARCHITECTURES))})"
        )
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # weights_only refuses anything but tensors and containers
        raise UnsafeModelError(
            f"{path.name} is not a plain state_dict (a pickled whole model runs code to load: {error}). "
            "Export the model with torch.export (.pt2) or TorchScript (.pt), or save model.state_dict() "
            "and upload it with an architecture name."
        ) from None
    if not isinstance(state, dict) or "classifier.weight" not in state:
        raise InvalidInputError(f"{path.name} is not a state_dict of the {architecture!r} architecture")
    classes = num_classes or int(state["classifier.weight"].shape[0])
    in_channels = int(next(v for k, v in state.items() if k.endswith("weight") and v.ndim == 4).shape[1])
    module = zoo.build(architecture, classes, in_channels)
    try:
        module.load_state_dict(state)
    except RuntimeError as error:
        raise InvalidInputError(f"{path.name} does not match the {architecture!r} architecture: {error}") from None
    shape = tuple(input_shape) if input_shape else _default_input_shape(architecture, in_channels)
    return LoadedModel("pytorch", module, shape, classes, path, "pth", architecture)


def _default_input_shape(architecture: str, in_channels: int) -> tuple[int, ...]:
    side = 8 if architecture == "digits_cnn" else 32
    return (in_channels, side, side)


def _output_classes(module, input_shape: tuple) -> int:
    with torch.no_grad():
        return int(module(_example(input_shape, module)).shape[-1])


def batch_range(module) -> tuple[int, int]:
    """The batch sizes `module` accepts, (min, max): the range a dynamic export declared, one
    size for a fixed-batch export that could not be generalised, else DEFAULT_BATCH_RANGE."""
    meta = getattr(module, "meta", None)
    return meta.get(BATCH_RANGE_KEY, DEFAULT_BATCH_RANGE) if isinstance(meta, dict) else DEFAULT_BATCH_RANGE


def mark_batch_range(module, limits: tuple[int, int] | None):
    """Record on `module` (e.g. a re-traced copy) the batch sizes it accepts. Only graph modules
    have limits; the record goes in their `meta`, which copy.deepcopy keeps (other attributes
    it drops)."""
    if limits and tuple(limits) != DEFAULT_BATCH_RANGE:
        module.meta[BATCH_RANGE_KEY] = (int(limits[0]), int(limits[1]))
    return module


def batch_size_within(module, wanted: int) -> int:
    """`wanted`, moved into the batch range `module` accepts."""
    lower, upper = batch_range(module)
    return min(max(wanted, lower), upper)


def fixed_batch(module) -> int | None:
    """The only batch size a model exported with a static batch dimension that could not be
    generalised accepts (else None)."""
    lower, upper = batch_range(module)
    return lower if lower == upper else None


def mark_fixed_batch(module, batch: int | None):
    """Record on `module` (e.g. a re-traced copy) that it only runs batches of `batch`."""
    return mark_batch_range(module, (batch, batch) if batch else None)


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """`x` padded with zero samples to `size` rows, for a model that only takes that batch."""
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)]) if len(x) < size else x


# --------------------------------------------------------------------------- saving and export

def _example(input_shape: tuple, module=None) -> torch.Tensor:
    # batch 2, not 1: torch.export specialises a dimension whose example size is 1
    return torch.zeros(batch_size_within(module, 2), *input_shape)


def export_program(module, input_shape: tuple) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension over the batch sizes the model accepts,
    unless it only takes a fixed batch. Made once per module and state of its weights (see
    _exports): the baseline, the post-training techniques and their .pt2 share it."""
    set_eval(module)
    cached = _exports(module, input_shape)
    if "program" not in cached:
        lower, upper = batch_range(module)
        dynamic = None if lower == upper else ({0: torch.export.Dim("batch", min=lower, max=upper)},)
        cached["program"] = torch.export.export(module, (_example(input_shape, module),), dynamic_shapes=dynamic)
    return cached["program"]


def export_onnx(module, input_shape: tuple, path: Path) -> Path:
    """FP32 ONNX through the maintained dynamo exporter (torch.export -> ONNX), weights inside
    the file (no external data) so the file size is the download size. Exported once per
    module and state of its weights; later calls write the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(module, input_shape)
    cached = _exports(module, input_shape)
    if "onnx" not in cached:
        onnx_program = torch.onnx.export(
            program, (_example(input_shape, module),), dynamo=True, external_data=False, opset_version=ONNX_OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False,
        )
        model = onnx_program.model_proto
        for node in model.graph.node:
            # the exporter annotates every node with Python stack traces and module paths: debugging
            # aids that made a MobileNet's download 6% larger and disclose source paths
            del node.metadata_props[:]
        cached["onnx"] = model.SerializeToString()
    with atomic_output(path) as partial:
        partial.write_bytes(cached["onnx"])
    return path


# module -> its exports ("program", "onnx" bytes) for one state of its weights and one input
# shape. Held weakly: a module's exports go when the module goes (one experiment's loaded model).
_EXPORT_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict]]" = weakref.WeakKeyDictionary()


def _exports(module, input_shape: tuple) -> dict:
    """The cache entry of `module`'s exports, emptied when its weights changed since: every
    in-place update (an optimizer step, load_state_dict, pruning) bumps a tensor's version."""
    state = (tuple(input_shape), batch_range(module), tuple(
        (id(tensor), tensor._version) for tensor in (*module.parameters(), *module.buffers())))
    entry = _EXPORT_CACHE.get(module)
    if entry is None or entry[0] != state:
        entry = (state, {})
        _EXPORT_CACHE[module] = entry
    return entry[1]


def save_pt2(module, input_shape: tuple, path: Path, architecture: str | None = None,
             num_classes: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(module, input_shape)
    extra_files = {}
    if architecture and isinstance(module, zoo.ARCHITECTURES[architecture]) and _matches_zoo(
            module, architecture, num_classes, input_shape[0]):
        extra_files[ARCHITECTURE_EXTRA_FILE] = json.dumps(
            {"name": architecture, "num_classes": num_classes, "kwargs": getattr(module, "zoo_kwargs", {})}
        )
    with atomic_output(path) as partial:
        torch.export.save(program, str(partial), extra_files=extra_files)
    return path


def _matches_zoo(module: nn.Module, architecture: str, num_classes: int, in_channels: int) -> bool:
    """True when the module still has the zoo architecture's shapes (not after pruning)."""
    reference = zoo.build(architecture, num_classes, in_channels, **getattr(module, "zoo_kwargs", {}))
    ours = {k: v.shape for k, v in module.state_dict().items()}
    return ours == {k: v.shape for k, v in reference.state_dict().items()}


def set_eval(module) -> None:
    _set_mode(module, training=False)


def _set_mode(module, training: bool) -> None:
    """Exported graphs refuse .train()/.eval(); their batch-norm mode is fixed at export time."""
    try:
        module.train(training)
    except (NotImplementedError, RuntimeError):
        pass


# --------------------------------------------------------------------------- onnxruntime

def ort_session(path: Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------- training and evaluation

def evaluate(module, x: np.ndarray, y: np.ndarray, batch_size: int = PREDICT_BATCH) -> float:
    """Top-1 accuracy of a torch module on numpy data (eval mode, no grad)."""
    return float((predict_torch(module, x, batch_size).argmax(-1) == np.asarray(y)).mean())


def predict_torch(module, x: np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
    """Logits in chunks of `batch_size` moved into the model's batch range, a chunk under the
    smallest batch it takes padded with zero samples."""
    set_eval(module)
    smallest = batch_range(module)[0]
    batch_size = batch_size_within(module, batch_size)
    x = np.asarray(x, dtype=np.float32)
    chunks = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(pad_batch(chunk, smallest))).numpy()[:len(chunk)]
                               for chunk in chunks])


def train(module, dataset, epochs: int, lr: float, progress: ProgressFn,
          progress_span: tuple[float, float] = (0.0, 1.0), loss_fn: LossFn | None = None,
          batch_size: int = 64, seed: int = 0, message: str = "fine-tuning",
          optimizer: torch.optim.Optimizer | None = None,
          after_step: Callable[[], None] | None = None, cosine: bool = False) -> dict:
    """Adam (or the given optimizer) over dataset.x_train for `epochs`, reporting
    progress(fraction, message, {"loss", "train_accuracy", "epoch"}) after every batch; an
    ExperimentStopped raised by progress propagates and stops at once. `after_step` runs after
    each optimizer step (e.g. to keep pruned weights at zero). `cosine` decays the learning rate
    to zero over the run, step by step (recovery after pruning settles better than at a constant
    rate). A model whose export limits its batch size trains in batches within those limits (a
    fixed batch: of that size), leaving out a last batch smaller than it takes. Returns the last
    epoch's metrics."""
    set_seed(seed)
    loss_fn = loss_fn or (lambda logits, targets, inputs: nn.functional.cross_entropy(logits, targets))
    optimizer = optimizer or torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    x = torch.from_numpy(np.asarray(dataset.x_train, dtype=np.float32))
    y = torch.from_numpy(np.asarray(dataset.y_train, dtype=np.int64))
    batch_size = batch_size_within(module, batch_size)
    last = len(x) % batch_size
    batches = max(1, len(x) // batch_size + (1 if last and last >= batch_range(module)[0] else 0))
    total_steps = max(1, epochs * batches)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps) if cosine else None
    start, end = progress_span
    generator = torch.Generator().manual_seed(seed)
    metrics: dict = {}
    for epoch in range(epochs):
        _set_mode(module, training=True)
        order = torch.randperm(len(x), generator=generator)
        loss_sum, correct, seen = 0.0, 0, 0
        for batch in range(batches):
            index = order[batch * batch_size:(batch + 1) * batch_size]
            inputs, targets = x[index], y[index]
            logits = module(inputs)
            loss = loss_fn(logits, targets, inputs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule:
                schedule.step()
            if after_step:
                after_step()
            loss_sum += float(loss.detach()) * len(index)
            correct += int((logits.argmax(-1) == targets).sum())
            seen += len(index)
            metrics = {"loss": round(loss_sum / seen, 4), "train_accuracy": round(correct / seen, 4),
                       "epoch": epoch + 1}
            step = epoch * batches + batch + 1
            progress(start + (end - start) * step / total_steps, f"{message} epoch {epoch + 1}/{epochs}", metrics)
    set_eval(module)
    return metrics


def count_params_macs(module, input_shape: tuple) -> tuple[int, int]:
    """Parameters, and multiply-accumulates of one sample counted by torch's FlopCounterMode at
    the aten level (convolutions and matrix products; FLOPs / 2), so it works for eager modules
    and exported graphs alike."""
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in module.parameters())
    set_eval(module)
    counter = FlopCounterMode(display=False)
    example = _example(input_shape, module)
    with counter, torch.no_grad():
        module(example)
    return int(params), int(counter.get_total_flops() // 2 // len(example))


def train_demo_model(dataset, path: Path, epochs: int = 6, seed: int = 0) -> Path:
    """Train the `digits_cnn` zoo model on digits (NCHW 1x8x8) and save it as `.pt2`
    (≥95% test accuracy in a few seconds on one core)."""
    set_seed(seed)
    module = zoo.build("digits_cnn", dataset.num_classes, dataset.input_shape[0])
    train(module, dataset, epochs, 1e-3, lambda *_: None, seed=seed, message="training demo model")
    accuracy = evaluate(module, dataset.x_test, dataset.y_test)
    if accuracy < 0.95:
        raise RuntimeError(f"the demo model reached only {accuracy:.1%} test accuracy")
    return save_pt2(module, dataset.input_shape, path, "digits_cnn", dataset.num_classes)
