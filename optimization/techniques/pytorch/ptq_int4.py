"""Post-training 4-bit weights in onnxruntime.

Scheme "w4" (default), weight-only, every layer that has weights considered:
- pointwise (1x1, stride 1) convolutions and fully connected layers become onnxruntime's
  MatMulNBits (com.microsoft; 4-bit blockwise weights, a native kernel that computes from the
  packed weights): a pointwise convolution on NCHW is a matrix product over the channels, so it
  runs as Transpose -> MatMulNBits -> Transpose (onnxruntime's transpose optimizer cancels the
  transposes between neighbouring layers);
- every other convolution (3x3, depthwise, strided) keeps its Conv and reads its weight from a
  standard DequantizeLinear of an INT4 initializer (opset 21), one scale per output channel:
  onnxruntime has no 4-bit convolution kernel, so it dequantizes that weight on each call.
Scales are symmetric and MSE-optimal: each block's or channel's clipping threshold is the one, on
a grid below its largest weight, with the lowest squared rounding error. Activations stay float.
Which layers stay 8-bit is measured, not named: all layers go to 4 bits; while the model's top-1
predictions agree with the FP32 model's on fewer than `min_agreement` of the calibration samples,
the layer whose 4-bit weights alone move the FP32 logits most goes back to 8 bits.

Scheme "fc4_conv8": only fully connected layers become 4-bit MatMulNBits; convolutions are
static INT8 (QOperator, as ptq_int8), which keeps INT8's speed but INT8's size on a convnet.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optimization.base import TechniqueNotApplicable
from optimization.backends import pytorch as backend
from optimization.techniques.pytorch._common import (
    INT8_DEFAULTS,
    PyTorchTechnique,
    file_size,
    int8_options,
    quantize_int8,
    quantize_matmul_4bit,
    weighted_ops,
)

SCHEMES = ("w4", "fc4_conv8")
# int4 DequantizeLinear (and its per-axis scales) needs ONNX opset 21; onnxruntime >= 1.18 runs it
INT4_OPSET = 21
# clipping thresholds tried, as fractions of a block's largest absolute weight
CLIP_RATIOS = np.linspace(0.5, 1.0, 26)
# MatMulNBits blocks are powers of two of at least 16 weights along K
MIN_BLOCK = 16
# the sensitivity search re-evaluates the model once per layer; this bounds it on deep models
SENSITIVITY_EVALUATIONS = 200


class Technique(PyTorchTechnique):
    name = "ptq_int4"
    post_training = True
    defaults = {"scheme": "w4", "block_size": 64, "min_agreement": 0.99, "accuracy_level": 4, **INT8_DEFAULTS}

    def estimate_time(self, model_info, config) -> float:
        options = self.options(config)
        if options["scheme"] == "fc4_conv8":
            return 1.25 * self.quantize_seconds(model_info, options)
        # an export, then up to one calibration pass per layer (the sensitivity search) and a few more
        layers = model_info.get("layers") or 20
        passes = 3 + layers / 2
        return 1.5 * self.quantize_seconds(model_info) + passes * (
            0.05 + model_info.get("calib_samples", 0) * model_info.get("macs", 0) * 2e-10)

    def optimize(self, model, config, dataset, progress):
        options = self.options(config)
        scheme = options["scheme"]
        if scheme not in SCHEMES:
            raise TechniqueNotApplicable(f"unknown ptq_int4 scheme {scheme!r}; choose one of {SCHEMES}")
        deploy, _ = self.paths(config)
        fp32 = deploy.with_suffix(".fp32.onnx")
        progress(0.05, f"exporting FP32 ONNX ({scheme})", {})
        backend.BACKEND.export_deploy(model, fp32)
        try:
            if scheme == "w4":
                details = quantize_weights_4bit(fp32, deploy, dataset.x_calib, options, progress)
            else:
                details = _fc4_conv8(fp32, deploy, dataset.x_calib, options, progress)
        finally:
            fp32.unlink(missing_ok=True)
        details = {"bits": 4, "scheme": scheme, **details,
                   "native": "FP32 .pt2: the 4-bit model exists only as ONNX"}
        result = self.result(config, model, model.module, details, deploy_written=True)
        progress(1.0, "4-bit model written", {"size_bytes": file_size(deploy)})
        return result


def _fc4_conv8(fp32: Path, deploy: Path, calib_x: np.ndarray, options: dict, progress) -> dict:
    fc4 = deploy.with_suffix(".fc4.onnx")
    progress(0.3, "fully connected layers to 4-bit MatMulNBits", {})
    try:
        fully_connected = quantize_matmul_4bit(fp32, fc4, options["block_size"])
        if not fully_connected and not weighted_ops(fc4).get("MatMulNBits"):
            raise TechniqueNotApplicable("the model has no fully connected layer with constant weights to store in 4 bits")
        progress(0.5, "convolutions to INT8 (calibrating)", {})
        conv_quantization = quantize_int8(fc4, deploy, calib_x, **int8_options(options))
    finally:
        fc4.unlink(missing_ok=True)
    ops = weighted_ops(deploy)
    return {
        "layers": {name: {"bits": 4, "op": "MatMulNBits"} for name in ops.get("MatMulNBits", [])},
        "kept_wider": {name: "8-bit: onnxruntime has no fast 4-bit convolution kernel"
                       for name in ops.get("Conv", []) + ops.get("QLinearConv", [])},
        "convolutions": conv_quantization,
        "activations": "uint8, MinMax calibration",
        "block_size": options["block_size"],
    }


# --------------------------------------------------------------------------- weight-only 4-bit

@dataclass
class _Layer:
    """A node with a constant weight, in the form its quantized versions take."""
    index: int
    name: str
    form: str  # "matmul": weight [K, N] for MatMulNBits; "conv": the Conv weight, per output channel
    weight: np.ndarray
    bias: np.ndarray | None
    transpose: bool = False  # a pointwise convolution on NCHW: channels moved last and back
    versions: dict = field(default_factory=dict)  # bits -> (nodes, initializers)


def quantize_weights_4bit(fp32_path: Path, out_path: Path, calib_x: np.ndarray, options: dict,
                          progress=lambda *_: None) -> dict:
    """Scheme "w4" (see the module docstring) from `fp32_path` to `out_path`; returns the run's
    details: every layer's bits and form, and why each layer kept wider stayed so."""
    import onnx
    from onnx import version_converter

    min_agreement, block_size = float(options["min_agreement"]), int(options["block_size"])
    if block_size < MIN_BLOCK or block_size & (block_size - 1):
        raise TechniqueNotApplicable(f"block_size must be a power of two of at least {MIN_BLOCK}, got {block_size}")
    model = onnx.load(str(fp32_path))
    if _default_opset(model) < INT4_OPSET:
        model = version_converter.convert_version(model, INT4_OPSET)
    layers = _find_layers(model)
    if not layers:
        raise TechniqueNotApplicable("the model has no convolution or fully connected layer with constant weights")
    for layer in layers:
        layer.versions = {bits: _quantized(layer, bits, block_size, int(options["accuracy_level"]))
                          for bits in (4, 8)}
    calib_x = np.asarray(calib_x, dtype=np.float32)
    reference = backend.BACKEND.predict(fp32_path, calib_x)
    scratch = out_path.with_suffix(".candidate.onnx")

    def measure(bits: dict[str, int]) -> np.ndarray:
        _write(model, layers, bits, scratch)
        return backend.BACKEND.predict(scratch, calib_x)

    def agreement(logits: np.ndarray) -> float:
        return float((logits.argmax(-1) == reference.argmax(-1)).mean())

    try:
        progress(0.2, "all layers to 4 bits", {})
        bits = {layer.name: 4 for layer in layers}
        history = [agreement(measure(bits))]
        sensitivity: dict[str, float] = {}
        if history[-1] < min_agreement:
            progress(0.3, "measuring each layer's sensitivity to 4 bits", {})
            sensitivity = _sensitivity(layers, measure, reference)
            for name in sorted(sensitivity, key=sensitivity.get, reverse=True):
                if history[-1] >= min_agreement:
                    break
                bits[name] = 8
                history.append(agreement(measure(bits)))
        _write(model, layers, bits, out_path)
    finally:
        scratch.unlink(missing_ok=True)
    return _details(layers, bits, sensitivity, history, min_agreement, block_size, len(calib_x),
                    int(options["accuracy_level"]))


def _sensitivity(layers: list[_Layer], measure, reference: np.ndarray) -> dict[str, float]:
    """Each layer alone at 4 bits (the others float): the mean squared change of the logits,
    relative to the logits' own mean square."""
    scale = float(np.mean(reference ** 2)) or 1.0
    result = {}
    for layer in layers[:SENSITIVITY_EVALUATIONS]:
        logits = measure({layer.name: 4})
        result[layer.name] = float(np.mean((logits - reference) ** 2) / scale)
    return result


def _details(layers, bits, sensitivity, history, min_agreement, block_size, samples, accuracy_level) -> dict:
    by_layer = {}
    for layer in layers:
        entry = {"bits": bits[layer.name], "weights": int(layer.weight.size),
                 "op": ("MatMulNBits" + (" (1x1 conv, channels last)" if layer.transpose else ""))
                 if layer.form == "matmul" else "DequantizeLinear -> Conv"}
        if layer.name in sensitivity:
            entry["logit_error_alone_at_4_bits"] = round(sensitivity[layer.name], 6)
        by_layer[layer.name] = entry
    kept = [name for name, b in bits.items() if b > 4]
    kept_wider = {}
    for step, name in enumerate(kept):
        kept_wider[name] = (
            f"8-bit: with it at 4 bits the model agreed with FP32 on {history[step]:.2%} of the {samples} "
            f"calibration samples (< {min_agreement:.0%}); it moved the logits most of the layers left "
            f"(alone at 4 bits: {sensitivity[name]:.2e} relative squared error)")
    weights = sum(layer.weight.size for layer in layers)
    return {
        "layers": by_layer,
        "kept_wider": kept_wider,
        "weights_at_4_bits": round(sum(layer.weight.size for layer in layers if bits[layer.name] == 4) / weights, 4),
        "calibration_agreement_with_fp32": round(history[-1], 4),
        "min_agreement": min_agreement,
        "weights": "symmetric, MSE-optimal clipping; MatMulNBits blocks of up to "
                   f"{block_size} along the input channels, convolutions one scale per output channel",
        "activations": "float32 (weight-only quantization)",
        "accuracy_level": accuracy_level,
        "runtime": "MatMulNBits computes from the packed weights; onnxruntime dequantizes the INT4 "
                   "convolution weights on every call (it has no 4-bit convolution kernel)",
    }


def _default_opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _find_layers(model) -> list[_Layer]:
    """Conv, Gemm and MatMul nodes whose weights are initializers."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    layers = []
    for index, node in enumerate(model.graph.node):
        if len(node.input) < 2 or node.input[1] not in initializers:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = numpy_helper.to_array(initializers[node.input[1]]).astype(np.float32)
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias_name and bias_name not in initializers:
            continue
        bias = numpy_helper.to_array(initializers[bias_name]).astype(np.float32) if bias_name else None
        name = node.name or f"{node.op_type}_{index}"
        if node.op_type == "Conv" and weight.ndim == 4:
            pointwise = (weight.shape[2:] == (1, 1) and attrs.get("group", 1) == 1
                         and all(s == 1 for s in attrs.get("strides", [1, 1]))
                         and not any(attrs.get("pads", [0])) and attrs.get("auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"))
            if pointwise:
                layers.append(_Layer(index, name, "matmul", weight[:, :, 0, 0].T.copy(), bias, transpose=True))
            else:
                layers.append(_Layer(index, name, "conv", weight, bias))
        elif node.op_type == "Gemm" and weight.ndim == 2 and not attrs.get("transA", 0) \
                and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 \
                and (bias is None or bias.shape == (weight.shape[0 if attrs.get("transB", 0) else 1],)):
            layers.append(_Layer(index, name, "matmul", weight.T.copy() if attrs.get("transB", 0) else weight, bias))
        elif node.op_type == "MatMul" and weight.ndim == 2 and bias_name is None:
            layers.append(_Layer(index, name, "matmul", weight, None))
    return layers


def symmetric_quantize(groups: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `groups` to signed `bits`-bit integers with one scale each, the clipping threshold
    chosen per row from CLIP_RATIOS of its largest weight for the least squared error.
    Returns (integers, scales)."""
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    absmax = np.maximum(np.abs(groups).max(axis=1), 1e-12)
    best_error = np.full(len(groups), np.inf)
    best_scale = absmax / qmax
    for ratio in CLIP_RATIOS:
        scale = absmax * ratio / qmax
        q = np.clip(np.rint(groups / scale[:, None]), qmin, qmax)
        error = ((q * scale[:, None] - groups) ** 2).sum(axis=1)
        better = error < best_error
        best_error[better], best_scale[better] = error[better], scale[better]
    q = np.clip(np.rint(groups / best_scale[:, None]), qmin, qmax).astype(np.int8)
    return q, best_scale.astype(np.float32)


def _block_for(k: int, block_size: int) -> int:
    """The layer's block along K: a whole column when it fits (one scale per output channel),
    padded to the power of two MatMulNBits needs."""
    return min(block_size, max(MIN_BLOCK, 1 << (k - 1).bit_length()))


def _quantized(layer: _Layer, bits: int, block_size: int, accuracy_level: int) -> tuple[list, list]:
    """(nodes, initializers) that replace `layer`'s node with `bits`-bit weights."""
    import ml_dtypes
    from onnx import helper, numpy_helper

    prefix = f"{layer.name}_q{bits}"
    initializers = []
    if layer.form == "conv":
        out_channels = layer.weight.shape[0]
        q, scale = symmetric_quantize(layer.weight.reshape(out_channels, -1), bits)
        storage = q.reshape(layer.weight.shape).astype(ml_dtypes.int4 if bits == 4 else np.int8)
        initializers += [numpy_helper.from_array(storage, f"{prefix}_weight"),
                         numpy_helper.from_array(scale, f"{prefix}_scale")]
        nodes = [helper.make_node("DequantizeLinear", [f"{prefix}_weight", f"{prefix}_scale"],
                                  [f"{prefix}_dequantized"], name=f"{prefix}_dequantize", axis=0)]
        return nodes, initializers  # the Conv itself is rebuilt in _write with the dequantized weight
    k, n = layer.weight.shape
    block = _block_for(k, block_size)
    blocks = math.ceil(k / block)
    padded = np.zeros((blocks * block, n), dtype=np.float32)
    padded[:k] = layer.weight
    # column-major blocks: [N, blocks, block], as MatMulNBits stores them
    groups = padded.T.reshape(n * blocks, block)
    q, scale = symmetric_quantize(groups, bits)
    codes = (q.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8).reshape(n, blocks, block)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # two per byte, the first in the low nibble
    initializers += [numpy_helper.from_array(codes, f"{prefix}_weight"),
                     numpy_helper.from_array(scale, f"{prefix}_scale")]
    inputs = [f"{prefix}_weight", f"{prefix}_scale"]
    if layer.bias is not None:
        initializers.append(numpy_helper.from_array(layer.bias, f"{prefix}_bias"))
        inputs += ["", "", f"{prefix}_bias"]
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    nodes = [helper.make_node("MatMulNBits", [f"{prefix}_in", *inputs], [f"{prefix}_out"],
                              name=f"{layer.name}_matmul{bits}", domain="com.microsoft", **attrs)]
    return nodes, initializers


def _write(model, layers: list[_Layer], bits: dict[str, int], path: Path) -> None:
    """`model` with each layer named in `bits` replaced by its quantized version (the others
    left float), saved to `path`; `model` itself is not changed."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    replaced = {layer.index: layer for layer in layers if layer.name in bits}
    nodes = []
    for index, node in enumerate(model.graph.node):
        layer = replaced.get(index)
        if layer is None:
            nodes.append(node)
            continue
        version_nodes, initializers = layer.versions[bits[layer.name]]
        graph.initializer.extend(initializers)
        if layer.form == "conv":
            conv = onnx.NodeProto()
            conv.CopyFrom(node)
            conv.input[1] = version_nodes[0].output[0]
            nodes += [*version_nodes, conv]
            continue
        matmul = onnx.NodeProto()
        matmul.CopyFrom(version_nodes[0])
        prefix = matmul.input[0][:-len("_in")]
        if layer.transpose:
            nodes.append(helper.make_node("Transpose", [node.input[0]], [f"{prefix}_in"],
                                          name=f"{prefix}_to_channels_last", perm=[0, 2, 3, 1]))
            nodes.append(matmul)
            nodes.append(helper.make_node("Transpose", [f"{prefix}_out"], [node.output[0]],
                                          name=f"{prefix}_to_channels_first", perm=[0, 3, 1, 2]))
        else:
            matmul.input[0] = node.input[0]
            matmul.output[0] = node.output[0]
            nodes.append(matmul)
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(out, str(path))
