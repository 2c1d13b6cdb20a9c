"""The PyTorch backend: every upload format loads (safely), exports to ONNX that onnxruntime
runs with any batch size, and the demo model trains to a useful accuracy."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from optimization.backends import pytorch as backend  # noqa: E402
from optimization.evaluator import accuracy  # noqa: E402
from optimization.base import InvalidInputError, UnsafeModelError  # noqa: E402
from optimization.datasets import load_digits_preset  # noqa: E402
from optimization.zoo.pytorch import build  # noqa: E402


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return load_digits_preset(tmp_path_factory.mktemp("preset"), "NCHW")


@pytest.fixture(scope="module")
def demo_pt2(digits, tmp_path_factory):
    return backend.BACKEND.train_demo_model(digits, tmp_path_factory.mktemp("demo") / "digits_cnn.pt2")


def test_demo_model_reaches_95_percent_in_onnxruntime(demo_pt2, digits, tmp_path):
    model = backend.BACKEND.load(demo_pt2)
    onnx_path = backend.BACKEND.export_deploy(model, tmp_path / "demo.onnx")
    assert accuracy(backend.BACKEND, onnx_path, digits.x_test, digits.y_test) >= 0.95


def test_pt2_saved_by_edgeopt_loads_back_as_the_zoo_module(demo_pt2):
    model = backend.BACKEND.load(demo_pt2)
    assert model.input_shape == (1, 8, 8)
    assert model.num_classes == 10 and model.architecture == "digits_cnn"
    assert any(isinstance(m, torch.nn.Conv2d) for m in model.module.modules())  # prunable, not a flat graph


def test_foreign_pt2_loads_as_a_graph_with_the_signature_input_shape(tmp_path):
    module = build("resnet_small", 4, 3).eval()
    torch.export.save(torch.export.export(module, (torch.randn(1, 3, 16, 16),)), tmp_path / "foreign.pt2")
    model = backend.BACKEND.load(tmp_path / "foreign.pt2")
    assert model.input_shape == (3, 16, 16) and model.num_classes == 4
    sample = torch.randn(1, 3, 16, 16)
    assert torch.allclose(model.module(sample), module(sample), atol=1e-5)


def test_pt2_whose_architecture_record_does_not_fit_its_weights_loads_as_the_exported_graph(tmp_path):
    import json

    module = build("digits_cnn", 10, 1).eval()
    program = torch.export.export(module, (torch.zeros(2, 1, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    forged = {"name": "digits_cnn", "num_classes": 10, "kwargs": {"width": 10**6}}
    torch.export.save(program, tmp_path / "forged.pt2",
                      extra_files={backend.ARCHITECTURE_EXTRA_FILE: json.dumps(forged)})
    model = backend.BACKEND.load(tmp_path / "forged.pt2")
    assert model.architecture is None
    sample = torch.randn(3, 1, 8, 8)
    assert torch.allclose(model.module(sample), module(sample), atol=1e-5)


@pytest.mark.slow
def test_torchscript_needs_an_input_shape_and_then_matches_the_original(tmp_path):
    module = build("digits_cnn", 10, 1).eval()
    torch.jit.save(torch.jit.trace(module, torch.zeros(2, 1, 8, 8)), tmp_path / "m.pt")
    with pytest.raises(InvalidInputError, match="input_shape"):
        backend.BACKEND.load(tmp_path / "m.pt")
    model = backend.BACKEND.load(tmp_path / "m.pt", input_shape=(1, 8, 8))
    onnx_path = backend.BACKEND.export_deploy(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    assert np.allclose(backend.BACKEND.predict(onnx_path, x), module(torch.from_numpy(x)).detach().numpy(), atol=1e-4)


def test_a_torchscript_layer_scale_stays_a_parameter_so_channel_pruning_narrows_it(tmp_path):
    """ConvNeXt's layer scale is a parameter that no conv/linear op owns; the TorchScript ->
    torch.export converter made it a buffer, so it was neither trained nor pruned with its
    channels and a ConvNeXt .pt's channel pruning was skipped ('size of tensor a (20) must
    match ... (40)')."""
    from optimization.techniques.pytorch._common import prune_channels
    from tests.engine.test_onnx_exports import LayerScaleBlock

    torch.manual_seed(0)
    module = LayerScaleBlock().eval()
    torch.jit.save(torch.jit.trace(module, torch.zeros(2, 1, 8, 8)), tmp_path / "block.pt")
    model = backend.BACKEND.load(tmp_path / "block.pt", input_shape=(1, 8, 8))

    assert any(parameter.shape == (32, 1, 1) for parameter in model.module.parameters())  # trainable
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(model.module(x), module(x), atol=1e-5)
    pruned, _ = prune_channels(model.module, (1, 8, 8), 0.5, round_to=None)
    assert pruned(x).shape == (3, 10)
    assert any(parameter.shape == (16, 1, 1) for parameter in pruned.parameters())  # the layer scale, halved


class CastingLinear(torch.nn.Linear):
    """timm's Linear: under torch.jit.script it casts its weights to the input's dtype."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(dtype=x.dtype), self.bias.to(dtype=x.dtype))


def test_a_scripted_linear_that_casts_its_weights_becomes_a_layer_channel_pruning_narrows(tmp_path):
    """The TorchScript -> torch.export converter reads such a layer as aten.linear of
    to(weight) behind an _assert_tensor_metadata(weight): the classifier stayed a functional op
    and a scripted timm MobileNetV3's channel pruning failed ('index 1024 is out of bounds')."""
    from optimization.techniques.pytorch._common import prune_channels

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
                                 torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), CastingLinear(32, 10)).eval()
    torch.jit.save(torch.jit.script(module), tmp_path / "casting.pt")

    model = backend.BACKEND.load(tmp_path / "casting.pt", input_shape=(1, 8, 8))

    assert model.preparation["modules"] == {"Conv2d": 1, "Linear": 1}
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(model.module(x), module(x), atol=1e-5)
    pruned, _ = prune_channels(model.module, (1, 8, 8), 0.5, round_to=None)
    assert pruned(x).shape == (3, 10)
    assert [tuple(p.shape) for p in pruned.parameters() if p.ndim == 2] == [(10, 16)]  # the classifier, narrowed


def test_scripted_control_flow_torch_export_cannot_convert_runs_as_its_onnx_export_post_training_only(digits,
                                                                                                        tmp_path):
    """torch.jit.script keeps loops and branches on a tensor's value, which the TorchScript ->
    torch.export converter fails on (the run failed with 'TS2EPConverter failed for node
    prim::Loop', or for the branch 'RuntimeError when making fake tensor call'). Such a file
    runs from its ONNX export (Loop/If nodes); training is not
    possible and the reason says so. INT4 must keep the weights the If/Loop bodies read: it
    dropped them as unused ('Nodes in a graph must be topologically sorted')."""
    from optimization.base import TechniqueConfig
    from optimization.techniques.pytorch.ptq_int4 import Technique
    from tests.foreign import LoopingCNN

    torch.manual_seed(0)
    module = LoopingCNN(in_channels=1).eval()
    torch.jit.save(torch.jit.script(module), tmp_path / "looping.pt")

    model = backend.BACKEND.load(tmp_path / "looping.pt", input_shape=(1, 8, 8))

    assert not model.trainable and "TorchScript" in model.not_trainable_reason
    assert "torchscript" in model.preparation
    x = digits.x_test[:20]
    expected = module(torch.from_numpy(x)).detach().numpy()
    deploy = backend.BACKEND.export_deploy(model, tmp_path / "baseline.onnx")
    assert np.allclose(backend.BACKEND.predict(deploy, x), expected, atol=1e-4)
    assert np.allclose(backend.BACKEND.predict(deploy, x * 255.0), expected, atol=1e-4)  # the other branch
    result = Technique().optimize(model, TechniqueConfig(tmp_path / "int4", {}), digits, lambda *_: None)
    int4 = backend.BACKEND.predict(result.artifacts["deploy"], x)
    assert (int4.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


def test_state_dict_loads_into_the_named_architecture_with_classes_inferred(tmp_path):
    module = build("mobilenet_v2", 7, 3)
    torch.save(module.state_dict(), tmp_path / "weights.pth")
    with pytest.raises(InvalidInputError, match="architecture"):
        backend.BACKEND.load(tmp_path / "weights.pth")
    model = backend.BACKEND.load(tmp_path / "weights.pth", architecture="mobilenet_v2")
    assert model.num_classes == 7 and model.input_shape == (3, 32, 32)
    with pytest.raises(InvalidInputError, match="does not match"):
        backend.BACKEND.load(tmp_path / "weights.pth", architecture="resnet_small")


def test_pickled_whole_model_is_refused_with_what_to_upload_instead(tmp_path):
    torch.save(build("digits_cnn", 10, 1), tmp_path / "whole.pth")
    with pytest.raises(UnsafeModelError, match=r"torch\.export.*TorchScript.*state_dict"):
        backend.BACKEND.load(tmp_path / "whole.pth", architecture="digits_cnn")


def test_an_onnx_upload_becomes_a_trainable_module_giving_onnxruntimes_logits(demo_pt2, digits, tmp_path):
    exported = backend.BACKEND.export_deploy(backend.BACKEND.load(demo_pt2), tmp_path / "up.onnx")
    model = backend.BACKEND.load(exported)

    assert model.trainable and model.input_shape == (1, 8, 8) and model.num_classes == 10
    assert model.preparation["pytorch_form"]["converter"] == "onnx2torch"
    assert np.allclose(backend.predict_torch(model.module, digits.x_test[:50]),
                       backend.BACKEND.predict(exported, digits.x_test[:50]), atol=1e-4)
    copy = backend.BACKEND.export_deploy(model, tmp_path / "copy.onnx")
    assert backend.BACKEND.predict(copy, digits.x_test[:300]).shape == (300, 10)
    assert backend.BACKEND.latency_ms(copy, digits.x_test[0]) > 0


def test_an_onnx_upload_onnx2torch_cannot_convert_is_post_training_only_and_says_why(demo_pt2, digits, tmp_path):
    from optimization.techniques.pytorch._common import quantize_int8

    exported = backend.BACKEND.export_deploy(backend.BACKEND.load(demo_pt2), tmp_path / "up.onnx")
    quantized = tmp_path / "int8.onnx"
    quantize_int8(exported, quantized, digits.x_calib[:64], weight_granularity="per_tensor")  # QLinearConv

    model = backend.BACKEND.load(quantized)

    assert not model.trainable
    assert "onnx2torch" in model.preparation["training"]
    assert backend.BACKEND.predict(backend.BACKEND.export_deploy(model, tmp_path / "copy.onnx"),
                                   digits.x_test[:10]).shape == (10, 10)


def test_native_save_round_trips(demo_pt2, digits, tmp_path):
    model = backend.BACKEND.load(demo_pt2)
    again = backend.BACKEND.load(backend.BACKEND.save_native(model, tmp_path / "again.pt2"))
    assert np.allclose(backend.predict_torch(again.module, digits.x_test[:20]),
                       backend.predict_torch(model.module, digits.x_test[:20]), atol=1e-5)


def test_mac_counter_counts_convolutions_and_linear_layers():
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10))
    params, macs = backend.count_params_macs(conv, (1, 8, 8))
    assert params == 4 * 9 + 4 + 256 * 10 + 10
    assert macs == 8 * 8 * 4 * 9 + 256 * 10
