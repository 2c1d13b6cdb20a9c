"""The seven PyTorch techniques on the digits demo model, with 1-2 epochs of fine-tuning.
Every check re-runs the saved ONNX file in onnxruntime, outside the technique."""
from __future__ import annotations

import importlib
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from optimization.backends import pytorch as backend  # noqa: E402
from optimization.evaluator import accuracy  # noqa: E402
from optimization.base import (  # noqa: E402
    TECHNIQUES,
    ExperimentStopped,
    TechniqueConfig,
    TechniqueNotApplicable,
)
from optimization.catalog import TECHNIQUE_SPECS, OptionError  # noqa: E402
from optimization.datasets import load_digits_preset  # noqa: E402
from optimization.graph import load_graph  # noqa: E402

FAST_OPTIONS = {
    "prune_unstructured": {"epochs": 1},
    "prune_structured": {"epochs": 2},
    "distillation": {"epochs": 2},
    "qat": {"epochs": 1},
    "hybrid": {"epochs": 2},
}


def technique(name):
    return importlib.import_module(f"optimization.techniques.pytorch.{name}").Technique()


def ignore_progress(fraction, message, metrics):
    assert 0.0 <= fraction <= 1.0


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return load_digits_preset(tmp_path_factory.mktemp("preset"), "NCHW")


@pytest.fixture(scope="module")
def teacher(digits, tmp_path_factory):
    return backend.BACKEND.load(backend.train_demo_model(digits, tmp_path_factory.mktemp("demo") / "digits_cnn.pt2"))


@pytest.fixture(scope="module")
def baseline(teacher, digits, tmp_path_factory):
    path = backend.BACKEND.export_deploy(teacher, tmp_path_factory.mktemp("baseline") / "baseline.onnx")
    return {"path": path, "size": os.path.getsize(path),
            "accuracy": accuracy(backend.BACKEND, path, digits.x_test, digits.y_test)}


@pytest.fixture(scope="module")
def run(teacher, digits, tmp_path_factory):
    """Each technique runs once per module; tests share the result."""
    cache = {}

    def run_technique(name, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            config = TechniqueConfig(tmp_path_factory.mktemp(name), {**FAST_OPTIONS.get(name, {}), **options})
            cache[key] = technique(name).optimize(teacher, config, digits, ignore_progress)
        return cache[key]

    return run_technique


@pytest.mark.slow
@pytest.mark.parametrize("name", TECHNIQUES)
def test_saved_onnx_runs_in_onnxruntime_at_about_the_baseline_accuracy(name, run, digits, baseline):
    result = run(name)
    deploy = result.artifacts["deploy"]
    assert deploy.name == f"{name}.onnx"
    measured = accuracy(backend.BACKEND, deploy, digits.x_test, digits.y_test)
    assert measured >= baseline["accuracy"] - 0.05
    assert backend.BACKEND.latency_ms(deploy, digits.x_test[0]) > 0


@pytest.mark.parametrize("name", TECHNIQUES)
def test_native_pt2_passes_the_safety_scan_and_loads(name, run):
    native = run(name).artifacts["native"]
    assert native.name == f"{name}.pt2"
    assert backend.BACKEND.load(native).input_shape == (1, 8, 8)


@pytest.mark.parametrize("name, max_fraction", [("ptq_int8", 0.30), ("qat", 0.30), ("ptq_int4", 0.20), ("hybrid", 0.15)])
def test_quantized_file_is_a_fraction_of_the_fp32_onnx(name, max_fraction, run, baseline):
    assert os.path.getsize(run(name).artifacts["deploy"]) <= max_fraction * baseline["size"]


def test_int4_default_is_smaller_than_the_fc4_conv8_scheme_which_keeps_convolutions_int8(run):
    default, fc4_conv8 = run("ptq_int4"), run("ptq_int4", scheme="fc4_conv8")
    assert os.path.getsize(default.artifacts["deploy"]) < os.path.getsize(fc4_conv8.artifacts["deploy"])
    assert {layer["op"] for layer in fc4_conv8.details["layers"].values()} == {"MatMulNBits"}
    assert fc4_conv8.details["kept_wider"] and all("8-bit" in why for why in fc4_conv8.details["kept_wider"].values())


def operators(path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


def test_int8_writes_onnxruntime_qoperator_with_the_granularity_that_agrees_best(run, baseline):
    result = run("ptq_int8")
    assert {"QLinearConv", "QGemm"} <= operators(result.artifacts["deploy"])
    assert "Conv" not in operators(result.artifacts["deploy"])
    choice = result.details["granularity_choice"]
    agreement = choice["agreement_with_fp32"]
    expected = "per_tensor" if agreement["per_tensor"] >= agreement["per_channel"] else "per_channel"
    assert result.details["weight_granularity"] == expected
    assert os.path.getsize(result.artifacts["deploy"]) == choice["size_bytes"][expected]
    assert choice["size_bytes"]["per_tensor"] < choice["size_bytes"]["per_channel"]
    # the analyzer follows the contrib operators: same layers, parameters and MACs as the FP32 file
    quantized, fp32 = load_graph(result.artifacts["deploy"]), load_graph(baseline["path"])
    assert (quantized.params, quantized.macs) == (fp32.params, fp32.macs)
    assert quantized.precision == "int8"


def test_int8_qdq_format_is_portable_but_larger_than_qoperator(run, digits, baseline):
    qdq = run("ptq_int8", format="qdq", weight_granularity="per_channel").artifacts["deploy"]
    qoperator = run("ptq_int8", weight_granularity="per_channel").artifacts["deploy"]
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= operators(qdq)
    assert os.path.getsize(qoperator) < os.path.getsize(qdq)
    assert accuracy(backend.BACKEND, qdq, digits.x_test, digits.y_test) >= baseline["accuracy"] - 0.05


class TwiceAppliedConv(torch.nn.Module):
    """One convolution applied twice, at different input scales (a weight-shared block, as a
    scripted loop unrolls to): both Conv nodes read one weight and one bias initializer."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        torch.nn.init.constant_(self.conv.bias, 0.5)
        self.head = torch.nn.Linear(4, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        return self.head(torch.relu(self.conv(x * 4.0)).mean((2, 3)))


def test_int8_of_a_layer_applied_twice_keeps_each_application_close_to_fp32(tmp_path):
    """onnxruntime's QOperator quantizer stores a shared bias once, at the first layer's input
    scale: the second application's bias was off by their ratio (a scripted looping model lost
    19 points)."""
    from optimization.techniques.pytorch._common import quantize_int8

    torch.manual_seed(0)
    fp32 = backend.export_onnx(TwiceAppliedConv().eval(), (4, 8, 8), tmp_path / "fp32.onnx")
    x = np.random.default_rng(0).random((64, 4, 8, 8), dtype=np.float32)
    quantized = tmp_path / "int8.onnx"

    quantize_int8(fp32, quantized, x, weight_granularity="per_channel")

    expected, got = backend.BACKEND.predict(fp32, x), backend.BACKEND.predict(quantized, x)
    assert np.abs(got - expected).max() <= 0.05 * np.abs(expected).max()


def test_unknown_int8_format_fails_the_run_with_the_choices(teacher, digits, tmp_path):
    with pytest.raises(OptionError, match="qoperator"):
        technique("ptq_int8").optimize(teacher, TechniqueConfig(tmp_path, {"format": "tensorrt"}), digits,
                                       ignore_progress)


@pytest.mark.parametrize("name", TECHNIQUES)
def test_every_technique_fills_the_result_fields_the_catalog_promises(name, run):
    result = run(name)
    assert set(TECHNIQUE_SPECS[name].reports) <= set(result.vocabulary())
    if result.bits_per_layer is not None:
        assert set(result.float_layers) == {layer for layer, bits in result.bits_per_layer.items() if bits == 32}
        assert min(result.bits_per_layer.values()) == {"int8": 8, "int4": 4}[result.precision]


@pytest.mark.parametrize("name", ["prune_structured", "distillation", "hybrid"])
def test_smaller_models_have_fewer_params_and_macs_than_the_teacher(name, run, teacher):
    params, macs = backend.count_params_macs(teacher.module, teacher.input_shape)
    result = run(name)
    assert result.params < 0.5 * params and result.macs < 0.5 * macs


def test_channel_pruning_keeps_vector_friendly_channel_counts(run):
    details = run("prune_structured").details
    assert details["channel_multiple"] == 16
    pruned = run("prune_structured").model
    assert all(layer.out_channels % 16 == 0 for layer in pruned.modules() if isinstance(layer, torch.nn.Conv2d))


def test_unstructured_pruning_reaches_its_sparsity_and_compresses_better(run, baseline):
    details = run("prune_unstructured").details
    assert abs(run("prune_unstructured").sparsity - 0.5) < 0.01
    assert details["dense_size_bytes"] >= 0.95 * baseline["size"]  # honest: zeros are still stored
    assert details["compressed_size_bytes"] < 0.8 * details["baseline_compressed_size_bytes"]


def test_unstructured_pruning_with_an_empty_sparsity_chooses_it_by_size_as_tensorflow_does(run, teacher):
    from optimization.catalog import pruning_by_size

    result = run("prune_unstructured", target_sparsity=None)
    params = sum(p.numel() for p in teacher.module.parameters())
    chosen = pruning_by_size(params)["target_sparsity"]
    assert result.details["size_choice"]["target_sparsity"] == chosen
    assert abs(result.sparsity - chosen) < 0.01


def test_distillation_reports_the_student_with_and_without_the_teacher(run):
    details = run("distillation").details
    assert 0.5 < details["student_test_accuracy_with_teacher"] <= 1.0
    assert 0.5 < details["student_test_accuracy_without_teacher"] <= 1.0


@pytest.mark.slow
def test_student_cut_from_the_teacher_stays_near_it_and_beats_a_student_from_scratch(run, baseline):
    """One epoch: a student starting from the teacher's channels keeps the teacher's accuracy
    within a few points, where the same student from random weights has barely learned."""
    from_teacher, from_scratch = run("distillation", epochs=1), run("distillation", epochs=1, student_init="random")
    assert from_teacher.details["student_init"] == "teacher" and "teacher's weights" in from_teacher.details["student"]
    assert "random" in from_scratch.details["student"]
    distilled = from_teacher.details["student_test_accuracy_with_teacher"]
    assert distilled >= baseline["accuracy"] - 0.03
    assert distilled > from_scratch.details["student_test_accuracy_with_teacher"] + 0.02


@pytest.mark.parametrize("name", ["prune_unstructured", "prune_structured", "distillation", "qat", "hybrid"])
def test_stop_during_training_ends_the_technique_at_once(name, teacher, digits, tmp_path):
    calls = []

    def stop_when_training(fraction, message, metrics):
        calls.append(message)
        if "epoch" in message:
            raise ExperimentStopped()

    with pytest.raises(ExperimentStopped):
        technique(name).optimize(teacher, TechniqueConfig(tmp_path, {"epochs": 50}), digits, stop_when_training)
    assert "epoch" in calls[-1] and sum("epoch" in m for m in calls) == 1
    assert not (tmp_path / f"{name}.onnx").exists()


def test_onnx_upload_is_quantized_and_converted_for_the_training_techniques(baseline, digits, tmp_path):
    onnx_model = backend.BACKEND.load(baseline["path"])
    result = technique("ptq_int8").optimize(onnx_model, TechniqueConfig(tmp_path), digits, ignore_progress)
    assert accuracy(backend.BACKEND, result.artifacts["deploy"], digits.x_test, digits.y_test) >= baseline["accuracy"] - 0.05
    # onnx2torch gives the file a PyTorch form whose logits match onnxruntime's, so training applies
    assert onnx_model.trainable and onnx_model.preparation["pytorch_form"]["converted"]


def test_hybrid_on_an_onnx_upload_deploys_the_pruned_model(baseline, digits, tmp_path, run):
    onnx_model = backend.BACKEND.load(baseline["path"])
    result = technique("hybrid").optimize(onnx_model, TechniqueConfig(tmp_path, FAST_OPTIONS["hybrid"]), digits,
                                          ignore_progress)
    # half the channels gone and 8-bit weights: well under the INT8 file of the whole model (the
    # uploaded file's own bytes, quantized, were deployed before: the same size)
    assert os.path.getsize(result.artifacts["deploy"]) < 0.5 * os.path.getsize(run("ptq_int8").artifacts["deploy"])
    assert accuracy(backend.BACKEND, result.artifacts["deploy"], digits.x_test, digits.y_test) >= baseline["accuracy"] - 0.05


@pytest.mark.slow
def test_fixed_batch_export_is_generalised_and_fine_tuned(digits, tmp_path):
    from optimization.zoo.pytorch import build

    module = build("digits_cnn", 10, 1).eval()
    torch.export.save(torch.export.export(module, (torch.zeros(1, 1, 8, 8),)), tmp_path / "fixed.pt2")
    model = backend.BACKEND.load(tmp_path / "fixed.pt2")
    assert backend.fixed_batch(model.module) is None
    config = TechniqueConfig(tmp_path / "pruned", {"epochs": 1})
    result = technique("prune_structured").optimize(model, config, digits, ignore_progress)
    assert "rewritten to take any batch" in result.details["model_preparation"]["batch"]
    logits = backend.BACKEND.predict(backend.BACKEND.export_deploy(model, tmp_path / "fixed.onnx"), digits.x_test[:3])
    assert np.allclose(logits, module(torch.from_numpy(digits.x_test[:3])).detach().numpy(), atol=1e-4)


@pytest.mark.parametrize("name", TECHNIQUES)
def test_estimated_time_is_positive_and_grows_with_the_data(name):
    config = TechniqueConfig(output_dir=None)
    small = {"params": 360_000, "macs": 2.6e6, "train_samples": 1_000, "calib_samples": 128}
    large = {**small, "train_samples": 60_000, "calib_samples": 1_000}
    assert 0 < technique(name).estimate_time(small, config) <= technique(name).estimate_time(large, config)
