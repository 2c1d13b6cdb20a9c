"""ModelAnalyzer on real deploy files: counts checked against hand arithmetic.

The hand-counted network (both frameworks): 16x16x3 input
  conv 3x3, 3->8, pad same, + ReLU   params 3*3*3*8 + 8 = 224   MACs 16*16*8 * 27 = 55 296
  depthwise 3x3 on 8 channels + ReLU params 9*8 + 8     = 80    MACs 16*16*8 * 9  = 18 432
  conv 1x1, 8->16                    params 8*16 + 16   = 144   MACs 16*16*16 * 8 = 32 768
  global average pool, dense 16->10  params 16*10 + 10  = 170   MACs 10 * 16      = 160
  total                                                   618         106 656
"""
from __future__ import annotations


import numpy as np
import pytest

from optimization.analyzer import SMALL_LAYER_PARAMS, analyze
from optimization.graph import KERNEL_CLASSES, load_graph, peak_activation_bytes

HAND_PARAMS = 224 + 80 + 144 + 170
HAND_MACS = 55_296 + 18_432 + 32_768 + 160
HAND_KINDS = ["conv", "depthwise", "conv1x1", "pool", "fc"]



def torch_net(with_batchnorm: bool = False):
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8) if with_batchnorm else nn.Identity()
            self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pointwise = nn.Conv2d(8, 16, 1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = torch.relu(self.bn(self.conv(x)))
            x = torch.relu(self.depthwise(x))
            return self.fc(self.pointwise(x).mean((2, 3)))

    return Net().eval()


def export_onnx(module, path):
    import torch

    torch.onnx.export(module, (torch.randn(1, 3, 16, 16),), str(path), dynamo=True, external_data=False)
    return path


def keras_net():
    from optimization.backends.tensorflow import keras  # the engine's Keras (tf_keras)

    layers = keras.layers
    # non-zero biases: the TFLite converter drops all-zero bias tensors
    return keras.Sequential([
        keras.Input((16, 16, 3)),
        layers.Conv2D(8, 3, padding="same", activation="relu", bias_initializer="ones"),
        layers.DepthwiseConv2D(3, padding="same", activation="relu", bias_initializer="ones"),
        layers.Conv2D(16, 1, bias_initializer="ones"),
        layers.GlobalAveragePooling2D(),
        layers.Dense(10, bias_initializer="ones"),
    ])


def to_tflite(model, path, int8: bool = False):
    from optimization.backends.tensorflow import convert_to_tflite

    calibration = np.random.default_rng(0).random((8, 16, 16, 3), dtype=np.float32) if int8 else None
    return convert_to_tflite(model, path, calibration)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("analyzer")
    model = keras_net()
    return {
        "onnx": export_onnx(torch_net(), folder / "net.onnx"),
        "onnx_bn": export_onnx(torch_net(with_batchnorm=True), folder / "net_bn.onnx"),
        "tflite": to_tflite(model, folder / "net.tflite"),
        "tflite_int8": to_tflite(model, folder / "net_int8.tflite", int8=True),
        "keras_model": model,
        "folder": folder,
    }


@pytest.mark.parametrize("kind", ["onnx", "tflite"])
def test_params_and_macs_match_the_hand_count(files, kind):
    analysis = analyze(files[kind])
    assert analysis["params"] == HAND_PARAMS
    assert analysis["macs"] == HAND_MACS
    assert [layer["type"] for layer in analysis["layers"]] == HAND_KINDS
    assert {layer["type"] for layer in analysis["layers"]} <= set(KERNEL_CLASSES)
    assert [layer["macs"] for layer in analysis["layers"] if layer["macs"]] == [55_296, 18_432, 32_768, 160]


def test_layers_carry_output_shape_and_activation_bytes(files):
    layers = analyze(files["tflite"])["layers"]
    assert layers[0]["output_shape"] == [1, 16, 16, 8]
    assert layers[0]["activation_bytes"] == 16 * 16 * 8 * 4
    assert layers[-1]["output_shape"] == [1, 10]


def test_input_shape_is_the_files_own_layout(files):
    assert analyze(files["onnx"])["input_shape"] == [1, 3, 16, 16]
    assert analyze(files["tflite"])["input_shape"] == [1, 16, 16, 3]


def test_conv_batchnorm_relu_is_one_fused_kernel(files):
    plain, with_bn = analyze(files["onnx"]), analyze(files["onnx_bn"])
    assert len(with_bn["layers"]) == len(plain["layers"])
    first = with_bn["layers"][0]
    assert first["type"] == "conv" and "Relu" in first["fused"]


def test_tflite_fused_activation_is_recorded(files):
    assert analyze(files["tflite"])["layers"][1]["fused"] == ["RELU"]


def test_int8_tflite_reports_int8_kernels_and_one_byte_weights(files):
    fp32, int8 = analyze(files["tflite"]), analyze(files["tflite_int8"])
    assert int8["precision"] == "int8" and fp32["precision"] == "fp32"
    conv = next(layer for layer in int8["layers"] if layer["type"] == "conv")
    assert conv["precision"] == "int8"
    # int8 weights plus int32 bias: 216 + 8 * 4 bytes
    assert conv["weight_bytes"] == 216 + 8 * 4
    assert int8["weight_bytes"] < fp32["weight_bytes"] / 2
    assert int8["params"] == fp32["params"]


@pytest.mark.parametrize("weight_type, precision, conv_weight_bytes", [
    ("QInt8", "int8", 216 + 8 * 4),  # int8 weights, int32 bias
    ("QInt4", "int4", 216 // 2 + 8 * 4),  # int4 weights packed two per byte
])
def test_qdq_onnx_reports_the_quantized_precision_and_storage_width(files, tmp_path, weight_type, precision,
                                                                      conv_weight_bytes):
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    input_name = onnx.load(str(files["onnx"])).graph.input[0].name
    rng = np.random.default_rng(0)

    class Reader(CalibrationDataReader):
        batches = iter([{input_name: rng.random((1, 3, 16, 16), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.batches, None)

    quantized = tmp_path / f"net_{precision}.onnx"
    quantize_static(str(files["onnx"]), str(quantized), Reader(), quant_format=QuantFormat.QDQ,
                    weight_type=getattr(QuantType, weight_type), activation_type=QuantType.QUInt8)
    analysis = analyze(quantized)
    weighted = [layer for layer in analysis["layers"] if layer["type"] in ("conv", "depthwise", "conv1x1", "fc")]
    assert [layer["precision"] for layer in weighted] == [precision] * 4
    assert weighted[0]["weight_bytes"] == conv_weight_bytes
    assert (analysis["params"], analysis["macs"]) == (HAND_PARAMS, HAND_MACS)


def test_matmulnbits_weights_are_stored_at_four_bits(tmp_path):
    import onnx
    import torch
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    module = torch.nn.Sequential(torch.nn.Linear(64, 128, bias=False)).eval()
    fp32 = tmp_path / "fc.onnx"
    # a 3-D input exports as MatMul (2-D would be Gemm, which MatMulNBits does not take)
    torch.onnx.export(module, (torch.randn(1, 4, 64),), str(fp32), dynamo=True, external_data=False)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32)), block_size=32, is_symmetric=True)
    quantizer.process()
    int4 = tmp_path / "fc_int4.onnx"
    quantizer.model.save_model_to_file(str(int4))
    layer = next(layer for layer in analyze(int4)["layers"] if layer["op_type"] == "MatMulNBits")
    assert layer["precision"] == "int4"
    assert layer["params"] == 64 * 128
    assert layer["weight_bytes"] == 64 * 128 // 2
    assert layer["macs"] == 4 * 64 * 128


def test_bottlenecks_name_the_heaviest_layers_and_the_small_ones(files):
    analysis = analyze(files["tflite"])
    by_kind = {}
    for item in analysis["bottlenecks"]:
        by_kind.setdefault(item["kind"], []).append(item)
    assert by_kind["most_macs"][0]["layer"] == analysis["layers"][0]["name"]
    assert by_kind["most_params"][0]["params"] == 224
    small = {item["layer"] for item in by_kind["too_small_to_quantize"]}
    assert small == {layer["name"] for layer in analysis["layers"] if 0 < layer["params"] < SMALL_LAYER_PARAMS
                     and layer["type"] != "pool"}


def test_ops_without_int8_kernels_name_the_runtime(tmp_path):
    import torch

    class WithSoftmax(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            return torch.softmax(self.fc(x), dim=-1)

    path = tmp_path / "softmax.onnx"
    torch.onnx.export(WithSoftmax().eval(), (torch.randn(1, 8),), str(path), dynamo=True, external_data=False)
    flagged = [b for b in analyze(path)["bottlenecks"] if b["kind"] == "no_int8_kernel"]
    assert [b["op_type"] for b in flagged] == ["Softmax"]
    assert flagged[0]["runtime"] == "onnxruntime" and "ONNX Runtime" in flagged[0]["reason"]


def test_peak_activation_is_the_largest_live_set(files):
    # input 3072 B + conv out 8192 B; then 8192 + 8192; then pointwise 8192 in + 16384 out
    assert peak_activation_bytes(load_graph(files["tflite"])) == 8192 + 16384


def test_keras_file_is_analysed_through_its_tflite_export(files):
    path = files["folder"] / "net.keras"
    files["keras_model"].save(path)
    analysis = analyze(path)
    assert analysis["format"] == "tflite"
    assert (analysis["params"], analysis["macs"]) == (HAND_PARAMS, HAND_MACS)


def test_pt2_file_is_analysed_through_its_onnx_export(files):
    from optimization.backends.pytorch import save_pt2

    path = save_pt2(torch_net(), (3, 16, 16), files["folder"] / "net.pt2")
    analysis = analyze(path)
    assert analysis["format"] == "onnx"
    assert (analysis["params"], analysis["macs"]) == (HAND_PARAMS, HAND_MACS)


def test_unreadable_suffix_is_refused(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"0")
    with pytest.raises(ValueError, match=".onnx or .tflite"):
        analyze(path)


def test_qoperator_onnx_shapes_follow_through_onnxruntime_contrib_operators(tmp_path):
    """A QOperator file holds com.microsoft operators (QLinearConcat, QLinearAveragePool,
    QLinearAdd, QLinearSigmoid, QLinearGlobalAveragePool, QGemm) that ONNX shape inference stops
    at; the layers after them must still get their shapes, so the MAC count matches FP32's."""
    import onnx
    import torch
    from torch import nn

    from optimization.techniques.pytorch._common import quantize_int8

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.wide, self.narrow = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
            self.pool = nn.AvgPool2d(2)
            self.mix = nn.Conv2d(16, 16, 1)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = self.pool(torch.cat([torch.relu(self.wide(x)), torch.relu(self.narrow(x))], 1))
            x = torch.sigmoid(self.mix(x) + x)
            return self.fc(nn.functional.adaptive_avg_pool2d(x, 1).flatten(1))

    fp32 = export_onnx(Branchy().eval(), tmp_path / "branchy.onnx")
    quantized = tmp_path / "branchy_int8.onnx"
    calibration = np.random.default_rng(0).random((8, 3, 16, 16), dtype=np.float32)
    quantize_int8(fp32, quantized, calibration, quant_format="qoperator", weight_granularity="per_channel")
    contrib = {node.op_type for node in onnx.load(str(quantized)).graph.node if node.domain == "com.microsoft"}
    assert {"QLinearConcat", "QLinearAveragePool", "QLinearAdd", "QGemm"} <= contrib
    graph = load_graph(quantized)
    assert all(op.output_shape for op in graph.ops)
    assert (graph.params, graph.macs) == (load_graph(fp32).params, load_graph(fp32).macs)
    assert {op.precision for op in graph.ops if op.op_type.startswith("QLinear") or op.op_type == "QGemm"} == {"int8"}
