"""Work the PyTorch techniques share: onnxruntime static INT8 and 4-bit quantization, channel
pruning with Torch-Pruning, the time model for ETAs, and writing a technique's two artifacts."""
from __future__ import annotations

import copy
import functools
import logging
import math
import os
from pathlib import Path

import numpy as np

from optimization.base import (
    BaseOptimization,
    LoadedModel,
    OptimizedResult,
    TechniqueConfig,
    TechniqueNotApplicable,
)
from optimization.atomic import atomic_output
from optimization.backends import pytorch as backend
from optimization.catalog import CHANNEL_MULTIPLE

# Cost model for estimate_time, measured on the shared 2-core dev machine with digits_cnn:
# one training sample (forward + backward) costs about this many seconds per MAC...
TRAIN_SECONDS_PER_MAC = 8e-11
# ...and each torch.export -> ONNX export, .pt2 save and ORT quantization pass costs about this.
EXPORT_SECONDS = 0.9
QUANTIZE_SECONDS_PER_MAC = 1e-9
# Pruned models keep a per-batch overhead that does not shrink with their MACs: an epoch after a
# 50% channel cut took 0.15 of the unpruned model's epoch on digits_cnn but 0.56 on MobileNetV2
# (many small, memory-bound layers). This floor keeps both ETAs within 2x.
MIN_PRUNED_TRAINING_COST = 0.3
CALIBRATION_BATCH = 32


class PyTorchTechnique(BaseOptimization):
    framework = "pytorch"

    def paths(self, config: TechniqueConfig) -> tuple[Path, Path]:
        config.output_dir.mkdir(parents=True, exist_ok=True)
        return config.output_dir / f"{self.name}.onnx", config.output_dir / f"{self.name}.pt2"

    def result(self, config: TechniqueConfig, model: LoadedModel, module, details: dict,
               deploy_written: bool = False) -> OptimizedResult:
        """Save `module` as the native .pt2 (and as the deploy .onnx unless the technique already
        wrote a quantized one) and count its parameters and MACs. An ONNX upload has no torch
        module: then only the deploy file exists."""
        deploy, native = self.paths(config)
        if model.preparation:
            details.setdefault("model_preparation", model.preparation)
        if model.source_format == "onnx" and deploy_written:
            details["native"] = "none: the model was uploaded as ONNX; its weights changed only in the ONNX file"
            return OptimizedResult({"deploy": deploy}, details)
        if not deploy_written:
            backend.export_onnx(module, model.input_shape, deploy)
        architecture = model.architecture if details.get("architecture_unchanged", True) else None
        backend.save_pt2(module, model.input_shape, native, architecture, model.num_classes)
        params, macs = backend.count_params_macs(module, model.input_shape)
        return OptimizedResult({"deploy": deploy, "native": native}, details, module, params, macs)

    @staticmethod
    def training_seconds(model_info: dict, epochs: float) -> float:
        return epochs * model_info.get("train_samples", 0) * model_info.get("macs", 0) * 3 * TRAIN_SECONDS_PER_MAC

    @classmethod
    def pruned_training_seconds(cls, model_info: dict, epochs: float, pruning_ratio: float) -> float:
        """Training after removing `pruning_ratio` of the channels: MACs fall with the square of
        the channels kept."""
        cost = max((1 - pruning_ratio) ** 2, MIN_PRUNED_TRAINING_COST)
        return cls.training_seconds(model_info, epochs * cost)

    @staticmethod
    def quantize_seconds(model_info: dict, options: dict | None = None) -> float:
        """One export and INT8 quantization; "auto" granularity quantizes twice."""
        passes = 2 if (options or {}).get("weight_granularity") == "auto" else 1
        return EXPORT_SECONDS + passes * model_info.get("calib_samples", 0) * model_info.get("macs", 0) * QUANTIZE_SECONDS_PER_MAC


def require_trainable(model: LoadedModel, technique: str) -> None:
    if not model.trainable:
        raise TechniqueNotApplicable(
            f"{technique} trains the model, and an ONNX upload cannot be trained; upload a .pt2, .pt or .pth"
        )


def copy_module(model: LoadedModel):
    return copy.deepcopy(model.module)


def quantize_model_int8(model: LoadedModel, out_path: Path, calib_x: np.ndarray, **options) -> dict:
    """Export `model` to FP32 ONNX beside `out_path`, then quantize it there (see quantize_int8)."""
    fp32 = out_path.with_suffix(".fp32.onnx")
    backend.BACKEND.export_deploy(model, fp32)
    try:
        return quantize_int8(fp32, out_path, calib_x, **options)
    finally:
        fp32.unlink(missing_ok=True)


# --------------------------------------------------------------------------- ORT quantization



class _ArrayReader:
    """onnxruntime CalibrationDataReader over a numpy array, in batches."""

    def __init__(self, input_name: str, x: np.ndarray, fixed_batch: int | None = None):
        x = np.asarray(x, dtype=np.float32)
        size = fixed_batch or CALIBRATION_BATCH
        self._batches = iter(
            {input_name: backend.pad_batch(x[i:i + size], size) if fixed_batch else x[i:i + size]}
            for i in range(0, len(x), size)
        )

    def get_next(self):
        return next(self._batches, None)


def int8_options(options: dict) -> dict:
    """quantize_int8's keyword arguments from a technique's (catalog-checked) options."""
    return {"quant_format": options["format"], "weight_granularity": options["weight_granularity"]}


def quantize_int8(fp32_path: Path, out_path: Path, calib_x: np.ndarray,
                  op_types: list[str] | None = None, quant_format: str = "qoperator",
                  weight_granularity: str = "auto") -> dict:
    """Static quantization in onnxruntime: signed symmetric 8-bit weights, unsigned 8-bit
    activations calibrated (MinMax) on `calib_x`. `op_types` limits which operators are quantized
    (None: all the quantizer supports). Returns what was chosen, for the run's details.

    quant_format "qoperator" writes onnxruntime's QLinearConv/QGemm operators: the int32 bias needs no
    scale or zero point of its own and no Quantize/DequantizeLinear pairs are stored, so the file
    is smaller than QDQ (~12% on MobileNetV2) and runs the same INT8 kernels; "qdq" is the
    portable form other runtimes read.

    weight_granularity "auto" quantizes per-channel and per-tensor and keeps per-tensor (one
    scale per layer instead of one per output channel, which on a narrow network such as
    MobileNetV2 is a sizeable part of the file) only if its top-1 predictions agree with the FP32
    model's on the calibration samples at least as often as per-channel's do."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out_path.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    try:
        _unshare_biases(prepared)
        quantize = functools.partial(_quantize_static, prepared, calib_x, op_types, quant_format)
        if weight_granularity != "auto":
            quantize(weight_granularity == "per_channel", out_path)
            chosen = {"weight_granularity": weight_granularity}
        else:
            chosen = _choose_granularity(fp32_path, out_path, calib_x, quantize)
    finally:
        prepared.unlink(missing_ok=True)
    return {"format": quant_format, "weight_bits": 8, **chosen}


def _unshare_biases(path: Path) -> None:
    """Give each Conv/Gemm its own bias initializer. onnxruntime's quantizer stores a bias as
    int32 at (input scale x weight scale) once per initializer name, so of two layers sharing
    one bias (a block applied twice, as in a loop) the second got the first's scale and its
    outputs were off: a scripted model refining twice with one block lost 19 points at INT8."""
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    seen: set[str] = set()
    copied = False
    for index, node in enumerate(graph.node):
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[2] not in initializers:
            continue
        if node.input[2] in seen:
            own_bias = onnx.TensorProto()
            own_bias.CopyFrom(initializers[node.input[2]])
            own_bias.name = f"{node.input[2]}_for_node_{index}"
            graph.initializer.append(own_bias)
            node.input[2], copied = own_bias.name, True
        seen.add(node.input[2])
    if copied:
        onnx.save(model, str(path))


def _quantize_static(prepared: Path, calib_x: np.ndarray, op_types: list[str] | None,
                     quant_format: str, per_channel: bool, out_path: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    model_input = backend.ort_session(prepared).get_inputs()[0]
    # a model exported for a fixed batch (shape[0] an int) is calibrated in batches of that size
    fixed = model_input.shape[0] if isinstance(model_input.shape[0], int) else None
    with atomic_output(out_path) as partial:
        quantize_static(
            str(prepared), str(partial), _ArrayReader(model_input.name, calib_x, fixed),
            quant_format=QuantFormat.QOperator if quant_format == "qoperator" else QuantFormat.QDQ,
            per_channel=per_channel, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=op_types,
        )
        # the pre-processing's shape annotations only help the quantizer; onnxruntime infers
        # shapes again when it loads the model, so the deployed file goes without them
        model = onnx.load(str(partial))
        del model.graph.value_info[:]
        onnx.save(model, str(partial))


def _choose_granularity(fp32_path: Path, out_path: Path, calib_x: np.ndarray, quantize) -> dict:
    reference = backend.BACKEND.predict(fp32_path, calib_x).argmax(-1)
    agreement, sizes = {}, {}
    candidates = {"per_channel": out_path.with_suffix(".per_channel.onnx"),
                  "per_tensor": out_path.with_suffix(".per_tensor.onnx")}
    try:
        for granularity, path in candidates.items():
            quantize(granularity == "per_channel", path)
            agreement[granularity] = float((backend.BACKEND.predict(path, calib_x).argmax(-1) == reference).mean())
            sizes[granularity] = file_size(path)
        chosen = "per_tensor" if agreement["per_tensor"] >= agreement["per_channel"] else "per_channel"
        candidates[chosen].replace(out_path)
    finally:
        for path in candidates.values():
            path.unlink(missing_ok=True)
    return {
        "weight_granularity": chosen,
        "granularity_choice": {
            "rule": "per-tensor if its top-1 agreement with the FP32 model on the calibration samples is no "
                    "lower than per-channel's",
            "agreement_with_fp32": {k: round(v, 4) for k, v in agreement.items()},
            "size_bytes": sizes,
        },
    }


def gemm_to_matmul(path: Path) -> list[str]:
    """Rewrite `Gemm(x, W, b, transB=1)` with constant weights as `MatMul(x, W^T) + b`, in place:
    onnxruntime's 4-bit MatMulNBits quantizer only takes MatMul. Returns the rewritten nodes."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    rewritten, nodes = [], []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in initializers or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        if attrs.get("transB", 0):
            weight = weight.T
        weight_name = f"{node.name}_matmul_weight"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), weight_name))
        product = f"{node.name}_matmul_out"
        nodes.append(helper.make_node("MatMul", [node.input[0], weight_name],
                                      [product if len(node.input) > 2 else node.output[0]],
                                      name=f"{node.name}_matmul"))
        if len(node.input) > 2:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                          name=f"{node.name}_bias"))
        rewritten.append(node.name)
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)
    onnx.save(model, str(path))
    return rewritten


def drop_unused_initializers(graph) -> None:
    """Remove the initializers no node reads, counting the nodes of If/Loop subgraphs, which read
    the outer graph's initializers by name (a branch's convolution weights)."""
    from optimization.safety.onnx_check import all_nodes

    used = {name for node in all_nodes(graph) for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def quantize_matmul_4bit(path: Path, out_path: Path, block_size: int = 32) -> list[str]:
    """Fully connected layers to onnxruntime's MatMulNBits (4-bit blockwise weights, symmetric);
    returns the layers converted."""
    import onnx

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    # this module calls logging.basicConfig(level=INFO) on import, which would flood every later
    # log of a process that had not configured logging yet: undo that
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    converted = gemm_to_matmul(path)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), bits=4, block_size=block_size, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(out_path), use_external_data_format=False)
    return converted


def weighted_ops(path: Path) -> dict[str, list[str]]:
    """Names of the nodes that carry weights, by operator type, in an ONNX file."""
    import onnx

    ops: dict[str, list[str]] = {}
    for node in onnx.load(str(path)).graph.node:
        if node.op_type in ("Conv", "QLinearConv", "Gemm", "QGemm", "MatMul", "MatMulNBits"):
            ops.setdefault(node.op_type, []).append(node.name)
    return ops


def file_size(path: Path) -> int:
    return os.path.getsize(path)


# --------------------------------------------------------------------------- Torch-Pruning

def prune_channels(module, input_shape: tuple, ratio: float,
                   round_to: int | None = CHANNEL_MULTIPLE) -> tuple[object, int | None]:
    """Remove `ratio` of the channels of every prunable layer, ranked by L2 magnitude with
    Torch-Pruning's dependency graph (coupled layers pruned together); the classifier keeps its
    outputs. Each layer keeps its channel count rounded up to a multiple of `round_to` (at most
    all it has), so no layer loses more than `ratio`; on a narrow model rounding can then keep
    most channels: if rounded pruning removes under 3/4 of the parameters unrounded pruning does,
    the counts are not rounded. Returns (pruned copy, the multiple kept or None), the copy checked
    to still run; `module` itself is left as it was."""
    import torch

    if not any(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in module.modules()):
        raise TechniqueNotApplicable(
            "the model has no convolution or fully connected layer with its own weights (as an nn.Conv2d/"
            "nn.Linear or an aten.conv2d/linear op) to remove channels from"
        )
    classifier = getattr(module, "classifier", None)
    ignored = [classifier] if isinstance(classifier, torch.nn.Linear) else [
        m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1:]
    example = torch.zeros(backend.batch_size_within(module, 1), *input_shape)
    backend.set_eval(module)
    unrounded = _prune_consistently(module, example, ratio, None, ignored)
    if not round_to:
        return unrounded, None
    rounded = _prune_consistently(module, example, ratio, round_to, ignored)
    before = _count_params(module)
    if before - _count_params(rounded) >= 0.75 * (before - _count_params(unrounded)):
        return rounded, round_to
    return unrounded, None


def channels_kept(original, pruned) -> float:
    """The share of output channels kept, over the conv/linear layers whose channels shrank
    (module names survive Torch-Pruning's copy)."""
    import torch

    def widths(module) -> dict[str, int]:
        return {name: layer.out_channels if isinstance(layer, torch.nn.Conv2d) else layer.out_features
                for name, layer in module.named_modules() if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear))}

    before, after = widths(original), widths(pruned)
    shrunk = [name for name, width in after.items() if name in before and width < before[name]]
    if not shrunk:
        return 1.0
    return round(sum(after[name] for name in shrunk) / sum(before[name] for name in shrunk), 4)


def _count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _prune_consistently(module, example, ratio: float, round_to: int | None, ignored: list):
    pruned, error = _prune_copy(module, example, ratio, round_to, ignored)
    if error:
        # Torch-Pruning misplaces channel indices where a concatenation reaches a fully connected
        # layer through a flatten (VainF/Torch-Pruning#146, #481): keep those channels and retry
        pruned, error = _prune_copy(module, example, ratio, round_to,
                                    ignored + _layers_reaching_linear_inputs(module, example, ignored))
    if error:
        raise TechniqueNotApplicable(f"Torch-Pruning could not remove channels consistently from this graph: {error}")
    return pruned


def _prune_copy(module, example, ratio: float, round_to: int | None, ignored: list):
    """(pruned copy, None), or (None, why the pruned copy does not run)."""
    import torch
    import torch_pruning as tp

    candidate = copy.deepcopy(module)
    by_name = dict(module.named_modules())
    candidate_modules = dict(candidate.named_modules())
    ignored_in_copy = [candidate_modules[name] for name, layer in by_name.items()
                       if any(layer is m for m in ignored)]
    _rounding_up_pruner()(
        candidate, example, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=ignored_in_copy, round_to=round_to,
    ).step()
    try:
        with torch.no_grad():
            candidate(example)
    except (RuntimeError, IndexError) as error:  # IndexError: a Gather whose indices were computed for the old width
        return None, f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return candidate, None


@functools.cache
def _rounding_up_pruner():
    """The pruner class, made on first use: torch_pruning is imported only when a model is pruned.
    It overrides MetaPruner's private `_round_to`, so pyproject pins torch-pruning to 1.6.x."""
    import torch_pruning as tp

    class RoundingUpPruner(tp.pruner.MetaPruner):
        """Torch-Pruning's MetaPruner rounding each layer's kept channels up to the multiple, not
        down: rounded down, half of a narrow layer's channels fall to the multiple below (88 ->
        32, 48 -> 16). On timm's lcnet_035 and mobilenetv3_small_050 (digits 32x32, 6 fine-tuning
        epochs, 3 seeds) a half cut rounded down lost 31.8-32.9 and 4.2-7.0 pt, rounded up
        8.6-16.7 and 2.0-3.3 pt, at about the same onnxruntime speedup (BENCHMARKS.md, PyTorch
        corpus)."""

        def _round_to(self, n_pruned, current_channels, round_to):
            kept = min(current_channels, math.ceil((current_channels - n_pruned) / round_to) * round_to)
            return current_channels - kept

    return RoundingUpPruner


def _layers_reaching_linear_inputs(module, example, ignored: list) -> list:
    """The layers whose pruning group removes input features of a fully connected layer."""
    import torch
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(module, example_inputs=example)
    reaching = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=[torch.nn.Conv2d, torch.nn.Linear]):
        if any(isinstance(item.dep.target.module, torch.nn.Linear) and item.dep.handler == tp.prune_linear_in_channels
               for item in group):
            reaching.append(group[0].dep.source.module)
    return reaching
