"""Run the seven TensorFlow techniques on two Keras models and record what they achieve.

1. `digits_cnn` (the demo model, ~360k parameters) on scikit-learn's digits, 8x8x1.
2. keras.applications MobileNetV2 (alpha 0.35, weights=None, ~420k parameters) at 32x32x3:
   the digits images upscaled to 32x32 and repeated to 3 channels (bilinear,
   `load_dataset(..., {"resize": [32, 32], "channels": 3})`), because no dataset may be
   downloaded here; trained from scratch by this script.

Every number comes from the saved `.tflite` run in LiteRT by `optimization.evaluator.evaluate`
(the app's own code): accuracy on the test split, file size, median batch-1 latency with
1 thread. Writes bench/results/tensorflow.json and the "## TensorFlow techniques" section of
BENCHMARKS.md.

    python bench/tensorflow_techniques.py [--work-dir DIR] [--skip-mobilenet]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from optimization.backends import tensorflow as backend  # noqa: E402
from optimization.base import TECHNIQUES, TechniqueConfig, TechniqueNotApplicable  # noqa: E402
from optimization.datasets import load_dataset, load_digits_preset, write_digits_preset  # noqa: E402
from optimization.evaluator import evaluate  # noqa: E402
from optimization.techniques import get_technique  # noqa: E402
from optimization.zoo.keras import mobilenet_v2_small  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "tensorflow.json"
BENCHMARKS = ROOT / "BENCHMARKS.md"
SECTION = "## TensorFlow techniques"
MOBILENET_EPOCHS = 15
TARGETS = {
    "ptq_int8": ("INT8: drop <= 1 pt, >= 3.5x smaller, >= 2x faster",
                 lambda r: r["accuracy_drop_pts"] <= 1 and r["compression_ratio"] >= 3.5
                 and r["speedup"] >= 2),
    "prune_structured": ("structured: >= 2x faster at drop <= 2 pts",
                         lambda r: r["speedup"] >= 2 and r["accuracy_drop_pts"] <= 2),
    "hybrid": ("hybrid: >= 10x smaller at drop <= 2 pts",
               lambda r: r["compression_ratio"] >= 10 and r["accuracy_drop_pts"] <= 2),
}


def bench_model(label: str, model, dataset, work_dir: Path) -> dict:
    baseline = evaluate(backend.BACKEND, backend.BACKEND.export_deploy(model, work_dir / "baseline.tflite"),
                        dataset)
    params, macs = backend.count_params_macs(model.module)
    model_info = {"params": params, "macs": macs, "train_samples": len(dataset.x_train),
                  "calib_samples": len(dataset.x_calib)}
    print(f"[{label}] baseline {baseline}", flush=True)
    rows = []
    for name in TECHNIQUES:
        technique = get_technique("tensorflow", name)
        config = TechniqueConfig(work_dir / name)
        estimate = technique.estimate_time(model_info, config)
        start = time.perf_counter()
        try:
            result = technique.optimize(model, config, dataset, lambda *_: None)
        except TechniqueNotApplicable as reason:
            rows.append({"technique": name, "status": "skipped", "reason": str(reason)})
            continue
        wall = time.perf_counter() - start
        row = {"technique": name, "status": "completed",
               **evaluate(backend.BACKEND, result.artifacts["deploy"], dataset),
               "params": result.params, "macs": result.macs, "wall_s": round(wall, 1),
               "estimated_s": round(estimate, 1), "details": result.details}
        row.update({
            "accuracy_drop_pts": round(100 * (baseline["accuracy"] - row["accuracy"]), 2),
            "compression_ratio": round(baseline["size_bytes"] / row["size_bytes"], 2),
            "speedup": round(baseline["latency_ms"] / row["latency_ms"], 2),
            "estimate_within_2x": 0.5 <= estimate / wall <= 2.0,
        })
        if name in TARGETS:
            row["target"], row["target_met"] = TARGETS[name][0], bool(TARGETS[name][1](row))
        print(f"[{label}] {name}: " + json.dumps({k: v for k, v in row.items() if k != "details"}),
              flush=True)
        rows.append(row)
    return {"model": label, "baseline": {**baseline, "params": params, "macs": macs},
            "dataset": dataset.summary(), "runs": rows,
            "total_wall_s": round(sum(r.get("wall_s", 0) for r in rows), 1)}


def mobilenet_model(work_dir: Path, preset: Path):
    dataset = load_dataset(preset, "digits-32x32-rgb", "NHWC", {"resize": [32, 32], "channels": 3})
    backend.keras.utils.set_random_seed(0)
    module = backend.follow_batchnorm_faster(mobilenet_v2_small(dataset.input_shape, dataset.num_classes))
    backend.fit(module, dataset.x_train, dataset.y_train, MOBILENET_EPOCHS, learning_rate=2e-3)
    path = backend.save_keras(module, work_dir / "mobilenet_v2.keras")
    return backend.BACKEND.load(path), dataset


def notes(run: dict) -> str:
    details = run["details"]
    parts = []
    if "compressed_size_bytes" in details:
        parts.append(f"gzip {details['compressed_size_bytes'] / 1e3:.0f} kB "
                     f"({run['size_bytes'] / details['compressed_size_bytes']:.2f}x smaller compressed)")
    for key in ("sparsity", "sparsity_in_int8_file"):
        if key in details:
            parts.append(f"{key.replace('_', ' ')} {details[key]:.0%}")
    if "student_alone_accuracy" in details:
        parts.append(f"student alone {details['student_alone_accuracy']:.2%}, "
                     f"distilled {details['student_distilled_accuracy']:.2%} (Keras)")
    if "scheme" in details:
        parts.append(f"scheme {details['scheme']}")
    return "; ".join(parts)


def table(result: dict) -> list[str]:
    base = result["baseline"]
    lines = [
        f"### {result['model']}",
        "",
        f"Baseline FP32 `.tflite`: accuracy {base['accuracy']:.2%}, {base['size_bytes'] / 1e3:.0f} kB, "
        f"{base['latency_ms']:.3f} ms, {base['params']:,} params, {base['macs'] / 1e6:.2f} M MACs. "
        f"Dataset: {result['dataset']['name']} {result['dataset']['input_shape']} "
        f"({result['dataset']['train']} train / {result['dataset']['test']} test). "
        f"All seven: {result['total_wall_s']:.0f} s wall.",
        "",
        "| technique | accuracy | drop (pts) | size kB | ratio | LiteRT ms | speedup | params | MACs (M) "
        "| wall s | est. s | notes | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["runs"]:
        if r["status"] != "completed":
            lines.append(f"| {r['technique']} | skipped: {r['reason']} ||||||||||||")
            continue
        target = (("met: " if r["target_met"] else "**missed**: ") + r["target"]) if "target" in r else ""
        lines.append(
            f"| {r['technique']} | {r['accuracy']:.2%} | {r['accuracy_drop_pts']:+.2f} "
            f"| {r['size_bytes'] / 1e3:.0f} | {r['compression_ratio']:.2f}x | {r['latency_ms']:.3f} "
            f"| {r['speedup']:.2f}x | {r['params']:,} | {r['macs'] / 1e6:.2f} | {r['wall_s']:.1f} "
            f"| {r['estimated_s']:.1f} | {notes(r)} | {target} |")
    return lines + [""]


def write_section(results: list[dict], machine: str) -> None:
    lines = [
        SECTION,
        "",
        "Generated by `bench/tensorflow_techniques.py` (raw: `bench/results/tensorflow.json`). "
        "Accuracy is the saved `.tflite` re-run in LiteRT on the test split; size is the downloadable "
        "`.tflite`; latency is the median batch-1 LiteRT latency with 1 thread; ratio and speedup are "
        "against the FP32 `.tflite` of the same model; \"est. s\" is the technique's own ETA. "
        "Unstructured pruning's zeros only show compressed (gzip -9, in notes): its dense file is not "
        f"smaller. Machine: {machine}; shared with other engineers' training jobs during the run, so "
        "wall times and latencies are noisy.",
        "",
    ]
    for result in results:
        lines += table(result)
    section = "\n".join(lines)
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    if SECTION in text:
        before, _, rest = text.partition(SECTION)
        following = rest.find("\n## ")
        text = before + section + (rest[following:] if following >= 0 else "\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    BENCHMARKS.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--skip-mobilenet", action="store_true")
    args = parser.parse_args()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="edgeopt-bench-tensorflow-"))
    preset = work_dir / "preset"
    write_digits_preset(preset)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, TensorFlow {backend.tf.__version__}, "
               f"LiteRT {backend.LITERT_THREADS} thread")
    results = []

    digits = load_digits_preset(preset, "NHWC")
    demo = backend.BACKEND.load(backend.BACKEND.train_demo_model(digits, work_dir / "digits_cnn.keras"))
    results.append(bench_model("digits_cnn on digits (8x8x1)", demo, digits, work_dir / "digits_cnn"))
    if not args.skip_mobilenet:
        mobilenet, digits32 = mobilenet_model(work_dir, preset)
        results.append(bench_model("keras.applications MobileNetV2 (alpha 0.35) on digits upscaled to 32x32x3",
                                   mobilenet, digits32, work_dir / "mobilenet_v2"))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "results": results}, indent=2, default=str))
    write_section(results, machine)
    print(f"wrote {RESULTS} and the '{SECTION}' section of {BENCHMARKS}")


if __name__ == "__main__":
    main()
