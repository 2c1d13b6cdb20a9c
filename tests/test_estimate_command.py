"""`manage.py estimate` on each model format a user can hand it."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from django.core.management import CommandError, call_command

API_KEYS = {"device", "runtime", "precision", "threads", "latency_ms", "latency_low_ms", "latency_high_ms",
            "memory_mb", "energy_mj", "macs", "params"}
# conv 3x3 3->4 on 8x8 (4*27 + 4 params, 8*8*4*27 MACs) and dense 4->3 after global pooling
PARAMS = 4 * 27 + 4 + 4 * 3 + 3
MACS = 8 * 8 * 4 * 27 + 4 * 3


def keras_model():
    from optimization.backends.tensorflow import keras

    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, padding="same", activation="relu", bias_initializer="ones"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3, bias_initializer="ones"),
    ])


def torch_model():
    import torch

    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    from optimization.backends.pytorch import export_onnx, save_pt2
    from optimization.backends.tensorflow import convert_to_tflite, save_keras

    folder = tmp_path_factory.mktemp("estimate_command")
    keras, torch = keras_model(), torch_model()
    return {
        ".tflite": convert_to_tflite(keras, folder / "tiny.tflite"),
        ".keras": save_keras(keras, folder / "tiny.keras"),
        ".onnx": export_onnx(torch, (3, 8, 8), folder / "tiny.onnx"),
        ".pt2": save_pt2(torch, (3, 8, 8), folder / "tiny.pt2"),
    }


def run_estimate(*args) -> str:
    out = io.StringIO()
    call_command("estimate", *args, stdout=out)
    return out.getvalue()


@pytest.mark.parametrize("suffix, runtime", [(".tflite", "tflite"), (".keras", "tflite"),
                                             (".onnx", "onnxruntime"), (".pt2", "onnxruntime")])
def test_json_estimate_for_each_format(model_paths, suffix, runtime):
    result = json.loads(run_estimate(str(model_paths[suffix]), "--device", "rpi4", "--json"))
    assert API_KEYS <= set(result)
    assert result["estimated"] is True
    assert (result["device"], result["runtime"], result["precision"]) == ("rpi4", runtime, "fp32")
    assert (result["params"], result["macs"]) == (PARAMS, MACS)
    assert 0 < result["latency_low_ms"] < result["latency_ms"] < result["latency_high_ms"]


def test_options_reach_the_estimate(model_paths):
    result = json.loads(run_estimate(str(model_paths[".onnx"]), "--device", "rpi5", "--runtime", "tflite",
                                     "--precision", "int8", "--threads", "2", "--json"))
    chosen = (result["device"], result["runtime"], result["precision"], result["threads"])
    assert chosen == ("rpi5", "tflite", "int8", 2)


def test_text_form_is_readable_and_says_estimated(model_paths):
    text = run_estimate(str(model_paths[".tflite"]), "--device", "rpi4")
    assert "estimated" in text and "Raspberry Pi 4" in text
    assert "latency" in text and "memory" in text and "energy" in text and "assumptions" in text


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CommandError, match="model file not found"):
        run_estimate(str(tmp_path / "nope.onnx"), "--device", "rpi4")


def test_unknown_device_lists_the_known_ones(model_paths):
    with pytest.raises(CommandError, match="unknown device 'rpi9'.*rpi4"):
        run_estimate(str(model_paths[".onnx"]), "--device", "rpi9")


def test_unsupported_suffix_is_refused(tmp_path):
    path = tmp_path / "weights.npy"
    np.save(path, np.zeros(3))
    with pytest.raises(CommandError, match=".tflite"):
        run_estimate(str(path), "--device", "rpi4")


@pytest.mark.slow
def test_standard_mobilenet_at_224_matches_its_published_size(tmp_path):
    """MobileNet v1 0.25 at 224x224: 41 million MACs and 0.5 million parameters (Howard et al.
    2017, Table 6; the 1.0 model's 569 M is checked in bench/). Random weights: only the op
    graph matters for the estimate."""
    from optimization.backends.tensorflow import keras, save_keras

    model = keras.applications.MobileNet(input_shape=(224, 224, 3), alpha=0.25, weights=None)
    result = json.loads(run_estimate(str(save_keras(model, tmp_path / "mbv1_025.keras")), "--device", "rpi4", "--json"))
    assert result["macs"] == pytest.approx(41e6, rel=0.03)
    assert result["params"] == pytest.approx(0.5e6, rel=0.1)
    assert 1 < result["latency_ms"] < 100
