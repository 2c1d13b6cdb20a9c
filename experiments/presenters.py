"""What the pages show, worked out from the rows: a run's details in words, spreads, the
chart's data and Pareto fronts, the recommendation in parts, download labels. Pure
functions of rows and dicts, so the views stay thin and the rules are tested alone."""
from __future__ import annotations

import math
import re

from .templatetags.edgeopt import count, percent, size_bytes

MB = 2**20
# z for a two-sided 95% interval
Z95 = 1.959964

# The x axes the results chart offers: (key, label with unit, how to read it from a point).
CHART_AXES = {
    "size": "Download size (KB)",
    "host_latency": "Host latency, measured (ms)",
    "device_latency": "Device latency, estimated (ms)",
    "energy": "Energy per inference, estimated (mJ)",
}
CHART_DEFAULT_AXIS = "size"


# -- numbers with their spread -----------------------------------------------------------------


def wilson_interval(accuracy: float | None, n: int | None) -> tuple[float, float] | None:
    """95% Wilson score interval of a proportion measured on n samples."""
    if accuracy is None or not n:
        return None
    centre = (accuracy + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(accuracy * (1 - accuracy) / n + Z95**2 / (4 * n**2)) / (1 + Z95**2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_samples(metrics: dict) -> int | None:
    """How many test samples the accuracy was measured on, when the row says."""
    return int(metrics["accuracy_n"]) if metrics.get("accuracy_n") else None


def accuracy_interval(metrics: dict, samples: int | None = None) -> tuple[float, float] | None:
    """The row's 95% interval (the evaluator stores it), else Wilson's from the sample count."""
    if metrics.get("accuracy_low") is not None and metrics.get("accuracy_high") is not None:
        return float(metrics["accuracy_low"]), float(metrics["accuracy_high"])
    return wilson_interval(metrics.get("accuracy"), samples or accuracy_samples(metrics))


def speedup_range(metrics: dict) -> tuple[float, float] | None:
    low, high = metrics.get("speedup_low"), metrics.get("speedup_high")
    return (float(low), float(high)) if low is not None and high is not None else None


def latency_range(metrics: dict) -> tuple[float, float] | None:
    """The spread of the timing blocks (fastest to slowest block median), where measured."""
    low, high = metrics.get("latency_ms_low"), metrics.get("latency_ms_high")
    return (float(low), float(high)) if low is not None and high is not None else None


def speedup_within_noise(run: dict, baseline: dict) -> bool:
    """The evaluator's verdict (paired timings whose speedup range includes 1) when the row
    has it; else whether the run's latency range overlaps the baseline's."""
    if run.get("speedup_within_noise") is not None:
        return bool(run["speedup_within_noise"])
    ours, theirs = latency_range(run), latency_range(baseline)
    return bool(ours and theirs and ours[0] <= theirs[1] and theirs[0] <= ours[1])


# -- a run's details in words -------------------------------------------------------------------


def _sentence(key: str, value, details: dict) -> str | None:
    if value in (None, "", [], {}):
        return None
    match key:
        case "bits":
            return f"Weights stored in {value} bits."
        case "precision":
            return f"Runs in {value}."
        case "weights":
            return f"Weights: {value}."
        case "activations":
            return f"Activations: {value}."
        case "calibration_samples":
            return f"Ranges calibrated on {value} training samples."
        case "epochs":
            return f"Fine-tuned for {value} epoch{'s' if value != 1 else ''}."
        case "sparsity_reached" | "sparsity":
            return f"{percent(value, 1)} of the weights are zero."
        case "target_sparsity":
            return f"Target sparsity {percent(value, 0)}."
        case "pruning_ratio":
            return f"{percent(value, 0)} of the channels cut."
        case "channels_kept":
            return f"{percent(value, 0)} of the channels kept in the layers that were cut."
        case "bits_per_layer":
            by_bits: dict = {}
            for bits in value.values():
                by_bits[bits] = by_bits.get(bits, 0) + 1
            return "Weights per layer: " + ", ".join(
                f"{n} layer{'s' if n != 1 else ''} at {bits} bits" for bits, n in sorted(by_bits.items(), key=str)) + "."
        case "float_layers":
            return (f"{len(value)} weighted layer{'s' if len(value) != 1 else ''} stayed in float: "
                    f"{', '.join(map(str, value[:8]))}{' …' if len(value) > 8 else ''}.")
        case "student_ratio":
            return f"The student keeps {percent(1 - float(value), 0)} of the teacher's channels."
        case "channel_multiple":
            return f"Channel counts kept to multiples of {value} (the runtime's vector block)."
        case "params_before":
            after = details.get("params_after")
            return f"Parameters {count(value)} → {count(after)}." if after is not None else None
        case "macs_before":
            after = details.get("macs_after")
            return f"Multiply-accumulates {count(value)} → {count(after)}." if after is not None else None
        case "gain_from_distillation_points":
            return f"Distillation gained {float(value):+.2f} points over training the student alone."
        case "calibration_accuracy_before_fine_tuning":
            return f"Accuracy right after cutting, before fine-tuning: {percent(value)} (calibration samples)."
        case "final_train_loss":
            return f"Final training loss {float(value):.4f}."
        case "temperature":
            return f"Distillation temperature {value}."
        case "weight_granularity":
            return f"Weight scales: {value}."
        case "scheme" | "mode":
            return f"Scheme: {value}."
        case "compressed_size_bytes":
            return f"{size_bytes(value)} after gzip (where zeros show)."
        case "kept_wider" | "kept_float":
            names = value if isinstance(value, dict) else {name: "" for name in value}
            reasons = sorted({str(reason) for reason in names.values() if reason})
            return (f"{len(names)} layer{'s' if len(names) != 1 else ''} kept at higher precision"
                    + (f": {'; '.join(reasons)}." if reasons else "."))
        case "native" | "native_note":
            return f"Native file: {value}."
        case "note" | "accuracy_note":
            return f"{value}"
    return None


DESCRIBED = ("bits", "precision", "bits_per_layer", "float_layers", "channels_kept", "weights", "activations", "calibration_samples", "epochs", "sparsity_reached",
             "sparsity", "target_sparsity", "pruning_ratio", "student_ratio", "channel_multiple", "params_before",
             "macs_before", "gain_from_distillation_points", "calibration_accuracy_before_fine_tuning",
             "final_train_loss", "temperature", "weight_granularity", "scheme", "mode", "compressed_size_bytes",
             "kept_wider", "kept_float", "native", "native_note", "note", "accuracy_note")
NOT_SHOWN = {"analysis", "params_after", "macs_after"}


def describe_details(details: dict) -> tuple[list[str], dict]:
    """(sentences for what the page knows how to say, the remaining details as they are)."""
    details = details or {}
    sentences = [text for key in DESCRIBED if key in details
                 if (text := _sentence(key, details[key], details))]
    rest = {key: value for key, value in details.items()
            if key not in DESCRIBED and key not in NOT_SHOWN}
    return sentences, rest


def precision_word(details: dict) -> str:
    """"int8", "int4", "float" — what the deploy file's weights are."""
    bits = (details or {}).get("bits")
    precision = str((details or {}).get("precision") or "")
    if bits == 4 or "int4" in precision:
        return "int4"
    if bits == 8 or "int8" in precision:
        return "int8"
    return "float"


def download_label(kind: str, file_format: str, details: dict) -> str:
    """What a download holds: "int8 ONNX (deploy)", "float .pt2 (native)"."""
    if kind == "deploy":
        return f"{precision_word(details)} {file_format.upper()} (deploy)"
    # Native files are float (the quantized form exists only in the deploy format) unless
    # the technique says it saved the quantized graph.
    native = str((details or {}).get("native") or "").lower()
    word = next((bits for bits in ("int8", "int4") if bits in native), "float")
    return f"{word} .{file_format} (native)"


# -- the recommendation in parts -----------------------------------------------------------------

SENTENCE_BREAK = re.compile(r"(?<=\.)\s+(?=[A-Z]|ptq_|prune_|distillation|qat|hybrid)")


def reasoning_parts(text: str) -> list[str]:
    """The recommender's paragraph as its sentences: one claim per line reads at a glance."""
    return [part.strip() for part in SENTENCE_BREAK.split(text or "") if part.strip()]


# -- chart data ------------------------------------------------------------------------------------


def _point(label: str, metrics: dict, kind: str) -> dict:
    estimates = metrics.get("estimates") or {}
    size = metrics.get("size_bytes")
    return {
        "label": label, "kind": kind,
        "accuracy": None if metrics.get("accuracy") is None else round(metrics["accuracy"] * 100, 3),
        "size": None if size is None else round(size / 1024, 2),
        "host_latency": metrics.get("latency_ms"),
        "device_latency": estimates.get("latency_ms"),
        "energy": estimates.get("energy_mj"),
    }


def pareto_front(points: list[dict], axis: str) -> list[str]:
    """Labels of the points no other point beats: at least as low on `axis` and as accurate,
    better in one. Sorted along the axis, so the front draws as a line."""
    usable = [p for p in points if p.get(axis) is not None and p.get("accuracy") is not None]

    def beats(a, b):
        return a[axis] <= b[axis] and a["accuracy"] >= b["accuracy"] and (a[axis], a["accuracy"]) != (
            b[axis], b["accuracy"])

    front = [p for p in usable if not any(beats(q, p) for q in usable)]
    return [p["label"] for p in sorted(front, key=lambda p: (p[axis], -p["accuracy"]))]


def chart_data(baseline: dict, runs: list[dict], constraints: dict, recommended: str | None) -> dict | None:
    """Points (baseline + completed runs), the Pareto front per axis, constraint limits in the
    axes' units, and which point is recommended; None with fewer than two points."""
    points = [_point("baseline", baseline, "baseline")] if baseline else []
    points += [_point(run["technique"], run, "run") for run in runs if run.get("status") == "completed"]
    points = [p for p in points if p["accuracy"] is not None]
    if len(points) < 2:
        return None
    limits = {}
    if constraints.get("max_size_mb") is not None:
        limits["size"] = constraints["max_size_mb"] * MB / 1024
    if constraints.get("max_latency_ms") is not None:
        limits["device_latency"] = constraints["max_latency_ms"]
    if constraints.get("max_energy_mj") is not None:
        limits["energy"] = constraints["max_energy_mj"]
    if constraints.get("max_accuracy_drop") is not None and baseline.get("accuracy") is not None:
        limits["accuracy"] = round(baseline["accuracy"] * 100 - constraints["max_accuracy_drop"], 3)
    return {
        "axes": CHART_AXES,
        "default_axis": CHART_DEFAULT_AXIS,
        "points": points,
        "fronts": {axis: pareto_front(points, axis) for axis in CHART_AXES},
        "limits": limits,
        "recommended": recommended,
    }
