"""Fit the PerformanceEstimator to published Raspberry Pi measurements and validate it.

1. Builds the standard 224x224 classifiers of the calibration set (MobileNet V1/V2/V3-Large/
   V3-Small, EfficientNet-Lite0, ResNet-18/50) as Keras graphs with random weights (only the op graph matters for latency),
   converts them to fp32 .tflite and reads them with optimization.graph.
2. Fits the estimator's parameters (optimization.estimator.parameter_names) by least squares
   on log latency, with weak priors that tie parameters no measurement informs.
3. Leave-one-source-out: refits without each source and predicts that source's points; from
   those held-out predictions it scores the latency, the INT8 speed-up of every (model, board,
   runtime, threads) measured at both precisions, and Kendall's tau of the ranking of the
   variants each source measured under one condition.
4. Writes optimization/devices/fitted.json (read by the estimator), bench/results/estimator.json
   and the "## Estimator validation" section of BENCHMARKS.md.

Run: .venv/bin/python bench/estimator_validation.py [--cache DIR]
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
# issue 13's targets, on the calibration data, leave-one-source-out
TARGETS = {"latency_pct": 20.0, "int8_speedup_pct": 20.0, "kendall_tau": 0.9}
# measured latencies closer than this are one rank within the sources' reporting noise
RANK_TIE = 0.03

# prior mean and standard deviation per parameter (log space unless named otherwise)
PRIOR_DEFAULT = (math.log(0.3), 3.0)
PRIORS = {
    "int8_shared": (0.0, 1.0),
    "thread_scaling_logit": (1.5, 2.0),
    "log_op_overhead_s": (math.log(20e-6), 1.0),
    "log_bandwidth_fraction": (math.log(0.3), 0.5),
    "log_output_cost_macs": (math.log(8.0), 1.5),
    "int8_thread_scaling": (0.0, 1.0),
    "log_roofline_sharpness": (math.log(4.0), 1.0),
    "log_int8_elementwise_cycles": (math.log(2.0), 1.5),
}
PRIOR_PREFIXES = {"int8_gain:": (0.0, 0.3), "int8_kind:": (0.0, 0.7), "int8_runtime_kind:": (0.0, 0.25),
                  "uarch:": (0.0, 0.5), "kind:": (0.0, 1.0), "isa_armv7:": (0.0, 0.3)}
# onnxruntime has no Pi measurement: keep it on TensorFlow Lite's efficiencies (both NEON GEMM)
TIED = ([("runtime_fp32:onnxruntime", "runtime_fp32:tflite", 0.05), ("int8_gain:onnxruntime", "int8_gain:tflite", 0.05)]
        + [(f"int8_runtime_kind:onnxruntime:{k}", f"int8_runtime_kind:tflite:{k}", 0.05) for k in estimator.INT8_KINDS])


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
        "mobilenet_v3_small": lambda: apps.MobileNetV3Small(input_shape=shape, weights=None,
                                                            include_preprocessing=False),
        "efficientnet_lite0": lambda: efficientnet_lite0(keras, shape),
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


def efficientnet_lite0(keras, shape):
    """EfficientNet-Lite0 (TensorFlow TPU repo's efficientnet/lite): EfficientNet-B0's blocks
    without squeeze-and-excitation, ReLU6 instead of swish; keras.applications has none."""
    layers = keras.layers

    def conv_bn(x, filters, kernel, stride, relu=True):
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        return layers.ReLU(6.0)(x) if relu else x

    inputs = keras.Input(shape)
    x = conv_bn(inputs, 32, 3, 2)
    # (kernel, repeats, output channels, expansion, first stride) of EfficientNet-B0
    for kernel, repeats, filters, expansion, stride in ((3, 1, 16, 1, 1), (3, 2, 24, 6, 2), (5, 2, 40, 6, 2),
                                                        (3, 3, 80, 6, 2), (5, 3, 112, 6, 1), (5, 4, 192, 6, 2),
                                                        (3, 1, 320, 6, 1)):
        for repeat in range(repeats):
            block_stride = stride if repeat == 0 else 1
            y = conv_bn(x, x.shape[-1] * expansion, 1, 1) if expansion != 1 else x
            y = layers.DepthwiseConv2D(kernel, block_stride, padding="same", use_bias=False)(y)
            y = layers.ReLU(6.0)(layers.BatchNormalization()(y))
            y = conv_bn(y, filters, 1, 1, relu=False)
            x = layers.Add()([x, y]) if block_stride == 1 and x.shape[-1] == filters else y
    x = conv_bn(x, 1280, 1, 1)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(1000, activation="softmax")(x), name="efficientnet_lite0")


def model_graphs(cache: Path, names: set[str]) -> dict:
    cache.mkdir(parents=True, exist_ok=True)
    graphs = {}
    for name in sorted(names):
        path = cache / f"{name}_224_fp32.tflite"
        if not path.exists():
            import tensorflow as tf  # only to build what the cache lacks

            builders = build_keras_models()
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
            parameters, point.get("clock_ghz"), point.get("isa", "aarch64"))

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
    rows = loso_rows(fit, points, used, full)
    # the same validation with the points left out by a judgement about their source (a
    # revision its maintainers replaced, an unstated thread count) fitted too: what the
    # headline numbers owe to those choices
    chosen = [dict(p, use=True) for p in points if p["use"] or p.get("left_out_by_choice")]
    with_chosen = headline(loso_rows(fit, chosen, chosen, fit.run(chosen)))

    speedups = speedup_rows(rows)
    speedup_abs = [abs(s["loso_error_pct"]) for s in speedups]
    ranking = kendall_by_source(rows)
    ranking_untied = kendall_by_source(rows, RANK_TIE)
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
        "int8_speedup_pairs": len(speedups),
        "int8_speedup_loso_median_abs_error_pct": round(statistics.median(speedup_abs), 1),
        "int8_speedup_loso_max_abs_error_pct": round(max(speedup_abs), 1),
        "int8_speedup_range_measured": [min(s["measured"] for s in speedups), max(s["measured"] for s in speedups)],
        "int8_speedup_range_loso": [min(s["loso_estimate"] for s in speedups), max(s["loso_estimate"] for s in speedups)],
        "kendall_tau_loso_pooled": ranking["pooled"],
        "kendall_tau_loso_by_source": ranking["by_source"],
        "kendall_tau_loso_pooled_without_near_ties": ranking_untied["pooled"],
        "with_points_left_out_by_choice": dict(with_chosen, points_used=len(chosen)),
        "parameters": len(full),
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
    RESULTS.write_text(json.dumps({"summary": summary, "fitted": fitted["readable"], "points": rows,
                                   "int8_speedups": speedups}, indent=2) + "\n")
    write_benchmarks_section(summary, fitted["readable"], rows, speedups)
    print(json.dumps(summary, indent=2))


def loso_rows(fit: Fit, points: list[dict], used: list[dict], full: dict) -> list[dict]:
    """One row per point: the used ones predicted by a fit without their source, the others
    shown with the full fit's estimate only."""
    rows = []
    for source in sorted({p["source"] for p in used}):
        parameters = fit.run([p for p in used if p["source"] != source])
        rows += [row(p, fit.predict_ms(p, parameters), fit.predict_ms(p, full)) for p in used if p["source"] == source]
    return rows + [row(p, None, fit.predict_ms(p, full)) for p in points if p not in used]


def headline(rows: list[dict]) -> dict:
    """The three numbers issue 13 sets targets for."""
    return {"loso_median_abs_error_pct": round(statistics.median(abs(r["loso_error_pct"]) for r in rows if r["use"]), 1),
            "int8_speedup_loso_median_abs_error_pct": round(statistics.median(
                abs(s["loso_error_pct"]) for s in speedup_rows(rows)), 1),
            "kendall_tau_loso_pooled": kendall_by_source(rows)["pooled"]}


def condition(r: dict) -> tuple:
    """What a source held fixed while it varied the model or the precision."""
    return r["source"], r["device"], r["runtime"], r["threads"], r["clock_ghz"], r["isa"]


def speedup_rows(rows: list[dict]) -> list[dict]:
    """INT8 speed-up (fp32 ms / int8 ms) of every model a source measured at both precisions
    under one condition, measured and as predicted by the fit that did not see that source."""
    by_key = {(condition(r), r["model"], r["precision"]): r for r in rows if r["use"]}
    out = []
    for (cond, model, precision), fp32 in sorted(by_key.items(), key=lambda item: item[1]["id"]):
        int8 = by_key.get((cond, model, "int8"))
        if precision != "fp32" or int8 is None:
            continue
        measured = fp32["measured_ms"] / int8["measured_ms"]
        predicted = fp32["loso_estimate_ms"] / int8["loso_estimate_ms"]
        out.append({"source": cond[0], "device": cond[1], "runtime": cond[2], "threads": cond[3],
                    "clock_ghz": cond[4], "isa": cond[5], "model": model,
                    "measured": round(measured, 2), "loso_estimate": round(predicted, 2),
                    "in_fit_estimate": round(fp32["fit_estimate_ms"] / int8["fit_estimate_ms"], 2),
                    "loso_error_pct": round(100 * (predicted - measured) / measured, 1)})
    return out


def kendall_by_source(rows: list[dict], tie: float = 0.0) -> dict:
    """Kendall's tau between measured and held-out predicted latency over the variants (model x
    precision) each source measured under one condition; pairs pooled per source and overall.
    Pairs whose measured latencies differ by less than `tie` (relative) are left out."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["use"]:
            groups.setdefault(condition(r), []).append(r)
    counts: dict[str, list[int]] = {}
    for cond, members in groups.items():
        tally = counts.setdefault(cond[0], [0, 0])
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                if abs(a["measured_ms"] - b["measured_ms"]) < tie * max(a["measured_ms"], b["measured_ms"]):
                    continue
                product = (a["measured_ms"] - b["measured_ms"]) * (a["loso_estimate_ms"] - b["loso_estimate_ms"])
                tally[0 if product > 0 else 1] += 1

    def tau(concordant, discordant):
        return round((concordant - discordant) / (concordant + discordant), 3) if concordant + discordant else None

    return {"by_source": {source: {"tau": tau(*tally), "pairs": sum(tally)} for source, tally in sorted(counts.items())},
            "pooled": tau(sum(t[0] for t in counts.values()), sum(t[1] for t in counts.values()))}


def row(point: dict, loso_ms: float | None, fit_ms: float) -> dict:
    def error(estimate):
        return None if estimate is None else round(100 * (estimate - point["latency_ms"]) / point["latency_ms"], 1)

    return {
        "id": point["id"], "source": point["source"], "device": point["device"], "runtime": point["runtime"],
        "model": point["model"], "precision": point["precision"], "threads": point["threads"],
        "clock_ghz": point.get("clock_ghz"), "isa": point.get("isa", "aarch64"),
        "use": point["use"], "measured_ms": point["latency_ms"],
        "loso_estimate_ms": None if loso_ms is None else round(loso_ms, 1), "loso_error_pct": error(loso_ms),
        "fit_estimate_ms": round(fit_ms, 1), "fit_error_pct": error(fit_ms),
        "reason": point.get("reason", ""),
    }


def readable(parameters: dict) -> dict:
    """The fitted parameters in plain units, for people."""
    out = {}
    for name, value in parameters.items():
        if name.startswith(("runtime_fp32:", "int8_gain:", "int8_kind:", "int8_runtime_kind:", "kind:", "uarch:",
                             "isa_armv7:")) \
                or name == "int8_shared":
            out[name] = round(math.exp(value), 3)
    out["thread_scaling"] = round(1 / (1 + math.exp(-parameters["thread_scaling_logit"])), 3)
    out["op_overhead_us"] = round(math.exp(parameters["log_op_overhead_s"]) * 1e6, 2)
    out["bandwidth_fraction"] = round(math.exp(parameters["log_bandwidth_fraction"]), 3)
    out["output_cost_macs"] = round(math.exp(parameters["log_output_cost_macs"]), 2)
    out["int8_thread_scaling"] = round(1 / (1 + math.exp(-parameters["thread_scaling_logit"]
                                                         - parameters["int8_thread_scaling"])), 3)
    out["int8_elementwise_cycles"] = round(math.exp(parameters["log_int8_elementwise_cycles"]), 2)
    out["roofline_sharpness"] = round(math.exp(parameters["log_roofline_sharpness"]), 2)
    return out


def board(r: dict) -> str:
    """The device, with the clock where the source overclocked it and the word size where it ran 32-bit."""
    return r["device"] + (f" @{r['clock_ghz']} GHz" if r["clock_ghz"] else "") + (" (32-bit)" if r["isa"] == "armv7" else "")


def verdict(met: bool) -> str:
    return "met" if met else "**not met**"


def write_benchmarks_section(summary: dict, parameters: dict, rows: list[dict], speedups: list[dict]) -> None:
    lines = [
        SECTION, "",
        "Generated by `bench/estimator_validation.py` (data: `optimization/devices/calibration.json`, "
        "fit: `optimization/devices/fitted.json`, raw: `bench/results/estimator.json`).",
        "Each published point is predicted by a fit that did not see its source (leave-one-source-out, LOSO). "
        "Points marked *shown only* are left out of every fit; the reason is in calibration.json.", "",
        "Targets (issue 13, on this calibration data, LOSO): median latency error <= "
        f"{TARGETS['latency_pct']:.0f}% ({verdict(summary['loso_median_abs_error_pct'] <= TARGETS['latency_pct'])}), "
        f"INT8 speed-up median error <= {TARGETS['int8_speedup_pct']:.0f}% "
        f"({verdict(summary['int8_speedup_loso_median_abs_error_pct'] <= TARGETS['int8_speedup_pct'])}), "
        f"Kendall's tau >= {TARGETS['kendall_tau']} ({verdict(summary['kendall_tau_loso_pooled'] >= TARGETS['kendall_tau'])}).",
        "",
        f"- points fitted: {summary['points_used']} from {len(summary['sources'])} sources; "
        f"shown only: {summary['points_shown_only']} (a README table its maintainers re-measured is fitted at its "
        "current revision and the replaced revision shown only; other reasons are in calibration.json)",
        "- the same validation with the {points_used} points that include those left out by a judgement about their "
        "source (replaced revisions, an unstated thread count): median latency error {loso_median_abs_error_pct}%, "
        "INT8 speed-up error {int8_speedup_loso_median_abs_error_pct}%, Kendall's tau {kendall_tau_loso_pooled}".format(
            **summary["with_points_left_out_by_choice"]),
        f"- LOSO median absolute error: **{summary['loso_median_abs_error_pct']}%** "
        f"(mean {summary['loso_mean_abs_error_pct']}%); in-sample median {summary['in_sample_median_abs_error_pct']}%",
        "- LOSO median absolute error per held-out source: " + ", ".join(
            f"{source} {error}%" for source, error in summary["loso_median_abs_error_pct_by_source"].items()),
        f"- INT8 speed-up (fp32 ms / int8 ms, {summary['int8_speedup_pairs']} model-condition pairs measured at "
        f"both precisions): LOSO median absolute error **{summary['int8_speedup_loso_median_abs_error_pct']}%** "
        f"(max {summary['int8_speedup_loso_max_abs_error_pct']}%); measured speed-ups span "
        "{0}-{1}x, the held-out estimates {2}-{3}x".format(*summary["int8_speedup_range_measured"],
                                                          *summary["int8_speedup_range_loso"]),
        f"- ranking of the variants (model x precision) each source measured under one condition, LOSO: Kendall's "
        f"tau **{summary['kendall_tau_loso_pooled']}** pooled; per source " + ", ".join(
            f"{source} {v['tau']} ({v['pairs']} pairs)" for source, v in summary["kendall_tau_loso_by_source"].items()),
        f"- the same, leaving out the pairs whose measured latencies differ by less than {RANK_TIE:.0%} "
        f"(ties within the sources' reporting noise): tau {summary['kendall_tau_loso_pooled_without_near_ties']}",
        f"- {summary['parameters']} parameters (weak priors tie what no point informs) for {summary['points_used']} "
        "points; LOSO is the judge, the in-sample error only a check",
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
        lines.append(f"| {r['id']} | {board(r)} | {r['runtime']} | {r['model']} | {r['precision']} | "
                     f"{r['threads']} | {r['measured_ms']} | {loso} | {err} | {r['fit_estimate_ms']} |")
    lines += ["", "INT8 speed-ups:", "",
              "| source | device | runtime | threads | model | measured | LOSO estimate | LOSO error % | in-fit estimate |",
              "|---|---|---|---|---|---:|---:|---:|---:|"]
    for s in speedups:
        lines.append(f"| {s['source']} | {board(s)} | {s['runtime']} | {s['threads']} | {s['model']} | "
                     f"{s['measured']} | {s['loso_estimate']} | {s['loso_error_pct']:+.1f} | {s['in_fit_estimate']} |")
    section = "\n".join(lines) + "\n"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    BENCHMARKS.write_text(text)


if __name__ == "__main__":
    main()
