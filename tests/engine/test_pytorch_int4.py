"""ptq_int4 on a small convnet with every kind of layer MobileNets and ResNets have (3x3,
pointwise and depthwise convolutions, a strided convolution, a fully connected classifier),
trained briefly on digits. Every check reads the saved ONNX file, outside the technique.
Sizes and accuracy on MobileNetV2 and ResNet-20: bench/pytorch_techniques.py, BENCHMARKS.md."""
from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from optimization.backends import pytorch as backend  # noqa: E402
from optimization.catalog import OptionError, validate_options  # noqa: E402
from optimization.base import TechniqueConfig  # noqa: E402
from optimization.datasets import load_digits_preset  # noqa: E402
from optimization.evaluator import accuracy  # noqa: E402
from optimization.graph import load_graph  # noqa: E402
from optimization.techniques.pytorch import ptq_int4, ptq_int8  # noqa: E402


class SmallConvNet(torch.nn.Module):
    def __init__(self, classes: int = 10, width: int = 32):
        super().__init__()
        nn = torch.nn
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 1), nn.BatchNorm2d(width), nn.ReLU(),  # pointwise
            nn.Conv2d(width, width, 3, padding=1, groups=width), nn.ReLU(),  # depthwise
            nn.Conv2d(width, 2 * width, 1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),  # strided 3x3
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def ignore_progress(fraction, message, metrics):
    assert 0.0 <= fraction <= 1.0


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return load_digits_preset(tmp_path_factory.mktemp("preset"), "NCHW")


@pytest.fixture(scope="module")
def convnet(digits, tmp_path_factory):
    backend.set_seed(0)
    module = SmallConvNet(digits.num_classes)
    backend.train(module, digits, 10, 3e-3, lambda *_: None, cosine=True)
    path = backend.save_pt2(module, digits.input_shape, tmp_path_factory.mktemp("model") / "convnet.pt2")
    return backend.BACKEND.load(path)


@pytest.fixture(scope="module")
def fp32(convnet, digits, tmp_path_factory):
    path = backend.BACKEND.export_deploy(convnet, tmp_path_factory.mktemp("fp32") / "fp32.onnx")
    return {"path": path, "accuracy": accuracy(backend.BACKEND, path, digits.x_test, digits.y_test)}


@pytest.fixture(scope="module")
def schemes(convnet, digits, tmp_path_factory):
    """Each scheme run once: the default w4a8 (int8 activations) and weight-only w4."""
    cache = {}

    def run(scheme):
        if scheme not in cache:
            config = TechniqueConfig(tmp_path_factory.mktemp(scheme), {"scheme": scheme})
            cache[scheme] = ptq_int4.Technique().optimize(convnet, config, digits, ignore_progress)
        return cache[scheme]

    return run


@pytest.fixture(scope="module")
def int4(schemes):
    return schemes("w4")


@pytest.fixture(scope="module")
def int8(convnet, digits, tmp_path_factory):
    return ptq_int8.Technique().optimize(convnet, TechniqueConfig(tmp_path_factory.mktemp("int8")), digits,
                                         ignore_progress)


def nodes_and_initializers(path):
    import onnx

    graph = onnx.load(str(path)).graph
    return list(graph.node), list(graph.initializer)


@pytest.mark.parametrize("scheme", ["w4a8", "w4"])
def test_int4_file_runs_in_onnxruntime_within_a_point_of_fp32(scheme, schemes, fp32, digits):
    assert fp32["accuracy"] > 0.9
    measured = accuracy(backend.BACKEND, schemes(scheme).artifacts["deploy"], digits.x_test, digits.y_test)
    assert measured >= fp32["accuracy"] - 0.01


def test_default_int4_is_int8_kernels_reading_weights_stored_in_4_bits(schemes, tmp_path):
    """w4a8: every QLinearConv's weight is a Cast of an INT4 initializer (or its INT8 weight where
    it stayed 8-bit, as the details say), and onnxruntime folds the Casts when it loads the file,
    so the INT8 kernels get constant int8 weights."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto

    result = schemes("w4a8")
    assert result.details["scheme"] == "w4a8"
    nodes, initializers = nodes_and_initializers(result.artifacts["deploy"])
    types = {init.name: init.data_type for init in initializers}
    cast_from = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Cast"}
    weighted = [n for n in nodes if n.op_type in ("QLinearConv", "QGemm")]
    assert len(weighted) == 6  # five convolutions and the classifier
    stored = {n.name: 4 if types.get(cast_from.get(n.input[3])) == TensorProto.INT4 else 8 for n in weighted}
    assert stored == {name: layer["bits"] for name, layer in result.details["layers"].items()}
    assert 4 in stored.values() and result.details["weights_at_4_bits"] >= 0.8

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(result.artifacts["deploy"]), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph
    assert "Cast" not in {n.op_type for n in optimized.node}
    constants = {init.name for init in optimized.initializer}
    assert all(n.input[3] in constants for n in optimized.node if n.op_type in ("QLinearConv", "QGemm"))


@pytest.mark.parametrize("scheme", ["w4a8", "w4"])
def test_int4_file_is_far_smaller_than_int8_and_fp32(scheme, schemes, int8, fp32):
    size = os.path.getsize(schemes(scheme).artifacts["deploy"])
    # ~0.5 byte per weight plus a scale per channel against INT8's 1 byte: about 0.55x on this
    # model; its graph and per-channel overhead weigh more than on MobileNetV2/ResNet-20 (>= 6x, bench/)
    assert size <= 0.65 * os.path.getsize(int8.artifacts["deploy"])
    assert size <= os.path.getsize(fp32["path"]) / 5


def test_the_analyzer_counts_the_default_int4_file_as_int8_kernels_with_4_bit_weights(schemes, fp32):
    quantized, source = load_graph(schemes("w4a8").artifacts["deploy"]), load_graph(fp32["path"])
    assert (quantized.params, quantized.macs) == (source.params, source.macs)
    assert quantized.precision == "int8"
    assert 4 in {op.weight_bits for op in quantized.ops if op.op_type == "QLinearConv"}


def test_w4_convolutions_and_the_classifier_store_4_bit_weights_as_the_details_say(int4):
    from onnx import TensorProto, helper

    nodes, initializers = nodes_and_initializers(int4.artifacts["deploy"])
    layers = int4.details["layers"].values()
    # the classifier runs in onnxruntime's n-bit kernel...
    matmul_bits = [helper.get_attribute_value(a) for n in nodes if n.op_type == "MatMulNBits"
                   for a in n.attribute if a.name == "bits"]
    assert matmul_bits == [e["bits"] for e in layers if e["op"] == "MatMulNBits"]
    # ...and the five convolutions (3x3, pointwise, depthwise, strided) store INT4 (or INT8) weights
    conv_bits = sorted(e["bits"] for e in layers if e["op"] == "Conv, weight folded at load")
    stored = sorted(4 if init.data_type == TensorProto.INT4 else 8 for init in initializers
                    if init.data_type in (TensorProto.INT4, TensorProto.INT8))
    assert stored == conv_bits and len(conv_bits) == 5
    assert not any(init.data_type == TensorProto.FLOAT and len(init.dims) == 4 for init in initializers)
    # the big strided convolution holds most weights: most of the model is 4-bit whatever stays wider
    assert int4.details["weights_at_4_bits"] >= 0.8


def test_w4_onnxruntime_folds_the_4_bit_weights_into_float_convolutions_when_it_loads(int4, tmp_path):
    """What keeps the file at FP32 speed: no Cast/Mul runs per call, the convolutions get constant
    weights (and with them the NCHWc kernels)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(int4.artifacts["deploy"]), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph
    constants = {init.name for init in optimized.initializer}
    assert not {n.op_type for n in optimized.node} & {"Cast", "Mul", "DequantizeLinear"}
    convolutions = [n for n in optimized.node if n.op_type in ("Conv", "FusedConv")]
    assert len(convolutions) == 5 and all(n.input[1] in constants for n in convolutions)


def test_w4_details_list_each_layers_bits_and_form(int4):
    details = int4.details
    layers = details["layers"]
    assert len(layers) == 6
    assert {entry["bits"] for entry in layers.values()} <= {4, 8}
    forms = sorted(entry["op"] for entry in layers.values())
    assert forms == ["Conv, weight folded at load"] * 5 + ["MatMulNBits"]
    assert details["kept_wider"].keys() == {name for name, e in layers.items() if e["bits"] > 4}
    assert details["calibration_agreement_with_fp32"] >= 0.99
    assert details["calibration_logit_error"] <= 0.05


def test_the_analyzer_counts_the_w4_file_like_its_fp32_source_stored_small_computed_float(int4, fp32):
    quantized, source = load_graph(int4.artifacts["deploy"]), load_graph(fp32["path"])
    assert (quantized.params, quantized.macs) == (source.params, source.macs)
    convolutions = [op for op in quantized.ops if op.op_type == "Conv"]
    assert len(convolutions) == 5 and {op.weight_bits for op in convolutions} <= {4, 8}
    # onnxruntime folds these weights to float at load: the estimator must cost float kernels
    assert {op.precision for op in convolutions} == {"fp32"} and quantized.precision == "fp32"
    assert sum(op.weight_bytes for op in quantized.ops) < sum(op.weight_bytes for op in source.ops) / 5


def test_matmulnbits_computes_the_product_with_the_dequantized_weights(tmp_path):
    """The packed layout (blocks along K per output column, low nibble first) read back by
    onnxruntime equals x @ dequantized W, also where K is no multiple of the block."""
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 24)).eval()
    path = backend.export_onnx(module, (40,), tmp_path / "fc.onnx")
    x = np.random.default_rng(0).normal(size=(5, 40)).astype(np.float32)
    out = tmp_path / "fc4.onnx"
    ptq_int4.quantize_weights_4bit(path, out, x, {**validate_options("ptq_int4", "pytorch", {}), "block_size": 32,
                                                  "min_agreement": 0.0, "max_logit_error": 1e9, "accuracy_level": 0})

    weight = module[1].weight.detach().numpy().T  # [K, N]
    padded = np.zeros((64, 24), dtype=np.float32)
    padded[:40] = weight
    q, scale = ptq_int4.symmetric_quantize(padded.T.reshape(24 * 2, 32), 4)
    dequantized = (q * scale[:, None]).reshape(24, 64)[:, :40].T
    expected = x @ dequantized + module[1].bias.detach().numpy()
    np.testing.assert_allclose(backend.BACKEND.predict(out, x), expected, rtol=1e-4, atol=1e-5)


def test_mse_clipping_rounds_no_worse_than_the_largest_weight_scale():
    rng = np.random.default_rng(0)
    groups = rng.standard_t(3, size=(64, 64)).astype(np.float32)  # heavy tails, as trained weights
    q, scale = ptq_int4.symmetric_quantize(groups, 4)
    error = ((q * scale[:, None] - groups) ** 2).sum(1)
    absmax_scale = np.abs(groups).max(1) / 7
    absmax_q = np.clip(np.rint(groups / absmax_scale[:, None]), -8, 7)
    absmax_error = ((absmax_q * absmax_scale[:, None] - groups) ** 2).sum(1)
    assert np.all(error <= absmax_error + 1e-9)
    assert error.sum() < 0.9 * absmax_error.sum()
    assert q.min() >= -8 and q.max() <= 7


def test_layers_go_back_to_8_bits_most_sensitive_first_until_the_agreement_holds(convnet, digits, tmp_path):
    """Calibrated on noise, where many logits sit near a decision boundary, 4-bit weights flip
    some predictions: the most sensitive layers return to 8 bits, in order, until the model agrees
    with FP32 on every calibration sample within the logit error (or every layer is 8-bit)."""
    fp32 = backend.BACKEND.export_deploy(convnet, tmp_path / "fp32.onnx")
    noise = np.random.default_rng(0).uniform(0, 1, size=(128, *digits.input_shape)).astype(np.float32)
    details = ptq_int4.quantize_weights_4bit(fp32, tmp_path / "int4.onnx", noise,
                                             {**validate_options("ptq_int4", "pytorch", {}), "min_agreement": 1.0})
    kept, layers = details["kept_wider"], details["layers"]
    assert kept, "all-4-bit weights met the target on every noise sample: the test needs a harder input"
    assert all("missed the target" in why for why in kept.values())
    sensitivity = {name: entry["logit_error_alone_at_4_bits"] for name, entry in layers.items()}
    assert list(kept) == sorted(sensitivity, key=sensitivity.get, reverse=True)[:len(kept)]
    met = details["calibration_agreement_with_fp32"] == 1.0 and details["calibration_logit_error"] <= 0.05
    assert met or len(kept) == len(layers)
    assert all(layers[name]["bits"] == 8 for name in kept)


def test_unknown_scheme_or_block_size_fails_the_run_with_the_choices(convnet, digits, tmp_path):
    with pytest.raises(OptionError, match="w4a8"):
        ptq_int4.Technique().optimize(convnet, TechniqueConfig(tmp_path, {"scheme": "int3"}), digits, ignore_progress)
    with pytest.raises(OptionError, match="16, 32, 64"):
        ptq_int4.Technique().optimize(convnet, TechniqueConfig(tmp_path, {"block_size": 24}), digits, ignore_progress)
