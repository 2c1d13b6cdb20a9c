"""What the PyTorch and TensorFlow technique benchmarks share: the command line and its run, the
run of every technique on one model, the targets it is checked against, its markdown table, and the rewrite
of the script's own section of BENCHMARKS.md.

Every number comes from `optimization.evaluator.evaluate`, the app's own evaluator, so the
benchmark reports what a user of the app would see.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

from optimization.base import TECHNIQUES, Backend, TechniqueConfig, TechniqueNotApplicable
from optimization.datasets import load_digits_preset, write_digits_preset
from optimization.evaluator import evaluate
from optimization.graph import load_graph
from optimization.techniques import get_technique

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
RESULTS_DIR = ROOT / "bench" / "results"
# both scripts train their MobileNetV2 from scratch for as long, so the two tables compare
MOBILENET_EPOCHS = 15


def run(description: str, backend: Backend, layout: str, machine: str, mobilenet: Callable,
        params_macs: Callable, technique_targets: dict, write_section: Callable[[list[dict], str], None]) -> None:
    """The command line both scripts share: `[--work-dir DIR] [--skip-mobilenet]`.

    Benchmarks the app's demo model on the digits preset (written to the work dir, loaded in
    `layout`), then, unless skipped, the model `mobilenet(work_dir, preset)` builds and trains,
    returned as (label, model, dataset). `params_macs(model)` counts a model with the framework's
    own counter. Writes bench/results/{framework}.json, then `write_section(results, machine)`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--skip-mobilenet", action="store_true")
    args = parser.parse_args()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix=f"edgeopt-bench-{backend.framework}-"))
    preset = work_dir / "preset"
    write_digits_preset(preset)

    def bench(label: str, model, dataset, name: str) -> dict:
        return bench_model(backend, label, model, dataset, work_dir / name, params_macs(model), technique_targets)

    digits = load_digits_preset(preset, layout)
    demo = backend.load(backend.train_demo_model(digits, work_dir / f"digits_cnn{backend.native_suffix}"))
    shape = "x".join(str(size) for size in digits.input_shape)
    results = [bench(f"digits_cnn on digits ({shape})", demo, digits, "digits_cnn")]
    if not args.skip_mobilenet:
        results.append(bench(*mobilenet(work_dir, preset), "mobilenet_v2"))
    results_path = RESULTS_DIR / f"{backend.framework}.json"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps({"machine": machine, "results": results}, indent=2, default=str))
    write_section(results, machine)
    print(f"wrote {results_path} and the {backend.framework} section of {BENCHMARKS}")


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


def bench_model(backend: Backend, label: str, model, dataset, work_dir: Path,
                params_macs: tuple[int, int], technique_targets: dict, options: dict | None = None) -> dict:
    """Every technique on `model`, each deploy file compared with the model's FP32 deploy file.

    `params_macs` is the baseline's (parameters, MACs), counted by the framework's own counter;
    `options` maps a technique to options over its defaults (e.g. a smaller epoch budget)."""
    baseline_path = backend.export_deploy(model, work_dir / f"baseline{backend.deploy_suffix}")
    baseline = evaluate(backend, baseline_path, dataset)
    params, macs = params_macs
    # the orchestrator's model_info, layer count included, so the ETAs are the app's own
    model_info = {"params": params, "macs": macs, "train_samples": len(dataset.x_train),
                  "calib_samples": len(dataset.x_calib), "layers": len(load_graph(baseline_path).ops) or None}
    print(f"[{label}] baseline {baseline}", flush=True)
    rows = []
    for name in TECHNIQUES:
        technique = get_technique(backend.framework, name)
        config = TechniqueConfig(work_dir / name, options=(options or {}).get(name, {}))
        estimate = technique.estimate_time(model_info, config)
        start = time.perf_counter()
        try:
            result = technique.optimize(model, config, dataset, lambda *_: None)
        except TechniqueNotApplicable as reason:
            rows.append({"technique": name, "status": "skipped", "reason": str(reason)})
            continue
        wall = time.perf_counter() - start
        row = {"technique": name, "status": "completed",
               **evaluate(backend, result.artifacts["deploy"], dataset),
               "params": result.params, "macs": result.macs, "wall_s": round(wall, 1),
               "estimated_s": round(estimate, 1), "details": result.details}
        row.update({
            "accuracy_drop_pts": round(100 * (baseline["accuracy"] - row["accuracy"]), 2),
            "compression_ratio": round(baseline["size_bytes"] / row["size_bytes"], 2),
            "speedup": round(baseline["latency_ms"] / row["latency_ms"], 2),
            "estimate_within_2x": 0.5 <= estimate / wall <= 2.0,
        })
        if name in technique_targets:
            description, check = technique_targets[name]
            row["target"], row["target_met"] = description, bool(check(row))
        print(f"[{label}] {name}: " + json.dumps({k: v for k, v in row.items() if k != "details"}),
              flush=True)
        rows.append(row)
    return {"model": label, "baseline": {**baseline, "params": params, "macs": macs},
            "dataset": dataset.summary(), "runs": rows,
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
            lines.append(f"| {r['technique']} | skipped: {r['reason']} |" + "|" * 11)
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
