"""All seven PyTorch techniques on architectures nobody on the project wrote, in the files their
users write.

Each timm architecture (tests/foreign.py: random init, `pretrained=False`) is trained from scratch
on scikit-learn's digits upscaled to SIDE x SIDE and repeated to 3 channels (no dataset may be
downloaded here; Adam, batch PRETRAIN_BATCH, cosine decay, long enough that the FP32 accuracy is
meaningful, so the drops are not noise), saved in each of `--formats` (default: a `.pt2` with a
dynamic batch, `Dim("batch", max=1024)`, and the dynamo exporter's ONNX), loaded back by the app's
loader, and run through every technique by bench/common.py's `bench_model` (the app's orchestrator
and evaluator: the deploy file in onnxruntime on the test split). Fine-tuning techniques get
`--fine-tuning-epochs` epochs instead of their defaults, to fit the shared two-core machine; their
drops are larger than the defaults give. Writes bench/results/corpus_pytorch.json and the
"## PyTorch corpus" section of BENCHMARKS.md after each model.

    nice -n 10 python bench/corpus_pytorch.py [--work-dir DIR] [--side 32] [--architectures a,b]
                                              [--formats pt2,onnx-dynamo] [--pretrain-epochs 15]
                                              [--fine-tuning-epochs 3] [--rotate-formats] [--append]
                                              [--reuse-trained]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from optimization.worker import prepare_worker_process  # noqa: E402

WORKER = prepare_worker_process()  # as the worker does, before a backend loads: one torch thread, no AMX

from bench.common import BENCHMARKS, RESULTS_DIR, bench_model, rewrite_section, targets  # noqa: E402
from optimization.backends import pytorch as backend  # noqa: E402
from optimization.base import TECHNIQUES  # noqa: E402
from optimization.datasets import load_dataset, write_digits_preset  # noqa: E402
from tests.foreign import ARCHITECTURES, FORMATS, save, suffix, timm_model  # noqa: E402

SECTION = "## PyTorch corpus"
DEFAULT_ARCHITECTURES = ("lcnet", "mobilenetv3", "ghostnet", "efficientnet")
FINE_TUNING_EPOCHS = 3
# digits at 32x32 from scratch: 6 epochs of batch 64 (114 steps) left lcnet_035 at 66%; 15 epochs of
# batch 32 (675 steps) reach 91% (25 epochs 92%), mobilenetv3_small_050 97%, and convnext_atto
# (LayerNorm/GELU, which timm trains at low rates) 98% at 1e-3
PRETRAIN_EPOCHS, PRETRAIN_BATCH = 15, 32
PRETRAIN_LR = {"convnext": 1e-3}
DEFAULT_PRETRAIN_LR = 3e-3
FINE_TUNING = ("prune_unstructured", "prune_structured", "distillation", "qat", "hybrid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--architectures", default=",".join(DEFAULT_ARCHITECTURES),
                        help=f"families from {', '.join(ARCHITECTURES)}")
    parser.add_argument("--formats", default="pt2,onnx-dynamo", help=f"from {', '.join(FORMATS)}")
    parser.add_argument("--pretrain-epochs", type=int, default=PRETRAIN_EPOCHS)
    parser.add_argument("--fine-tuning-epochs", type=int, default=FINE_TUNING_EPOCHS,
                        help="epochs of every fine-tuning technique (instead of their defaults)")
    parser.add_argument("--rotate-formats", action="store_true",
                        help="one format per architecture, in turn (a quicker run that still covers each format)")
    parser.add_argument("--append", action="store_true",
                        help="add to the results in corpus_pytorch.json, re-read at each write (a model measured "
                             "again replaces its row), so a timed first run can be extended or runs shared")
    parser.add_argument("--reuse-trained", action="store_true",
                        help="re-measure the techniques on the model files an earlier run in the same work dir "
                             "trained and saved (its training time is kept from the results file)")
    args = parser.parse_args()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="edgeopt-bench-corpus-"))
    preset = work_dir / "preset"
    write_digits_preset(preset)
    dataset_name = f"digits-{args.side}x{args.side}-rgb"
    preprocessing = {"resize": [args.side, args.side], "channels": 3}
    dataset = load_dataset(preset, dataset_name, "NCHW", preprocessing)
    options = {name: {"epochs": args.fine_tuning_epochs} for name in FINE_TUNING}
    results_path = RESULTS_DIR / "corpus_pytorch.json"
    results = []
    formats = args.formats.split(",")
    earlier = {result["model"]: result for result in json.loads(results_path.read_text())["results"]} \
        if args.reuse_trained and results_path.exists() else {}
    for index, family in enumerate(args.architectures.split(",")):
        name = ARCHITECTURES[family]
        file_formats = [formats[index % len(formats)]] if args.rotate_formats else formats
        labels = {fmt: f"{name} ({family}) {args.side}x{args.side}, {fmt}" for fmt in file_formats}
        paths = {fmt: work_dir / f"{name}-{fmt}{suffix(fmt)}" for fmt in file_formats}
        if all(paths[fmt].exists() and labels[fmt] in earlier for fmt in file_formats):
            trained_s = earlier[labels[file_formats[0]]]["pretrain_s"]
            print(f"[{name}] reusing the model files trained earlier ({trained_s:.0f} s)", flush=True)
        else:
            module = timm_model(name, dataset.num_classes)
            started = time.perf_counter()
            backend.train(module, dataset, args.pretrain_epochs, PRETRAIN_LR.get(family, DEFAULT_PRETRAIN_LR),
                          lambda *_: None, cosine=True, batch_size=PRETRAIN_BATCH, message=f"training {name}")
            trained_s = time.perf_counter() - started
            print(f"[{name}] pretrained {args.pretrain_epochs} epochs in {trained_s:.0f} s", flush=True)
            for fmt in file_formats:
                save(module, dataset.input_shape, paths[fmt], fmt)
        for file_format in file_formats:
            path, label = paths[file_format], labels[file_format]
            result = bench_model("pytorch", label, path, preset, dataset_name, preprocessing,
                                 work_dir / f"{name}-{file_format}", targets(1.3), technique_options=options)
            result.update(architecture=name, family=family, format=file_format, side=args.side,
                          pretrain_epochs=args.pretrain_epochs, pretrain_s=round(trained_s, 1),
                          fine_tuning_epochs=args.fine_tuning_epochs)
            results.append(result)
            # after each model, so a run cut short still shows what finished
            write_section(save_results(results_path, results, args.append))
    print(f"wrote {results_path} and the {SECTION} section of {BENCHMARKS}")


def save_results(results_path: Path, results: list[dict], append: bool) -> list[dict]:
    """Write this run's results, after those already in the file when appending; return all written."""
    if append and results_path.exists():
        measured = {result["model"] for result in results}
        results = [result for result in json.loads(results_path.read_text())["results"]
                   if result["model"] not in measured] + results
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps({"machine": machine(), "results": results}, indent=2, default=str))
    return results


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {platform.system()}, torch threads {WORKER['torch_threads']}; "
            "shared with other jobs, niced")


def write_section(results: list[dict]) -> None:
    epochs = sorted({result["fine_tuning_epochs"] for result in results})
    lines = [
        SECTION, "",
        "Generated by `bench/corpus_pytorch.py` (raw: `bench/results/corpus_pytorch.json`): timm architectures, "
        "random init, trained from scratch here on digits upscaled to 3 channels (the FP32 column; its epochs and "
        "time in the model column), uploaded as the files their users write, loaded by the app's "
        f"loader. Fine-tuning techniques ran {'/'.join(map(str, epochs))} epochs (not their defaults) to fit the "
        "shared machine. Accuracy is each deploy file in onnxruntime on the test split (359 images: one image is "
        "0.28 pt); ratio = FP32 ONNX size / technique's file size; wall s = the technique's own time (the FP32 "
        "export is made once by the baseline and reused). Each cell: size ratio against the FP32 ONNX, accuracy "
        "drop (points), wall time.", "",
        "| model | format | FP32 acc | " + " | ".join(TECHNIQUES) + " |",
        "|---|---|---:|" + "---|" * len(TECHNIQUES),
    ]
    for result in results:
        cells = []
        runs = {run["technique"]: run for run in result["runs"]}
        for name in TECHNIQUES:
            run = runs.get(name)
            if run is None or run["status"] != "completed":
                reason = " ".join(str(run["reason"]).split()).replace("|", "/") if run else ""
                cells.append(f"{run['status']}: {reason}" if run else "not run")
                continue
            cells.append(f"{run['compression_ratio']:.2f}x, {run['accuracy_drop_pts']:+.2f} pt, {run['wall_s']:.0f} s")
        lines.append(f"| {result['architecture']} {result['side']}px (trained {result['pretrain_epochs']} ep in "
                     f"{result['pretrain_s']:.0f} s; fine-tuning {result['fine_tuning_epochs']} ep) | {result['format']} "
                     f"| {result['baseline']['accuracy']:.2%} | " + " | ".join(cells) + " |")
    lines += ["", "Per technique over the models above: completed runs, and the lowest–highest size ratio, "
              "drop and wall time of those completed.", "",
              "| technique | completed | size ratio | drop (pts) | wall s |", "|---|---:|---|---|---|"]
    for name in TECHNIQUES:
        runs = [run for result in results for run in result["runs"] if run["technique"] == name]
        done = [run for run in runs if run["status"] == "completed"]
        lines.append(f"| {name} | {len(done)}/{len(runs)} | " + " | ".join(
            spread([run[key] for run in done], form) for key, form in
            (("compression_ratio", "{:.2f}x"), ("accuracy_drop_pts", "{:+.2f}"), ("wall_s", "{:.0f}"))) + " |")
    # the generated part ends with the last table row: what follows is the hand-written reading
    rewrite_section(BENCHMARKS, SECTION, "\n".join(lines))


def spread(values: list[float], form: str) -> str:
    if not values:
        return "–"
    low, high = min(values), max(values)
    return form.format(low) if low == high else f"{form.format(low)} – {form.format(high)}"


if __name__ == "__main__":
    main()
