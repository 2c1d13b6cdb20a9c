"""Post-training 4-bit weights in onnxruntime.

onnxruntime has no 4-bit convolution kernel. Both 4-bit-convolution schemes therefore store INT4
weights behind a Cast whose input is constant: onnxruntime's constant folding turns it into the
weight its kernel wants when it loads the file, so the file is 4-bit and the speed is the
kernel's. Measured on MobileNetV2 w0.5 at 32x32 (FP32 ~1 ms), the alternatives were slower:
INT4 DequantizeLinear weights are dequantized on every call and leave the NCHWc kernels (16 ms,
with the pointwise convolutions as Transpose -> MatMulNBits -> Transpose: MatMulNBits is built
for few rows, a 32x32 feature map has 1024, and its 35 layers took ~5 ms).

Scheme "w4a8" (default): static INT8 as ptq_int8 (QOperator, uint8 activations calibrated on the
calibration split, per-channel weights), then every QLinearConv's weight is re-quantized from the
FP32 weight to 4 bits, one scale per output channel, stored as Cast(int4 -> int8) (its int32 bias
rescaled to the new weight scale); the same for fully connected layers (QGemm). INT8 kernels
and speed, INT4 size: MobileNetV2 w0.5 6.0x smaller than FP32 at 1.9x FP32's speed.

Scheme "w4", weight-only, float activations: convolutions store INT4 weights with a float16
scale per block of `block_size` weights (whole input channels of one output channel; per output
channel where they do not split evenly) as Reshape(Mul(Reshape(Cast(int4)), Cast(scale))),
folded into float weights at load: FP32 kernels and speed (and FP32 weight memory at run time);
fully connected layers become onnxruntime's MatMulNBits (com.microsoft), whose kernel computes
from the packed 4-bit blocks. The smaller file on depthwise-heavy nets (MobileNetV2 6.2x).

Scheme "fc4_conv8": only fully connected layers become 4-bit MatMulNBits; convolutions are
static INT8 (QOperator, as ptq_int8): INT8's size on a convnet.

Scales are symmetric and MSE-optimal: each block's clipping threshold is the one, on a grid
below its largest weight, with the lowest squared rounding error. Which layers stay 8-bit is
measured, not named: all layers go to 4 bits; while, on the calibration samples, the model's
top-1 predictions agree with the FP32 model's on fewer than `min_agreement` of them or its
logits move by more than `max_logit_error` (mean squared change relative to the FP32 logits'
mean square), the layer whose 4-bit weights alone move the logits most goes back to 8 bits.
Agreement alone is blind on training-like samples the model is sure of: on MobileNetV2 w0.5
(scheme w4) it was 100% with 2 layers back at 8 bits while the test split lost 1.4 points; at a
logit error of 0.05 (8 layers, 0.6% of the weights) the test drop was 0.6, and a ResNet-20 met
it with every layer at 4 bits (0.02, no drop).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from optimization.atomic import atomic_output
from optimization.base import TechniqueNotApplicable
from optimization.backends import pytorch as backend
from optimization.techniques.pytorch._common import (
    PyTorchTechnique,
    drop_unused_initializers,
    file_size,
    int8_options,
    quantize_int8,
    quantize_matmul_4bit,
    weighted_ops,
)

# INT4 tensors (and Cast from them) need ONNX opset 21; onnxruntime runs them since 1.18
INT4_OPSET = 21
# clipping thresholds tried, as fractions of a block's largest absolute weight
CLIP_RATIOS = np.linspace(0.5, 1.0, 26)
FORMS = {"matmul": "MatMulNBits", "conv": "Conv, weight folded at load",
         "qlinear": "QLinearConv/QGemm, int8 activations, weight cast from int4 at load"}
# MatMulNBits blocks are powers of two of at least 16 weights along K
MIN_BLOCK = 16
# the sensitivity search re-evaluates the model once per layer; this bounds it on deep models
SENSITIVITY_EVALUATIONS = 200


class Technique(PyTorchTechnique):
    name = "ptq_int4"
    post_training = True

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
        scheme = options["scheme"]  # one of the catalog's choices: w4a8, w4, fc4_conv8
        deploy, _ = self.paths(config)
        fp32 = deploy.with_suffix(".fp32.onnx")
        progress(0.05, f"exporting FP32 ONNX ({scheme})", {})
        backend.BACKEND.export_deploy(model, fp32)
        try:
            if scheme in ("w4", "w4a8"):
                details = quantize_weights_4bit(fp32, deploy, dataset.x_calib, options, progress,
                                                int8_activations=scheme == "w4a8")
            else:
                details = _fc4_conv8(fp32, deploy, dataset.x_calib, options, progress)
        finally:
            fp32.unlink(missing_ok=True)
        details = {"bits": 4, "scheme": scheme, **details,
                   "native": "FP32 .pt2: the 4-bit model exists only as ONNX"}
        result = self.result(config, model, model.module, details, deploy_written=True)
        result.record(precision="int4", calibration_samples=int(len(dataset.x_calib))).record_weight_bits()
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
        "kept_wider": {name: "8-bit: this scheme keeps convolutions INT8 (QLinearConv) for INT8's speed"
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
    # "matmul": weight [K, N] for MatMulNBits; "conv": the Conv weight, folded at load; "qlinear":
    # a QLinearConv's weight (int8 activations), per output channel
    form: str
    weight: np.ndarray
    bias: np.ndarray | None
    bias_input: int = 8  # "qlinear": where the int32 bias is (QLinearConv 8, QGemm 6)
    versions: dict = field(default_factory=dict)  # bits -> (nodes, initializers)


@dataclass
class _Fidelity:
    """How closely a candidate's logits follow the FP32 model's on the calibration samples."""
    agreement: float  # share of samples with the same top-1 class
    logit_error: float  # mean squared logit change relative to the FP32 logits' mean square

    def meets(self, options: dict) -> bool:
        return self.agreement >= options["min_agreement"] and self.logit_error <= options["max_logit_error"]

    def describe(self) -> str:
        return f"top-1 agreement {self.agreement:.2%}, relative logit error {self.logit_error:.3f}"


def quantize_weights_4bit(fp32_path: Path, out_path: Path, calib_x: np.ndarray, options: dict,
                          progress=lambda *_: None, int8_activations: bool = False) -> dict:
    """Scheme "w4", or "w4a8" with `int8_activations` (see the module docstring), from
    `fp32_path` to `out_path`; returns the run's details: every layer's bits and form, and why
    each layer kept wider stayed so."""
    import onnx
    from onnx import version_converter

    block_size = int(options["block_size"])
    if block_size < MIN_BLOCK or block_size & (block_size - 1):
        raise TechniqueNotApplicable(f"block_size must be a power of two of at least {MIN_BLOCK}, got {block_size}")
    model = onnx.load(str(fp32_path))
    if _default_opset(model) < INT4_OPSET:
        try:
            model = version_converter.convert_version(model, INT4_OPSET)
        except Exception as error:  # the converter raises bare RuntimeErrors/ValueErrors by op
            raise TechniqueNotApplicable(
                f"INT4 weights need ONNX opset {INT4_OPSET}, and onnx could not convert this model from opset "
                f"{_default_opset(model)}: {str(error).splitlines()[0] if str(error) else type(error).__name__}")
    int8_path = out_path.with_suffix(".int8.onnx")
    if int8_activations:
        # activations calibrated as ptq_int8's, per-channel weights; its QLinearConv weights get 4 bits
        source = out_path.with_suffix(f".opset{INT4_OPSET}.onnx")
        onnx.save(model, str(source))
        try:
            int8 = quantize_int8(source, int8_path, calib_x, weight_granularity="per_channel")
        finally:
            source.unlink(missing_ok=True)
        float_weights = {init.name: init for init in model.graph.initializer}
        model = onnx.load(str(int8_path))
        int8_path.unlink()
        layers = _find_qlinear_layers(model, float_weights)
    else:
        layers = _find_layers(model)
    if not layers:
        raise TechniqueNotApplicable("the model has no convolution or fully connected layer with constant weights")
    for layer in layers:
        layer.versions = {bits: _quantized(layer, bits, block_size, int(options["accuracy_level"]))
                          for bits in (4, 8)}
    calib_x = np.asarray(calib_x, dtype=np.float32)
    reference = backend.BACKEND.predict(fp32_path, calib_x)
    signal = float(np.mean(reference ** 2)) or 1.0
    scratch = out_path.with_suffix(".candidate.onnx")

    def measure(bits: dict[str, int]) -> _Fidelity:
        _write(model, layers, bits, scratch)
        logits = backend.BACKEND.predict(scratch, calib_x)
        return _Fidelity(float((logits.argmax(-1) == reference.argmax(-1)).mean()),
                         float(np.mean((logits - reference) ** 2) / signal))

    try:
        progress(0.2, "all layers to 4 bits", {})
        bits = {layer.name: 4 for layer in layers}
        history = [measure(bits)]
        sensitivity: dict[str, float] = {}
        if not history[-1].meets(options):
            progress(0.3, "measuring each layer's sensitivity to 4 bits", {})
            sensitivity = {layer.name: measure({layer.name: 4}).logit_error
                           for layer in layers[:SENSITIVITY_EVALUATIONS]}
            raised = sorted(sensitivity, key=sensitivity.get, reverse=True)
            for step, name in enumerate(raised):
                if history[-1].meets(options):
                    break
                progress(0.3 + 0.6 * step / len(raised), f"{name} back to 8 bits", {})
                bits[name] = 8
                history.append(measure(bits))
        with atomic_output(out_path) as partial:
            _write(model, layers, bits, partial)
    finally:
        scratch.unlink(missing_ok=True)
    details = _details(layers, bits, sensitivity, history, options, len(calib_x))
    if int8_activations:
        details["activations"] = "uint8 per tensor, MinMax calibration (as ptq_int8)"
        details["int8"] = int8
        details["weights"] = "symmetric, MSE-optimal clipping, a float32 scale per output channel"
        details["runtime"] = ("QLinearConv/QGemm read Cast(int4 -> int8) weights, which onnxruntime folds when it "
                              "loads the file: INT8 kernels and speed, INT8 weight memory at run time")
        details["kept_wider"].update({
            node.name: "8-bit: w4a8 gives 4 bits to QLinearConv and QGemm (B transposed) weights only"
            for node in model.graph.node if node.op_type in ("QGemm", "QLinearMatMul", "MatMulInteger")
            and node.name not in details["layers"]})
    return details


def _details(layers, bits, sensitivity, history, options, samples) -> dict:
    by_layer = {}
    for layer in layers:
        entry = {"bits": bits[layer.name], "weights": int(layer.weight.size),
                 "op": FORMS[layer.form]}
        if layer.name in sensitivity:
            entry["logit_error_alone_at_4_bits"] = round(sensitivity[layer.name], 6)
        by_layer[layer.name] = entry
    # the layers raised, in the order they were: history[step] is the model before that step
    raised = sorted((name for name, b in bits.items() if b > 4), key=sensitivity.get, reverse=True)
    target = f"agreement >= {options['min_agreement']:.0%}, error <= {options['max_logit_error']}"
    kept_wider = {
        name: (f"8-bit: with it at 4 bits the model missed the target on the {samples} calibration samples "
               f"({history[step].describe()}; target {target}), and of the layers still 4-bit it moved the "
               f"logits most (alone at 4 bits: relative logit error {sensitivity[name]:.4f})")
        for step, name in enumerate(raised)}
    weights = sum(layer.weight.size for layer in layers)
    return {
        "layers": by_layer,
        "kept_wider": kept_wider,
        "weights_at_4_bits": round(sum(layer.weight.size for layer in layers if bits[layer.name] == 4) / weights, 4),
        "calibration_agreement_with_fp32": round(history[-1].agreement, 4),
        "calibration_logit_error": round(history[-1].logit_error, 5),
        "target": target,
        "weights": f"symmetric, MSE-optimal clipping, a float16 scale per block of up to {options['block_size']} "
                   "weights (whole input channels of one output channel); fully connected: MatMulNBits blocks",
        "activations": "float32 (weight-only quantization)",
        "accuracy_level": int(options["accuracy_level"]),
        "runtime": "fully connected layers: MatMulNBits computes from the packed weights; convolutions: "
                   "onnxruntime folds Mul(Cast(int4), scale) into a float weight when it loads the file "
                   "(it has no 4-bit convolution kernel), so they run at FP32 speed and memory",
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
            layers.append(_Layer(index, name, "conv", weight, bias))
        elif node.op_type == "Gemm" and weight.ndim == 2 and not attrs.get("transA", 0) \
                and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 \
                and (bias is None or bias.shape == (weight.shape[0 if attrs.get("transB", 0) else 1],)):
            layers.append(_Layer(index, name, "matmul", weight.T.copy() if attrs.get("transB", 0) else weight, bias))
        elif node.op_type == "MatMul" and weight.ndim == 2 and bias_name is None:
            layers.append(_Layer(index, name, "matmul", weight, None))
    return layers


def _find_qlinear_layers(model, float_weights: dict) -> list[_Layer]:
    """QLinearConv and QGemm (B transposed, one row per output) nodes with constant int8
    weights, their float weight taken from the FP32 model (onnxruntime's quantizer names the int8
    one `<name>_quantized`), else dequantized."""
    from onnx import helper, numpy_helper

    initializers = {init.name: init for init in model.graph.initializer}
    layers = []
    for index, node in enumerate(model.graph.node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if not (node.op_type == "QLinearConv" or (node.op_type == "QGemm" and attrs.get("transB", 0))) \
                or node.input[3] not in initializers or node.input[4] not in initializers:
            continue
        name = node.input[3].removesuffix("_quantized")
        if name in float_weights:
            weight = numpy_helper.to_array(float_weights[name]).astype(np.float32)
        else:
            scale = numpy_helper.to_array(initializers[node.input[4]]).astype(np.float32)
            weight = numpy_helper.to_array(initializers[node.input[3]]).astype(np.float32)
            weight = weight * scale.reshape(-1, *[1] * (weight.ndim - 1))
        layers.append(_Layer(index, node.name or f"{node.op_type}_{index}", "qlinear", weight, None,
                             bias_input=8 if node.op_type == "QLinearConv" else 6))
    return layers


def symmetric_quantize(groups: np.ndarray, bits: int, scale_dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `groups` to signed `bits`-bit integers with one scale each (stored as
    `scale_dtype`), the clipping threshold chosen per row from CLIP_RATIOS of its largest weight
    for the least squared error. Returns (integers, scales)."""
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    absmax = np.maximum(np.abs(groups).max(axis=1), 1e-6)

    def rounded(scale):
        scale = scale.astype(scale_dtype).astype(np.float32)
        return np.clip(np.rint(groups / scale[:, None]), qmin, qmax), scale

    best_error = np.full(len(groups), np.inf)
    best_scale = absmax / qmax
    for ratio in CLIP_RATIOS:
        q, scale = rounded(absmax * ratio / qmax)
        error = ((q * scale[:, None] - groups) ** 2).sum(axis=1)
        better = error < best_error
        best_error[better], best_scale[better] = error[better], scale[better]
    q, scale = rounded(best_scale)
    return q.astype(np.int8), scale.astype(scale_dtype)


def conv_blocks(weight_shape: tuple, block_size: int) -> int:
    """Input channels per scale for a convolution weight [O, C, kh, kw]: the most whole channels
    that fit in `block_size` weights and split C evenly; all C (one scale per output channel)
    when C fits whole or not even one channel does."""
    channels, per_channel = weight_shape[1], int(np.prod(weight_shape[2:]))
    fit = block_size // per_channel
    if fit >= channels or fit < 1:
        return channels
    return max(b for b in range(1, fit + 1) if channels % b == 0)


def _block_for(k: int, block_size: int) -> int:
    """A MatMulNBits layer's block along K: a whole column when it fits (one scale per output
    channel), padded to the power of two MatMulNBits needs."""
    return min(block_size, max(MIN_BLOCK, 1 << (k - 1).bit_length()))


def _quantized(layer: _Layer, bits: int, block_size: int, accuracy_level: int) -> tuple[list, list]:
    """(nodes, initializers) that replace `layer`'s weight (a convolution's) or node (MatMulNBits)
    with `bits`-bit weights; the last node's output is the weight or the layer's output."""
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    # short tensor names and unnamed helper nodes: on MobileNetV2 long ones made 6% of the file
    p = f"w{layer.index}_{bits}"
    if layer.form == "qlinear":
        if bits == 8:
            return [], []  # the INT8 node as the quantizer wrote it
        q, scale = symmetric_quantize(layer.weight.reshape(layer.weight.shape[0], -1), bits)
        storage = q.reshape(layer.weight.shape).astype(ml_dtypes.int4)
        # Cast(int4 -> int8) has constant input: folded at load, so QLinearConv prepacks an int8 weight
        return ([helper.make_node("Cast", [p], [f"{p}q"], to=TensorProto.INT8)],
                [numpy_helper.from_array(storage, p), numpy_helper.from_array(scale, f"{p}s")])
    if layer.form == "conv":
        out_channels, channels = layer.weight.shape[:2]
        per_block = conv_blocks(layer.weight.shape, block_size)
        blocks = layer.weight.reshape(out_channels, channels // per_block, -1)
        q, scale = symmetric_quantize(blocks.reshape(-1, blocks.shape[-1]), bits, np.float16)
        # stored in the convolution's own shape; the scales apply to it viewed as [O, blocks, block]
        storage = q.reshape(layer.weight.shape).astype(ml_dtypes.int4 if bits == 4 else np.int8)
        initializers = [numpy_helper.from_array(storage, p),
                        numpy_helper.from_array(scale.reshape(out_channels, -1, 1), f"{p}s"),
                        numpy_helper.from_array(np.array(blocks.shape, dtype=np.int64), f"{p}b"),
                        numpy_helper.from_array(np.array(layer.weight.shape, dtype=np.int64), f"{p}k")]
        nodes = [
            helper.make_node("Cast", [p], [f"{p}q"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", [f"{p}q", f"{p}b"], [f"{p}r"]),
            helper.make_node("Cast", [f"{p}s"], [f"{p}f"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{p}r", f"{p}f"], [f"{p}m"]),
            helper.make_node("Reshape", [f"{p}m", f"{p}k"], [f"{p}w"]),
        ]
        return nodes, initializers
    k, n = layer.weight.shape
    block = _block_for(k, block_size)
    blocks = math.ceil(k / block)
    padded = np.zeros((blocks * block, n), dtype=np.float32)
    padded[:k] = layer.weight
    # column-major blocks: [N, blocks, block], as MatMulNBits stores them
    q, scale = symmetric_quantize(padded.T.reshape(n * blocks, block), bits)
    codes = (q.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8).reshape(n, blocks, block)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)  # two per byte, the first in the low nibble
    initializers = [numpy_helper.from_array(codes, p), numpy_helper.from_array(scale, f"{p}s")]
    inputs = [p, f"{p}s"]
    if layer.bias is not None:
        initializers.append(numpy_helper.from_array(layer.bias, f"{p}c"))
        inputs += ["", "", f"{p}c"]
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    nodes = [helper.make_node("MatMulNBits", ["", *inputs], [""], name=f"{layer.name}_matmul{bits}",
                              domain="com.microsoft", **attrs)]
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
        if not version_nodes:
            nodes.append(node)
            continue
        graph.initializer.extend(initializers)
        rebuilt = onnx.NodeProto()
        if layer.form == "qlinear":
            rebuilt.CopyFrom(node)
            _requantize_bias(graph, rebuilt, layer.bias_input, initializers[1])
            rebuilt.input[3], rebuilt.input[4] = version_nodes[0].output[0], initializers[1].name
            nodes += [*version_nodes, rebuilt]
        elif layer.form == "conv":
            rebuilt.CopyFrom(node)
            rebuilt.input[1] = version_nodes[-1].output[0]
            nodes += [*version_nodes, rebuilt]
        else:
            rebuilt.CopyFrom(version_nodes[0])
            rebuilt.input[0], rebuilt.output[0] = node.input[0], node.output[0]
            nodes.append(rebuilt)
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(out, str(path))


def _requantize_bias(graph, node, position: int, new_scale) -> None:
    """A QLinearConv's or QGemm's int32 bias (input `position`) is stored at x_scale * w_scale:
    rescale it to the new weight scale (under its own name, added to `graph`) and point `node`
    at it."""
    from onnx import numpy_helper

    if len(node.input) <= position or not node.input[position]:
        return
    initializers = {init.name: init for init in graph.initializer}
    bias = numpy_helper.to_array(initializers[node.input[position]]).astype(np.float64)
    old_scale = numpy_helper.to_array(initializers[node.input[4]]).astype(np.float64)
    scaled = np.rint(bias * old_scale / numpy_helper.to_array(new_scale).astype(np.float64)).astype(np.int32)
    name = f"{new_scale.name}b"
    graph.initializer.append(numpy_helper.from_array(scaled, name))
    node.input[position] = name
