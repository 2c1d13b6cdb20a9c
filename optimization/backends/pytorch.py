"""The PyTorch backend: safe loading, ONNX export, onnxruntime measurement, and the training,
evaluation and counting helpers every PyTorch technique shares.

Deploy format: FP32 (or quantized) ONNX, opset 18, dynamic batch dimension, one `logits` output,
run by onnxruntime's CPU execution provider. Native format: a torch.export `.pt2` archive.
"""
from __future__ import annotations

import json
import shutil
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
        if suffix not in (".pt2", ".pt", ".pth"):
            raise InvalidInputError(f"{path.name}: upload a .pt2, .pt, .pth or .onnx PyTorch model")
        check_torch_archive(path)  # before any torch loader: torch.export.load / jit.load unpickle freely
        if suffix == ".pt2":
            return _load_exported(path, num_classes)
        if suffix == ".pt":
            return _load_torchscript(path, input_shape, num_classes)
        return _load_state_dict(path, input_shape, architecture, num_classes)

    def export_deploy(self, model: LoadedModel, path: Path) -> Path:
        path = Path(path)
        if model.source_format == "onnx":
            with atomic_output(path) as partial:
                shutil.copyfile(model.module, partial)
            return path
        return export_onnx(model.module, model.input_shape, path)

    def save_native(self, model: LoadedModel, path: Path) -> Path:
        if model.source_format == "onnx":
            raise InvalidInputError("an ONNX upload has no PyTorch form to save; only its .onnx is kept")
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
    session = ort_session(path)
    declared = session.get_inputs()[0].shape[1:]
    shape = tuple(input_shape) if input_shape else tuple(declared)
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise InvalidInputError(f"{path.name} has a symbolic input shape {declared}; give input_shape")
    outputs = session.get_outputs()[0].shape
    classes = num_classes or (outputs[-1] if isinstance(outputs[-1], int) else None)
    return LoadedModel("pytorch", str(path), shape, classes, path, "onnx", trainable=False)


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
    module, preparation = _prepare_graph(program.module(), input_shape)
    classes = num_classes or _output_classes(module, input_shape)
    return LoadedModel("pytorch", module, input_shape, classes, path, "pt2", preparation=preparation)


def _prepare_graph(module, input_shape: tuple):
    """Module-ise an exported graph and, if it was exported for a fixed batch, generalise it to
    any batch; where that fails, mark the batch it only runs (see pytorch_graph)."""
    placeholder = next(node for node in module.graph.nodes if node.op == "placeholder")
    batch = placeholder.meta["val"].shape[0]
    module, fixed, preparation = prepare_exported_module(module, batch if isinstance(batch, int) else None,
                                                         input_shape)
    mark_fixed_batch(module, fixed)
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
    module, preparation = _prepare_graph(TS2EPConverter(scripted, (example,)).convert().module(), tuple(input_shape))
    classes = num_classes or _output_classes(module, tuple(input_shape))
    return LoadedModel("pytorch", module, tuple(input_shape), classes, path, "pt", preparation=preparation)


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


def fixed_batch(module) -> int | None:
    """The only batch size a model exported with a static batch dimension that could not be
    generalised accepts (else None)."""
    return getattr(module, "edgeopt_fixed_batch", None)


def mark_fixed_batch(module, batch: int | None):
    """Record on `module` (e.g. a re-traced copy) that it only runs batches of `batch`."""
    if batch:
        module.edgeopt_fixed_batch = batch
    return module


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """`x` padded with zero samples to `size` rows, for a model that only takes that batch."""
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)]) if len(x) < size else x


# --------------------------------------------------------------------------- saving and export

def _example(input_shape: tuple, module=None) -> torch.Tensor:
    # batch 2, not 1: torch.export specialises a dimension whose example size is 1
    return torch.zeros(fixed_batch(module) or 2, *input_shape)


def export_program(module, input_shape: tuple) -> torch.export.ExportedProgram:
    """torch.export with a dynamic batch dimension, unless the model only takes a fixed batch."""
    set_eval(module)
    dynamic = None if fixed_batch(module) else ({0: torch.export.Dim("batch", min=1, max=4096)},)
    return torch.export.export(module, (_example(input_shape, module),), dynamic_shapes=dynamic)


def export_onnx(module, input_shape: tuple, path: Path) -> Path:
    """FP32 ONNX through the maintained dynamo exporter (torch.export -> ONNX), weights inside
    the file (no external data) so the file size is the download size."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program = export_program(module, input_shape)
    onnx_program = torch.onnx.export(
        program, (_example(input_shape, module),), dynamo=True, external_data=False, opset_version=ONNX_OPSET,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], verbose=False,
    )
    model = onnx_program.model_proto
    for node in model.graph.node:
        # the exporter annotates every node with Python stack traces and module paths: debugging
        # aids that made a MobileNet's download 6% larger and disclose source paths
        del node.metadata_props[:]
    with atomic_output(path) as partial:
        onnx.save(model, str(partial))
    return path


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
    set_eval(module)
    fixed = fixed_batch(module)
    batch_size = fixed or batch_size
    x = np.asarray(x, dtype=np.float32)
    chunks = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]
    with torch.no_grad():
        return np.concatenate([
            module(torch.from_numpy(pad_batch(chunk, fixed) if fixed else chunk)).numpy()[:len(chunk)]
            for chunk in chunks
        ])


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
    rate). A model that only takes a fixed batch trains in batches of that size. Returns the last
    epoch's metrics."""
    set_seed(seed)
    loss_fn = loss_fn or (lambda logits, targets, inputs: nn.functional.cross_entropy(logits, targets))
    optimizer = optimizer or torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    x = torch.from_numpy(np.asarray(dataset.x_train, dtype=np.float32))
    y = torch.from_numpy(np.asarray(dataset.y_train, dtype=np.int64))
    batch_size = fixed_batch(module) or batch_size
    # a fixed-batch model cannot take the last, smaller batch: it is left out of each epoch
    batches = max(1, len(x) // batch_size if fixed_batch(module) else -(-len(x) // batch_size))
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
