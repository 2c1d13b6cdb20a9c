"""What the PyTorch and TensorFlow technique benchmarks share: the command line and its run, the
run of every technique on one model, the targets it is checked against, its markdown table, and the rewrite
of the script's own section of BENCHMARKS.md.

Each model goes through the app's own orchestrator (`optimization.orchestrator.run_experiment`,
plan "all") with a `RecordingSink`, so the benchmark reports what a user of the app would see:
the same loading, baseline, evaluation, estimates and ETAs. The scripts call
`prepare_worker_process()` before importing a backend, as the worker does.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Callable

from optimization.backends import LAYOUTS, get_backend
from optimization.base import TECHNIQUES
from optimization.datasets import load_dataset, load_digits_preset, write_digits_preset
from optimization.orchestrator import ExperimentSpec, RecordingSink, run_experiment

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
RESULTS_DIR = ROOT / "bench" / "results"
# both scripts train their MobileNetV2 from scratch for as long, so the two tables compare
MOBILENET_EPOCHS = 15
DEMO_DATASET = "digits"
MOBILENET_DATASET = "digits-32x32-rgb"
MOBILENET_PREPROCESSING = {"resize": [32, 32], "channels": 3}


def run(description: str, framework: str, machine: str, mobilenet: Callable, technique_targets: dict,
        write_section: Callable[[list[dict], str], None]) -> None:
    """The command line both scripts share: `[--work-dir DIR] [--skip-mobilenet]`.

    Benchmarks the app's demo model on the digits preset (written to the work dir), then, unless
    skipped, the model `mobilenet(work_dir, preset)` builds, trains and saves, returned as (label,
    model path); it is fed MOBILENET_DATASET (the preset with MOBILENET_PREPROCESSING). Writes
    bench/results/{framework}.json, then `write_section(results, machine)`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--skip-mobilenet", action="store_true")
    args = parser.parse_args()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix=f"edgeopt-bench-{framework}-"))
    preset = work_dir / "preset"
    write_digits_preset(preset)

    backend = get_backend(framework)
    digits = load_digits_preset(preset, LAYOUTS[framework])
    demo = backend.train_demo_model(digits, work_dir / f"digits_cnn{backend.native_suffix}")
    shape = "x".join(str(size) for size in digits.input_shape)
    results = [bench_model(framework, f"digits_cnn on digits ({shape})", demo, preset, DEMO_DATASET, None,
                           work_dir / "digits_cnn", technique_targets)]
    if not args.skip_mobilenet:
        label, path = mobilenet(work_dir, preset)
        results.append(bench_model(framework, label, path, preset, MOBILENET_DATASET, MOBILENET_PREPROCESSING,
                                   work_dir / "mobilenet_v2", technique_targets))
    results_path = RESULTS_DIR / f"{framework}.json"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps({"machine": machine, "results": results}, indent=2, default=str))
    write_section(results, machine)
    print(f"wrote {results_path} and the {framework} section of {BENCHMARKS}")


def targets(int8_speedup: float) -> dict:
    """(description, check) per technique with a target from the project brief. Only the INT8
    speed-up differs between runtimes: onnxruntime's INT8 kernels gain less over FP32 than LiteRT's."""
    return {
        "ptq_int8": (f"INT8: drop <= 1 pt, >= 3.5x smaller, >= {int8_speedup:g}x faster",
                     lambda r: r["accuracy_drop_pts"] <= 1 and r["compression_ratio"] >= 3.5
                     and r["speedup"] >= int8_speedup),
        "prune_structured": ("structured: >= 2x faster at drop <= 2 pts",
                             lambda r: r["speedup"] >= 2 and r["accuracy_drop_pts"] <= 2),
        "hybrid": ("hybrid: >= 10x smaller at drop <= 2 pts",
                   lambda r: r["compression_ratio"] >= 10 and r["accuracy_drop_pts"] <= 2),
    }


def bench_model(framework: str, label: str, model_path: Path, preset: Path, dataset_name: str,
                preprocessing: dict | None, work_dir: Path, technique_targets: dict,
                techniques=TECHNIQUES) -> dict:
    """Each of `techniques` (default: all) on the model at `model_path`, through the orchestrator
    (plan "all"), each deploy file compared with the model's FP32 deploy file."""
    config = {"seed": 0, **({"preprocessing": preprocessing} if preprocessing else {})}
    spec = ExperimentSpec(experiment_id=0, framework=framework, model_path=Path(model_path), dataset_path=preset,
                          dataset_name=dataset_name, target_device="rpi4", goal="balanced", constraints={},
                          techniques=list(techniques), output_dir=work_dir, config=config)
    sink = RecordingSink()
    run_experiment(spec, sink)
    baseline = {key: sink.baseline_metrics.get(key) for key in ("accuracy", "size_bytes", "latency_ms", "params", "macs")}
    print(f"[{label}] baseline {baseline}", flush=True)
    rows = []
    for name in techniques:
        run_row = sink.runs[name]
        if run_row["status"] != "completed":
            rows.append({"technique": name, "status": run_row["status"], "reason": run_row.get("error")})
            continue
        details = {key: value for key, value in run_row["details"].items() if key != "analysis"}
        row = {"technique": name, "status": "completed",
               **{key: run_row.get(key) for key in ("accuracy", "size_bytes", "latency_ms", "params", "macs")},
               "wall_s": details["wall_time_s"], "estimated_s": details["estimated_s"], "details": details,
               "accuracy_drop_pts": round(run_row["accuracy_drop"], 2),
               "compression_ratio": round(run_row["compression_ratio"], 2),
               "speedup": round(run_row["speedup"], 2),
               "estimate_within_2x": 0.5 <= details["estimated_s"] / max(details["wall_time_s"], 1e-9) <= 2.0}
        if name in technique_targets:
            description, check = technique_targets[name]
            row["target"], row["target_met"] = description, bool(check(row))
        print(f"[{label}] {name}: " + json.dumps({k: v for k, v in row.items() if k != "details"}, default=str),
              flush=True)
        rows.append(row)
    dataset = load_dataset(preset, dataset_name, LAYOUTS[framework], preprocessing)
    return {"model": label, "baseline": baseline, "dataset": dataset.summary(), "runs": rows,
            "recommendation": (sink.recommended or {}).get("technique"),
            "total_wall_s": round(sum(r.get("wall_s", 0) for r in rows), 1)}


def markdown_table(result: dict, deploy_format: str, latency_column: str,
                   notes: Callable[[dict], str]) -> list[str]:
    """One model's subsection: its baseline line and one row per technique.

    `deploy_format` names the baseline file ("ONNX", "`.tflite`"), `latency_column` the runtime
    that timed it, and `notes(run)` gives the one detail per technique a reader needs."""
    base = result["baseline"]
    lines = [
        f"### {result['model']}",
        "",
        f"Baseline FP32 {deploy_format}: accuracy {base['accuracy']:.2%}, {base['size_bytes'] / 1e3:.0f} kB, "
        f"{base['latency_ms']:.3f} ms, {base['params']:,} params, {base['macs'] / 1e6:.2f} M MACs. "
        f"Dataset: {result['dataset']['name']} {result['dataset']['input_shape']} "
        f"({result['dataset']['train']} train / {result['dataset']['test']} test). "
        f"All seven: {result['total_wall_s']:.0f} s wall.",
        "",
        f"| technique | accuracy | drop (pts) | size kB | ratio | {latency_column} | speedup | params | MACs (M) "
        "| wall s | est. s | notes | target |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["runs"]:
        if r["status"] != "completed":
            # the reason fills the accuracy cell; the eleven cells after it stay empty
            lines.append(f"| {r['technique']} | {r['status']}: {r['reason']} |" + "|" * 11)
            continue
        target = (("met: " if r["target_met"] else "**missed**: ") + r["target"]) if "target" in r else ""
        lines.append(
            f"| {r['technique']} | {r['accuracy']:.2%} | {r['accuracy_drop_pts']:+.2f} "
            f"| {r['size_bytes'] / 1e3:.0f} | {r['compression_ratio']:.2f}x | {r['latency_ms']:.3f} "
            f"| {r['speedup']:.2f}x | {r['params']:,} | {r['macs'] / 1e6:.2f} | {r['wall_s']:.1f} "
            f"| {r['estimated_s']:.1f} | {notes(r)} | {target} |")
    return lines + [""]


def rewrite_section(path: Path, heading: str, generated: str) -> None:
    """Replace the generated part of the `heading` section of `path` with `generated`.

    The section runs from `heading` to the next `## ` heading. Its generated part ends with its
    last table row; what follows (the hand-written reading of the results) is kept after the new
    tables, so a re-run does not erase it. A missing section is appended."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if heading not in text:
        path.write_text(text.rstrip("\n") + "\n\n" + generated.rstrip("\n") + "\n")
        return
    before, _, rest = text.partition(heading)
    following = rest.find("\n## ")
    old_section, after = (rest[:following], rest[following:]) if following >= 0 else (rest, "")
    old_lines = old_section.split("\n")
    table_rows = [i for i, line in enumerate(old_lines) if line.startswith("|")]
    notes = "\n".join(old_lines[table_rows[-1] + 1:]).strip("\n") if table_rows else ""
    section = generated.rstrip("\n") + "\n" + (f"\n{notes}\n" if notes else "")
    path.write_text(before + section + after)
