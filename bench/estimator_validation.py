"""Fit the PerformanceEstimator to published Raspberry Pi measurements and validate it.

1. Builds the standard 224x224 classifiers of the calibration set (MobileNet V1/V2/V3-Large,
   ResNet-18/50) as Keras graphs with random weights (only the op graph matters for latency),
   converts them to fp32 .tflite and reads them with optimization.graph.
2. Fits the estimator's parameters (optimization.estimator.parameter_names) by least squares
   on log latency, with weak priors that tie parameters no measurement informs.
3. Leave-one-source-out: refits without each source and predicts that source's points.
4. Writes optimization/devices/fitted.json (read by the estimator), bench/results/estimator.json
   and the "## Estimator validation" section of BENCHMARKS.md.

Run: /tmp/venv/bin/python bench/estimator_validation.py [--cache DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optimization import estimator  # noqa: E402
from optimization.graph import load_graph  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "estimator.json"
BENCHMARKS = ROOT / "BENCHMARKS.md"
SECTION = "## Estimator validation"

# prior mean and standard deviation per parameter (log space unless named otherwise)
PRIOR_DEFAULT = (math.log(0.3), 3.0)
PRIORS = {
    "int8_shared": (0.0, 1.0),
    "thread_scaling_logit": (1.5, 2.0),
    "log_op_overhead_s": (math.log(20e-6), 1.0),
    "log_bandwidth_fraction": (math.log(0.3), 0.5),
    "log_output_cost_macs": (math.log(8.0), 1.5),
}
PRIOR_PREFIXES = {"int8_gain:": (0.0, 0.3), "uarch:": (0.0, 0.5), "kind:": (0.0, 1.0)}
# onnxruntime has no Pi measurement: keep it on TensorFlow Lite's efficiency (both NEON GEMM)
TIED = [("runtime_fp32:onnxruntime", "runtime_fp32:tflite", 0.05)]


def build_keras_models() -> dict:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    keras = tf.keras
    apps = keras.applications
    shape = (224, 224, 3)
    return {
        "mobilenet_v1": lambda: apps.MobileNet(input_shape=shape, weights=None),
        "mobilenet_v2": lambda: apps.MobileNetV2(input_shape=shape, weights=None),
        "mobilenet_v3_large": lambda: apps.MobileNetV3Large(input_shape=shape, weights=None,
                                                            include_preprocessing=False),
        "resnet18": lambda: resnet18(keras, shape),
        "resnet50": lambda: apps.ResNet50(input_shape=shape, weights=None),
    }


def resnet18(keras, shape):
    """ResNet-18 (He et al. 2016, basic blocks [2, 2, 2, 2]); keras.applications has none."""
    layers = keras.layers

    def conv_bn(x, filters, kernel, stride, relu=True):
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU()(x) if relu else x

    inputs = keras.Input(shape)
    x = conv_bn(inputs, 64, 7, 2)
    x = layers.MaxPooling2D(3, 2, padding="same")(x)
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            shortcut = x if stride == 1 and x.shape[-1] == filters else conv_bn(x, filters, 1, stride, relu=False)
            y = conv_bn(x, filters, 3, stride)
            y = conv_bn(y, filters, 3, 1, relu=False)
            x = layers.ReLU()(layers.Add()([y, shortcut]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(1000, activation="softmax")(x), name="resnet18")


def model_graphs(cache: Path, names: set[str]) -> dict:
    import tensorflow as tf

    cache.mkdir(parents=True, exist_ok=True)
    builders = build_keras_models()
    graphs = {}
    for name in sorted(names):
        path = cache / f"{name}_224_fp32.tflite"
        if not path.exists():
            started = time.time()
            converter = tf.lite.TFLiteConverter.from_keras_model(builders[name]())
            path.write_bytes(converter.convert())
            print(f"  built {path.name} in {time.time() - started:.0f} s", flush=True)
        graphs[name] = load_graph(path)
    return graphs


class Fit:
    def __init__(self, points: list[dict], graphs: dict):
        self.names = estimator.parameter_names()
        self.points = points
        self.tables = {}
        for point in points:
            key = (point["model"], point["precision"])
            if key not in self.tables:
                self.tables[key] = estimator.op_table(graphs[point["model"]], point["precision"])

    def predict_ms(self, point: dict, parameters: dict) -> float:
        profile = estimator.device_profile(point["device"])
        return 1e3 * estimator.predict_latency_s(
            self.tables[(point["model"], point["precision"])], profile, point["runtime"], point["threads"],
            parameters, point.get("clock_ghz"))

    def run(self, training: list[dict]) -> dict:
        index = {n: i for i, n in enumerate(self.names)}
        priors = [PRIORS.get(n) or next((v for p, v in PRIOR_PREFIXES.items() if n.startswith(p)), PRIOR_DEFAULT)
                  for n in self.names]

        def residuals(theta):
            parameters = dict(zip(self.names, theta))
            data = [math.log(self.predict_ms(p, parameters) / p["latency_ms"]) for p in training]
            prior = [(theta[i] - mean) / sd for i, (mean, sd) in enumerate(priors)]
            tied = [(theta[index[a]] - theta[index[b]]) / sd for a, b, sd in TIED]
            return np.array(data + prior + tied)

        start = np.array([mean for mean, _ in priors])
        solution = least_squares(residuals, start, method="trf", x_scale=1.0, diff_step=1e-3)
        return dict(zip(self.names, map(float, solution.x)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "edgeopt_estimator_models")
    args = parser.parse_args()

    calibration = estimator.load_calibration()
    points = calibration["points"]
    started = time.time()
    graphs = model_graphs(args.cache, {p["model"] for p in points})
    fit = Fit(points, graphs)
    used = [p for p in points if p["use"]]
    full = fit.run(used)

    sources = sorted({p["source"] for p in used})
    rows = []
    for source in sources:
        held_out = [p for p in used if p["source"] == source]
        parameters = fit.run([p for p in used if p["source"] != source])
        for point in held_out:
            rows.append(row(point, fit.predict_ms(point, parameters), fit.predict_ms(point, full)))
    for point in points:
        if not point["use"]:
            rows.append(row(point, None, fit.predict_ms(point, full)))

    loso_log_errors = [abs(math.log(r["loso_estimate_ms"] / r["measured_ms"])) for r in rows if r["loso_estimate_ms"]]
    halfwidth = float(np.percentile(loso_log_errors, 80))
    loso_abs = [abs(r["loso_error_pct"]) for r in rows if r["loso_error_pct"] is not None]
    fit_abs = [abs(r["fit_error_pct"]) for r in rows if r["use"]]
    summary = {
        "points_used": len(used),
        "points_shown_only": len(points) - len(used),
        "sources": sources,
        "loso_median_abs_error_pct": round(statistics.median(loso_abs), 1),
        "loso_median_abs_error_pct_by_source": {
            source: round(statistics.median(abs(r["loso_error_pct"]) for r in rows
                                            if r["source"] == source and r["use"]), 1)
            for source in sources},
        "loso_mean_abs_error_pct": round(statistics.mean(loso_abs), 1),
        "in_sample_median_abs_error_pct": round(statistics.median(fit_abs), 1),
        "interval_log_halfwidth": round(halfwidth, 4),
        "interval_coverage_loso": round(sum(e <= halfwidth for e in loso_log_errors) / len(loso_log_errors), 2),
        "seconds": round(time.time() - started, 1),
    }
    fitted = {
        "generated_by": "bench/estimator_validation.py",
        "parameters": full,
        "readable": readable(full),
        "interval_log_halfwidth": halfwidth,
        "points_used": len(used),
        "calibrated": {
            "runtimes": sorted({p["runtime"] for p in used}),
            "microarchitectures": sorted({estimator.device_profile(p["device"])["microarchitecture"] for p in used}),
        },
        "model_macs": {name: graph.macs for name, graph in graphs.items()},
    }
    (estimator.DEVICES_DIR / "fitted.json").write_text(json.dumps(fitted, indent=2) + "\n")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"summary": summary, "fitted": fitted["readable"], "points": rows}, indent=2) + "\n")
    write_benchmarks_section(summary, fitted["readable"], rows)
    print(json.dumps(summary, indent=2))


def row(point: dict, loso_ms: float | None, fit_ms: float) -> dict:
    def error(estimate):
        return None if estimate is None else round(100 * (estimate - point["latency_ms"]) / point["latency_ms"], 1)

    return {
        "id": point["id"], "source": point["source"], "device": point["device"], "runtime": point["runtime"],
        "model": point["model"], "precision": point["precision"], "threads": point["threads"],
        "use": point["use"], "measured_ms": point["latency_ms"],
        "loso_estimate_ms": None if loso_ms is None else round(loso_ms, 1), "loso_error_pct": error(loso_ms),
        "fit_estimate_ms": round(fit_ms, 1), "fit_error_pct": error(fit_ms),
        "reason": point.get("reason", ""),
    }


def readable(parameters: dict) -> dict:
    """The fitted parameters in plain units, for people."""
    out = {}
    for name, value in parameters.items():
        if name.startswith(("runtime_fp32:", "int8_gain:", "kind:", "uarch:")) or name == "int8_shared":
            out[name] = round(math.exp(value), 3)
    out["thread_scaling"] = round(1 / (1 + math.exp(-parameters["thread_scaling_logit"])), 3)
    out["op_overhead_us"] = round(math.exp(parameters["log_op_overhead_s"]) * 1e6, 2)
    out["bandwidth_fraction"] = round(math.exp(parameters["log_bandwidth_fraction"]), 3)
    out["output_cost_macs"] = round(math.exp(parameters["log_output_cost_macs"]), 2)
    return out


def write_benchmarks_section(summary: dict, parameters: dict, rows: list[dict]) -> None:
    lines = [
        SECTION, "",
        "Generated by `bench/estimator_validation.py` (data: `optimization/devices/calibration.json`, "
        "fit: `optimization/devices/fitted.json`, raw: `bench/results/estimator.json`).",
        "Each published point is predicted by a fit that did not see its source (leave-one-source-out, LOSO). "
        "Points marked *shown only* are left out of every fit; the reason is in calibration.json.", "",
        f"- points fitted: {summary['points_used']} from {len(summary['sources'])} sources; "
        f"shown only: {summary['points_shown_only']}",
        f"- LOSO median absolute error: **{summary['loso_median_abs_error_pct']}%** "
        f"(mean {summary['loso_mean_abs_error_pct']}%); in-sample median {summary['in_sample_median_abs_error_pct']}%",
        "- LOSO median absolute error per held-out source: " + ", ".join(
            f"{source} {error}%" for source, error in summary["loso_median_abs_error_pct_by_source"].items()),
        f"- latency interval: x/exp({summary['interval_log_halfwidth']}) "
        f"(80th percentile of LOSO log error; covers {summary['interval_coverage_loso']:.0%} of LOSO points)",
        "- fitted: " + ", ".join(f"{k} {v}" for k, v in parameters.items()), "",
        "| point | device | runtime | model | precision | threads | measured ms | LOSO estimate ms | LOSO error % "
        "| in-fit estimate ms |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        loso = "shown only" if r["loso_estimate_ms"] is None else f"{r['loso_estimate_ms']}"
        err = "" if r["loso_error_pct"] is None else f"{r['loso_error_pct']:+.1f}"
        lines.append(f"| {r['id']} | {r['device']} | {r['runtime']} | {r['model']} | {r['precision']} | "
                     f"{r['threads']} | {r['measured_ms']} | {loso} | {err} | {r['fit_estimate_ms']} |")
    section = "\n".join(lines) + "\n"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    BENCHMARKS.write_text(text)


if __name__ == "__main__":
    main()
