"""Work the PyTorch techniques share: onnxruntime static INT8 and 4-bit quantization, channel
pruning with Torch-Pruning, the time model for ETAs, and writing a technique's two artifacts."""
from __future__ import annotations

import copy
import logging
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
from optimization.backends import pytorch as backend

# Cost model for estimate_time, measured on the shared 2-core dev machine with digits_cnn:
# one training sample (forward + backward) costs about this many seconds per MAC...
TRAIN_SECONDS_PER_MAC = 8e-11
# ...and each torch.export -> ONNX export, .pt2 save and ORT quantization pass costs about this.
EXPORT_SECONDS = 0.9
QUANTIZE_SECONDS_PER_MAC = 1e-9
# Pruned models keep a per-batch overhead that does not shrink with their MACs.
MIN_PRUNED_TRAINING_COST = 0.5
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
        if model.source_format == "onnx":
            details["native"] = "none: the model was uploaded as ONNX, so there is no PyTorch form"
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
    def quantize_seconds(model_info: dict) -> float:
        return EXPORT_SECONDS + model_info.get("calib_samples", 0) * model_info.get("macs", 0) * QUANTIZE_SECONDS_PER_MAC


def require_trainable(model: LoadedModel, technique: str) -> None:
    if not model.trainable:
        raise TechniqueNotApplicable(
            f"{technique} trains the model, and an ONNX upload cannot be trained; upload a .pt2, .pt or .pth"
        )


def copy_module(model: LoadedModel):
    return copy.deepcopy(model.module)


def quantize_model_int8(model: LoadedModel, out_path: Path, calib_x: np.ndarray, **options) -> Path:
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


def quantize_int8(fp32_path: Path, out_path: Path, calib_x: np.ndarray,
                  weight_bits: int = 8, op_types: list[str] | None = None) -> Path:
    """Static QDQ quantization in onnxruntime: per-channel signed weights (8 or 4 bits),
    unsigned 8-bit activations calibrated (MinMax) on `calib_x`. `op_types` limits which
    operators are quantized (None: all the quantizer supports)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out_path.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    model_input = backend.ort_session(prepared).get_inputs()[0]
    # a model exported for a fixed batch (shape[0] an int) is calibrated in batches of that size
    fixed = model_input.shape[0] if isinstance(model_input.shape[0], int) else None
    try:
        quantize_static(
            str(prepared), str(out_path), _ArrayReader(model_input.name, calib_x, fixed),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8 if weight_bits == 8 else QuantType.QInt4,
            op_types_to_quantize=op_types,
        )
    finally:
        prepared.unlink(missing_ok=True)
    return out_path


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
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    onnx.save(model, str(path))
    return rewritten


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
        if node.op_type in ("Conv", "Gemm", "MatMul", "MatMulNBits"):
            ops.setdefault(node.op_type, []).append(node.name)
    return ops


def file_size(path: Path) -> int:
    return os.path.getsize(path)


# --------------------------------------------------------------------------- Torch-Pruning

def prune_channels(module, input_shape: tuple, ratio: float, round_to: int | None = None):
    """Remove `ratio` of the channels of every prunable layer, ranked by L2 magnitude with
    Torch-Pruning's dependency graph (coupled layers pruned together); the classifier keeps its
    outputs. Returns a pruned copy, checked to still run; `module` itself is left as it was."""
    import torch

    if not any(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in module.modules()):
        raise TechniqueNotApplicable(
            "the model has no convolution or fully connected layer with its own weights (as an nn.Conv2d/"
            "nn.Linear or an aten.conv2d/linear op) to remove channels from"
        )
    classifier = getattr(module, "classifier", None)
    ignored = [classifier] if isinstance(classifier, torch.nn.Linear) else [
        m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1:]
    example = torch.zeros(backend.fixed_batch(module) or 1, *input_shape)
    backend.set_eval(module)
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
    tp.pruner.MetaPruner(
        candidate, example, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=ignored_in_copy, round_to=round_to,
    ).step()
    try:
        with torch.no_grad():
            candidate(example)
    except RuntimeError as error:
        return None, str(error).splitlines()[0]
    return candidate, None


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
