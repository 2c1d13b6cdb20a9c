"""PerformanceEstimator: its data files, and estimates that move the way the measurements do."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from optimization import estimator
from optimization.analyzer import analyze
from optimization.graph import load_graph, peak_activation_bytes

API_KEYS = {"device", "runtime", "precision", "threads", "latency_ms", "latency_low_ms", "latency_high_ms",
            "memory_mb", "energy_mj", "macs", "params"}


def conv_net(width: int):
    from optimization.backends.tensorflow import keras

    layers = keras.layers
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        layers.Conv2D(width, 3, padding="same", activation="relu"),
        layers.Conv2D(width, 3, padding="same", activation="relu"),
        layers.Conv2D(2 * width, 1, activation="relu"),
        layers.GlobalAveragePooling2D(),
        layers.Dense(10),
    ])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from optimization.backends.tensorflow import convert_to_tflite

    folder = tmp_path_factory.mktemp("estimator")
    calibration = np.random.default_rng(0).random((8, 32, 32, 3), dtype=np.float32)
    narrow, wide = conv_net(8), conv_net(32)
    return {
        "narrow": convert_to_tflite(narrow, folder / "narrow.tflite"),
        "wide": convert_to_tflite(wide, folder / "wide.tflite"),
        "wide_int8": convert_to_tflite(wide, folder / "wide_int8.tflite", calibration),
    }


def test_calibration_points_cite_their_source_and_name_known_devices():
    calibration = estimator.load_calibration()
    profiles = estimator.load_profiles()
    assert calibration["points"]
    for source in calibration["sources"].values():
        assert source["url"].startswith("http") and source["what"]
    for point in calibration["points"]:
        assert point["source"] in calibration["sources"]
        assert point["device"] in profiles["devices"]
        assert point["runtime"] in profiles["runtimes"]
        assert point["latency_ms"] > 0
        assert point["use"] or point["reason"], f"{point['id']} is left out without a reason"


def test_every_device_profile_cites_a_source():
    devices = estimator.load_profiles()["devices"]
    assert {"rpi4", "rpi5"} <= set(devices)
    for name, profile in devices.items():
        assert profile["sources"], name
        for source in profile["sources"]:
            assert source["url"] and source["what"], name


def test_fitted_file_holds_every_parameter_the_model_uses():
    fitted = estimator.load_fitted()
    assert set(estimator.parameter_names()) <= set(fitted["parameters"])
    assert fitted["interval_log_halfwidth"] > 0


def test_estimate_returns_the_api_fields_marked_estimated(files):
    result = estimator.estimate(files["wide"], "rpi4")
    assert API_KEYS <= set(result)
    assert result["estimated"] is True and result["assumptions"]
    assert (result["runtime"], result["precision"], result["threads"]) == ("tflite", "fp32", 4)
    assert result["macs"] == analyze(files["wide"])["macs"]


def test_latency_rises_with_macs(files):
    narrow, wide = estimator.estimate(files["narrow"], "rpi4"), estimator.estimate(files["wide"], "rpi4")
    assert wide["macs"] > narrow["macs"]
    assert wide["latency_ms"] > narrow["latency_ms"]


def test_int8_is_faster_on_every_board_where_the_calibration_measured_it_faster(files):
    points = [p for p in estimator.load_calibration()["points"] if p["use"]]
    measured_faster = set()
    key = lambda p: (p["source"], p["device"], p["model"], p["threads"], p.get("isa", ""))  # noqa: E731
    for _, group in itertools.groupby(sorted(points, key=key), key=key):
        by_precision = {p["precision"]: p for p in group}
        # not every pair is faster in int8: ncnn runs float networks in fp16 on the Pi 5, where
        # ResNet-18 on one thread measured slower in int8
        if {"fp32", "int8"} <= set(by_precision) and by_precision["int8"]["latency_ms"] < by_precision["fp32"]["latency_ms"]:
            measured_faster.add(by_precision["int8"]["device"])
    assert measured_faster
    for device in measured_faster | {"rpi5"}:
        fp32 = estimator.estimate(files["wide"], device)
        int8 = estimator.estimate(files["wide"], device, precision="int8")
        assert int8["latency_ms"] < fp32["latency_ms"], device
        assert int8["memory_mb"] < fp32["memory_mb"], device


def kernel_mix_net(kind: str):
    """Most MACs in one kernel class: 3x3 convolutions or depthwise 3x3 convolutions."""
    from optimization.backends.tensorflow import keras

    layers = keras.layers
    block = (lambda: layers.Conv2D(64, 3, padding="same", activation="relu")) if kind == "conv" else \
        (lambda: layers.DepthwiseConv2D(3, padding="same", activation="relu"))
    return keras.Sequential([keras.Input((56, 56, 64))] + [block() for _ in range(4)]
                            + [layers.GlobalAveragePooling2D(), layers.Dense(10)])


def test_int8_speedup_depends_on_the_kernel_mix_the_way_the_fit_says(tmp_path, monkeypatch):
    from optimization.backends.tensorflow import convert_to_tflite

    paths = {kind: convert_to_tflite(kernel_mix_net(kind), tmp_path / f"{kind}.tflite") for kind in ("conv", "depthwise")}

    def speedups():
        return {kind: estimator.estimate(path, "rpi4")["latency_ms"]
                / estimator.estimate(path, "rpi4", precision="int8")["latency_ms"] for kind, path in paths.items()}

    fitted = estimator.load_fitted()
    parameters = fitted["parameters"]
    gain = {kind: math.exp(parameters[f"int8_kind:{kind}"] + parameters[f"int8_runtime_kind:tflite:{kind}"])
            for kind in paths}
    with_classes = speedups()
    # the same fit with one int8 gain for every kernel class
    flat = dict(parameters, **{name: 0.0 for name in parameters if name.startswith(("int8_kind:", "int8_runtime_kind:"))})
    monkeypatch.setattr(estimator, "load_fitted", lambda: dict(fitted, parameters=flat))
    one_gain = speedups()

    fitted_ratio = gain["conv"] / gain["depthwise"]
    assert abs(math.log(fitted_ratio)) > math.log(1.03), "the fit gives the classes the same int8 gain"
    shift = (with_classes["conv"] / with_classes["depthwise"]) / (one_gain["conv"] / one_gain["depthwise"])
    # the graph whose MACs sit in the class with the larger gain speeds up more, by at most the
    # fitted ratio (less where memory or per-op overhead, which the int8 gains do not touch, dominate)
    assert (shift > 1) == (fitted_ratio > 1)
    low, high = sorted((1.0, fitted_ratio))
    assert low * 0.99 <= shift <= high * 1.01
    assert abs(math.log(shift)) > 0.5 * abs(math.log(fitted_ratio)), "the MACs of both graphs should be compute bound"


def test_a_runtime_computing_floats_in_fp16_gets_the_half_precision_rate_only_where_the_core_has_it(files):
    table = estimator.op_table(load_graph(files["wide"]))
    parameters = estimator.load_fitted()["parameters"]
    rpi5 = estimator.device_profile("rpi5")
    rates = {k: v for k, v in rpi5["macs_per_cycle_per_core"].items() if k != "fp16"}
    without_fp16 = dict(rpi5, macs_per_cycle_per_core=rates)

    def latency(profile, runtime):
        return estimator.predict_latency_s(table, profile, runtime, 4, parameters)

    # ncnn computes float networks in fp16 on an ARMv8.2 core; TensorFlow Lite does not unless asked
    assert latency(rpi5, "ncnn") < latency(without_fp16, "ncnn")
    assert latency(rpi5, "tflite") == latency(without_fp16, "tflite")


def test_precision_defaults_to_what_the_file_contains(files):
    assert estimator.estimate(files["wide_int8"], "rpi4")["precision"] == "int8"
    assert estimator.estimate(files["wide"], "rpi4")["precision"] == "fp32"


def test_int8_file_and_int8_costing_of_the_fp32_file_agree(files):
    from_file = estimator.estimate(files["wide_int8"], "rpi4")["latency_ms"]
    costed = estimator.estimate(files["wide"], "rpi4", precision="int8")["latency_ms"]
    assert from_file == pytest.approx(costed, rel=0.25)


def test_rpi5_is_faster_than_rpi4_and_more_threads_are_faster(files):
    rpi4, rpi5 = (estimator.estimate(files["wide"], device)["latency_ms"] for device in ("rpi4", "rpi5"))
    assert rpi5 < rpi4
    one, four = (estimator.estimate(files["wide"], "rpi4", threads=t)["latency_ms"] for t in (1, 4))
    assert four < one


def test_intervals_bracket_each_estimate(files):
    result = estimator.estimate(files["wide"], "rpi4")
    assert result["latency_low_ms"] < result["latency_ms"] < result["latency_high_ms"]
    assert result["memory_low_mb"] <= result["memory_mb"] < result["memory_high_mb"]
    assert result["energy_low_mj"] < result["energy_mj"] < result["energy_high_mj"]


def test_energy_is_latency_times_the_boards_power_at_the_threads_used(files):
    profile = estimator.device_profile("rpi4")
    result = estimator.estimate(files["wide"], "rpi4", threads=2)
    power = profile["idle_power_w"] + (profile["active_power_w"] - profile["idle_power_w"]) * 2 / profile["cores"]
    assert result["energy_mj"] == pytest.approx(result["latency_ms"] * power, rel=1e-3)


def test_memory_is_weights_plus_live_activations_plus_runtime_overhead(files):
    graph = load_graph(files["wide"])
    overhead = estimator.load_profiles()["runtimes"]["tflite"]["overhead_mb"]
    expected = (graph.weight_bytes + peak_activation_bytes(graph)) / 2**20 + overhead
    assert estimator.estimate(graph, "rpi4")["memory_mb"] == pytest.approx(expected, abs=1e-3)


def test_runtime_without_pi_measurements_says_so_and_widens_the_interval(files):
    tflite = estimator.estimate(files["wide"], "rpi4", runtime="tflite")
    ort = estimator.estimate(files["wide"], "rpi4", runtime="onnxruntime")
    assert any("onnxruntime" in line and "no published" in line for line in ort["assumptions"])
    width = lambda r: math.log(r["latency_high_ms"] / r["latency_low_ms"])  # noqa: E731
    assert width(ort) > width(tflite)


def test_unknown_device_is_refused_with_the_known_devices(files):
    with pytest.raises(estimator.UnknownDeviceError, match="rpi4"):
        estimator.estimate(files["wide"], "rpi9")


def test_unknown_precision_is_refused(files):
    with pytest.raises(ValueError, match="int8"):
        estimator.estimate(files["wide"], "rpi4", precision="int2")
