"""All seven PyTorch techniques on architectures nobody on the project wrote, in the files their
users write.

Each timm architecture (tests/foreign.py: random init, `pretrained=False`) is trained from scratch
on scikit-learn's digits upscaled to SIDE x SIDE and repeated to 3 channels (no dataset may be
downloaded here), saved as a `.pt2` with a dynamic batch (`Dim("batch", max=1024)`) and as the
dynamo exporter's ONNX (opset 18+, weights inside), loaded back by the app's loader, and run through
every technique by bench/common.py's `bench_model` (the app's orchestrator and evaluator: the
deploy file in onnxruntime on the test split). Fine-tuning techniques get FINE_TUNING_EPOCHS epochs instead of
their defaults, to fit the shared two-core machine; their drops are larger than the defaults give.
Writes bench/results/corpus_pytorch.json (after each model) and the "## PyTorch corpus" section of
BENCHMARKS.md.

    nice -n 10 python bench/corpus_pytorch.py [--work-dir DIR] [--side 32] [--architectures a,b]
                                              [--formats pt2,onnx-dynamo] [--pretrain-epochs 6]
                                              [--rotate-formats]
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

from bench.common import BENCHMARKS, RESULTS_DIR, bench_model, rewrite_section, targets  # noqa: E402
from optimization.backends import pytorch as backend  # noqa: E402
from optimization.base import TECHNIQUES  # noqa: E402
from optimization.datasets import load_dataset, write_digits_preset  # noqa: E402
from optimization.hostcpu import keep_matrix_engine_out  # noqa: E402
from tests.foreign import ARCHITECTURES, FORMATS, save, suffix, timm_model  # noqa: E402

SECTION = "## PyTorch corpus"
DEFAULT_ARCHITECTURES = ("lcnet", "mobilenetv3", "ghostnet", "efficientnet")
FINE_TUNING_EPOCHS = 3
FINE_TUNING = ("prune_unstructured", "prune_structured", "distillation", "qat", "hybrid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--architectures", default=",".join(DEFAULT_ARCHITECTURES),
                        help=f"families from {', '.join(ARCHITECTURES)}")
    parser.add_argument("--formats", default="pt2,onnx-dynamo", help=f"from {', '.join(FORMATS)}")
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--rotate-formats", action="store_true",
                        help="one format per architecture, in turn (a quicker run that still covers each format)")
    args = parser.parse_args()
    keep_matrix_engine_out()
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="edgeopt-bench-corpus-"))
    preset = work_dir / "preset"
    write_digits_preset(preset)
    dataset_name = f"digits-{args.side}x{args.side}-rgb"
    preprocessing = {"resize": [args.side, args.side], "channels": 3}
    dataset = load_dataset(preset, dataset_name, "NCHW", preprocessing)
    options = {name: {"epochs": FINE_TUNING_EPOCHS} for name in FINE_TUNING}
    results_path = RESULTS_DIR / "corpus_pytorch.json"
    results = []
    formats = args.formats.split(",")
    for index, family in enumerate(args.architectures.split(",")):
        name = ARCHITECTURES[family]
        module = timm_model(name, dataset.num_classes)
        started = time.perf_counter()
        backend.train(module, dataset, args.pretrain_epochs, 3e-3, lambda *_: None, cosine=True,
                      message=f"training {name}")
        trained_s = time.perf_counter() - started
        for file_format in [formats[index % len(formats)]] if args.rotate_formats else formats:
            path = save(module, dataset.input_shape, work_dir / f"{name}-{file_format}{suffix(file_format)}",
                        file_format)
            label = f"{name} ({family}) {args.side}x{args.side}, {file_format}"
            result = bench_model("pytorch", label, path, preset, dataset_name, preprocessing,
                                 work_dir / f"{name}-{file_format}", targets(1.3), technique_options=options)
            result.update(architecture=name, family=family, format=file_format, side=args.side,
                          pretrain_epochs=args.pretrain_epochs, pretrain_s=round(trained_s, 1))
            results.append(result)
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps({"machine": machine(), "results": results}, indent=2, default=str))
    write_section(results)
    print(f"wrote {results_path} and the {SECTION} section of {BENCHMARKS}")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {platform.system()}; shared with other jobs, niced"


def write_section(results: list[dict]) -> None:
    lines = [
        SECTION, "",
        "Generated by `bench/corpus_pytorch.py` (raw: `bench/results/corpus_pytorch.json`): timm architectures, "
        "random init, trained from scratch here on digits upscaled to 3 channels, uploaded as the files their users "
        f"write, loaded by the app's loader. Fine-tuning techniques ran {FINE_TUNING_EPOCHS} epochs (not their "
        "defaults) to fit the shared machine. Accuracy is each deploy file in onnxruntime on the test split; "
        "ratio = FP32 ONNX size / technique's file size; wall s = the technique's own time (the FP32 export "
        "is made once by the baseline and reused).", "",
        "| model | format | FP32 acc | " + " | ".join(TECHNIQUES) + " |",
        "|---|---|---:|" + "---|" * len(TECHNIQUES),
    ]
    for result in results:
        cells = []
        runs = {run["technique"]: run for run in result["runs"]}
        for name in TECHNIQUES:
            run = runs.get(name)
            if run is None or run["status"] != "completed":
                cells.append(f"{run['status']}: {run['reason']}" if run else "not run")
                continue
            cells.append(f"{run['compression_ratio']:.2f}x, {run['accuracy_drop_pts']:+.2f} pt, {run['wall_s']:.0f} s")
        lines.append(f"| {result['architecture']} {result['side']}px | {result['format']} "
                     f"| {result['baseline']['accuracy']:.2%} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: size ratio against the FP32 ONNX, accuracy drop (points), wall time.", ""]
    rewrite_section(BENCHMARKS, SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
