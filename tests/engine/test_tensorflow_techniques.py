"""The seven TensorFlow techniques on the digits demo CNN (~360k parameters, trained once per
module), one fine-tuning epoch each: every `.tflite` runs in LiteRT, its accuracy is
re-measured from the file, and sizes / parameters / MACs move the way each technique claims."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optimization.backends.tensorflow import BACKEND, count_params_macs
from optimization.base import ExperimentStopped, TechniqueConfig
from optimization.datasets import load_digits_preset, split
from optimization.techniques import get_technique

PLAUSIBLE_ACCURACY = 0.85  # after one fine-tuning epoch; the trained model reaches >= 0.95


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return load_digits_preset(tmp_path_factory.mktemp("preset"), "NHWC")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, digits):
    folder = tmp_path_factory.mktemp("demo")
    model = BACKEND.load(BACKEND.train_demo_model(digits, folder / "digits_cnn.keras"))
    baseline = BACKEND.export_deploy(model, folder / "baseline.tflite")
    return model, baseline


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits, demo):
    """Each technique runs once; tests read its result."""
    model, _ = demo
    done = {}

    def run(name, **options):
        if name not in done:
            config = TechniqueConfig(output_dir=tmp_path_factory.mktemp(name),
                                     options={"epochs": 1, **options})
            result = get_technique("tensorflow", name).optimize(model, config, digits, ignore_progress)
            done[name] = (result, litert_accuracy(result.artifacts["deploy"], digits))
        return done[name]

    return run


def ignore_progress(fraction, message, metrics):
    assert 0.0 <= fraction <= 1.0


def litert_accuracy(deploy_path: Path, dataset) -> float:
    return float((BACKEND.predict(deploy_path, dataset.x_test).argmax(axis=1) == dataset.y_test).mean())


def size_ratio(result, baseline: Path) -> float:
    return result.artifacts["deploy"].stat().st_size / baseline.stat().st_size


def test_every_technique_writes_a_tflite_and_a_keras_file(runs):
    for name in ("ptq_int8", "ptq_int4", "prune_structured"):
        result, _ = runs(name)
        assert result.artifacts["deploy"].name == f"{name}.tflite"
        assert result.artifacts["native"].name == f"{name}.keras"
        assert result.artifacts["native"].stat().st_size > 0


def test_ptq_int8_is_under_30_percent_of_fp32_and_keeps_accuracy(runs, demo, digits):
    result, accuracy = runs("ptq_int8")
    assert size_ratio(result, demo[1]) <= 0.30
    assert accuracy >= litert_accuracy(demo[1], digits) - 0.02


def test_ptq_int4_is_under_20_percent_of_fp32_and_names_the_layers_kept_wider(runs, demo):
    result, accuracy = runs("ptq_int4")
    assert size_ratio(result, demo[1]) <= 0.20
    assert accuracy >= PLAUSIBLE_ACCURACY
    assert {layer["op"] for layer in result.details["kept_wider"]} == {"CONV_2D"}
    assert all(layer["weight_bits"] == 4 for layer in result.details["layers"]
               if layer["op"] == "FULLY_CONNECTED")


def test_unstructured_pruning_reaches_its_sparsity_but_only_the_compressed_file_shrinks(runs, demo):
    result, accuracy = runs("prune_unstructured", target_sparsity=0.5)
    assert result.details["sparsity"] == pytest.approx(0.5, abs=0.02)
    assert accuracy >= PLAUSIBLE_ACCURACY
    assert size_ratio(result, demo[1]) == pytest.approx(1.0, abs=0.02)
    assert result.details["compressed_size_bytes"] < 0.7 * result.details["dense_size_bytes"]


def test_structured_pruning_leaves_fewer_params_macs_and_bytes(runs, demo):
    result, accuracy = runs("prune_structured", keep_fraction=0.5)
    params, macs = count_params_macs(demo[0].module)
    assert result.params < 0.5 * params and result.macs < 0.5 * macs
    assert size_ratio(result, demo[1]) < 0.5
    assert accuracy >= PLAUSIBLE_ACCURACY


def test_distilled_student_is_smaller_and_is_compared_with_the_student_alone(runs, demo):
    result, accuracy = runs("distillation")
    params, macs = count_params_macs(demo[0].module)
    assert result.params < params and result.macs < macs
    assert 0.0 < result.details["student_alone_accuracy"] <= 1.0
    assert accuracy >= 0.7  # a student trained from scratch for one epoch


def test_qat_gives_an_int8_file_at_least_as_accurate_as_ptq(runs, demo):
    result, accuracy = runs("qat")
    _, ptq_accuracy = runs("ptq_int8")
    assert size_ratio(result, demo[1]) <= 0.30
    assert accuracy >= ptq_accuracy - 0.02


def test_hybrid_is_smaller_than_int8_alone_and_keeps_sparsity_through_int8(runs, demo):
    result, accuracy = runs("hybrid")
    int8_result, _ = runs("ptq_int8")
    assert result.artifacts["deploy"].stat().st_size < 0.5 * int8_result.artifacts["deploy"].stat().st_size
    assert result.details["sparsity_in_int8_file"] >= 0.4
    assert result.details["compressed_size_bytes"] < result.artifacts["deploy"].stat().st_size
    assert accuracy >= PLAUSIBLE_ACCURACY


def test_a_stop_request_ends_fine_tuning_at_the_next_batch(demo, digits, tmp_path):
    batches_seen = []

    def stop_during_training(fraction, message, metrics):
        if "epoch" in message:
            batches_seen.append(fraction)
            raise ExperimentStopped()

    config = TechniqueConfig(output_dir=tmp_path, options={"epochs": 5})
    with pytest.raises(ExperimentStopped):
        get_technique("tensorflow", "qat").optimize(demo[0], config, digits, stop_during_training)
    assert len(batches_seen) == 1
    assert not (tmp_path / "qat.tflite").exists()


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory):
    from optimization.zoo.keras import mobilenet_v2_small

    path = tmp_path_factory.mktemp("mobilenet") / "mobilenet.keras"
    mobilenet_v2_small().save(path)
    return BACKEND.load(path)


def test_ptq_int8_runs_on_keras_applications_mobilenet_v2(tmp_path, mobilenet):
    rng = np.random.default_rng(0)
    images = rng.random((64, 32, 32, 3), dtype=np.float32)
    dataset = split("noise", images, rng.integers(0, 10, 64), "NHWC", calib_size=32)
    result = get_technique("tensorflow", "ptq_int8").optimize(
        mobilenet, TechniqueConfig(output_dir=tmp_path), dataset, ignore_progress)
    outputs = BACKEND.predict(result.artifacts["deploy"], dataset.x_test)
    assert outputs.shape == (len(dataset.x_test), 10)
    np.testing.assert_allclose(outputs.sum(axis=1), 1.0, atol=0.05)  # the softmax head survived
    # per-channel scales and int32 biases of ~150 small tensors weigh more here than on digits
    float32_weight_bytes = 4 * mobilenet.module.count_params()
    assert result.artifacts["deploy"].stat().st_size <= 0.45 * float32_weight_bytes


def test_channel_surgery_on_mobilenet_v2_keeps_residual_channels_whole(mobilenet):
    from optimization.techniques.tensorflow.prune_structured import shrink_channels

    model = mobilenet.module
    narrowed, surgery = shrink_channels(model, 0.5, copy_weights=True)
    assert any("merges" in kept["why"] for kept in surgery["kept_whole"])
    assert narrowed.count_params() < model.count_params()
    assert narrowed.predict(np.zeros((2, 32, 32, 3), np.float32), verbose=0).shape == (2, 10)
