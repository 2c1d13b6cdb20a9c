"""All seven TensorFlow techniques on models the project did not write, in the files today's
Keras saves by default: Keras 3 `keras.applications` MobileNetV3Small and EfficientNetB0 and a
hand-written Keras 3 functional CNN (BatchNorm, depthwise, residual Add, squeeze-excite gating
written with `keras.ops` arithmetic, global pooling, Dropout), at 32x32, saved as `.keras`,
`.h5` and Keras 3 `model.export()` SavedModel zips.

Each model is trained briefly on generated data (noisy copies of one coarse random image per
class), saved, and run through the real `optimization.orchestrator` with a recording sink, as
the worker would run it. Every deploy file is then re-evaluated outside the engine (LiteRT's
interpreter on the test split). Results go to bench/results/corpus_tensorflow.json and the
"TensorFlow corpus" section of BENCHMARKS.md.

The model builders and savers are also the test corpus (tests/engine/test_tensorflow_keras3.py).

Run: `nice -n 10 python bench/corpus_tensorflow.py [--epochs N] [--training-epochs N] [--models a,b]
[--formats keras,h5,export] [--side 64] [--keep-previous] [--work-dir D]`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from optimization.worker import prepare_worker_process  # noqa: E402

WORKER = prepare_worker_process()  # as the worker does, before TensorFlow loads

from optimization.backends import tensorflow as backend  # noqa: E402
from optimization.orchestrator import RecordingSink  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "corpus_tensorflow.json"
INPUT_SHAPE = (32, 32, 3)
CLASSES = 10
SHORT_TRAINING_BN_MOMENTUM = 0.9


def prototype_dataset(shape=INPUT_SHAPE, n: int = 720, classes: int = CLASSES, seed: int = 0):
    """Noisy copies of one coarse (4x4-block) random image per class, in [0, 1]: learnable
    in a few epochs, even by a network that downsamples early."""
    rng = np.random.default_rng(seed)
    height, width, channels = shape
    coarse = rng.random((classes, 4, 4, channels)).astype(np.float32)
    prototypes = coarse.repeat(height // 4, axis=1).repeat(width // 4, axis=2)
    y = rng.integers(0, classes, n)
    x = np.clip(prototypes[y] + rng.normal(0, 0.15, (n, *shape)), 0, 1).astype(np.float32)
    return x, y


def npz_bytes(x, y, test_fraction: float = 1 / 6) -> bytes:
    split = int(len(x) * (1 - test_fraction))
    buffer = io.BytesIO()
    np.savez(buffer, x_train=x[:split], y_train=y[:split], x_test=x[split:], y_test=y[split:])
    return buffer.getvalue()


# ----------------------------------------------------------------------------- Keras 3 models


def functional_cnn(shape=INPUT_SHAPE, classes: int = CLASSES, keras_ops: bool = True):
    """A hand-written Keras 3 functional CNN. With `keras_ops`, its squeeze-excite gate is
    written as `relu6(x + 3) * (1 / 6)` on tensors (keras.ops nodes in the saved graph, as in
    MobileNetV3); without, as a hard_sigmoid Activation (no keras.ops node in the saved graph)."""
    import keras
    from keras import layers

    inputs = keras.Input(shape)
    x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = layers.BatchNormalization(momentum=SHORT_TRAINING_BN_MOMENTUM)(x)
    x = layers.Activation("hard_silu")(x)
    shortcut = x
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=SHORT_TRAINING_BN_MOMENTUM)(x)
    x = layers.ReLU()(x)
    gate = layers.GlobalAveragePooling2D(keepdims=True)(x)
    gate = layers.Conv2D(8, 1, activation="relu")(gate)
    gate = layers.Conv2D(16, 1)(gate)
    if keras_ops:
        gate = layers.ReLU(6.0)(gate + 3.0) * (1.0 / 6.0)
    else:
        gate = layers.Activation("hard_sigmoid")(gate)
    x = layers.Multiply()([x, gate])
    x = layers.Conv2D(16, 1, use_bias=False)(x)
    x = layers.BatchNormalization(momentum=SHORT_TRAINING_BN_MOMENTUM)(x)
    x = layers.Add()([x, shortcut])
    x = layers.Conv2D(32, 3, strides=2, padding="same", activation="silu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(0.1)(x)
    outputs = layers.Dense(classes, activation="softmax")(x)
    return keras.Model(inputs, outputs, name="handwritten_cnn")


def sequential_cnn(shape=INPUT_SHAPE, classes: int = CLASSES):
    """A hand-written Keras 3 Sequential CNN (no functional graph in its config: a list of
    layers, its input shape in an InputLayer)."""
    import keras
    from keras import layers

    return keras.Sequential([
        keras.Input(shape),
        layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False),
        layers.BatchNormalization(momentum=SHORT_TRAINING_BN_MOMENTUM),
        layers.ReLU(),
        layers.DepthwiseConv2D(3, padding="same"),
        layers.Conv2D(32, 1, activation="relu"),
        layers.MaxPooling2D(),
        layers.Conv2D(32, 3, padding="same", activation="relu"),
        layers.GlobalAveragePooling2D(),
        layers.Dropout(0.1),
        layers.Dense(classes, activation="softmax"),
    ], name="sequential_cnn")


def keras_application(name: str, shape=INPUT_SHAPE, classes: int = CLASSES):
    """A Keras 3 keras.applications model, random weights, its BatchNorm made to follow a
    short training (the applications' 0.999 momentum leaves the statistics at their start)."""
    import keras

    if name == "mobilenet_v3_small":
        model = keras.applications.MobileNetV3Small(input_shape=shape, weights=None, classes=classes,
                                                    include_preprocessing=False)
    elif name == "efficientnet_b0":
        model = keras.applications.EfficientNetB0(input_shape=shape, weights=None, classes=classes)
    else:
        raise ValueError(name)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = SHORT_TRAINING_BN_MOMENTUM
    return model


def train(model, x, y, epochs: int, learning_rate: float = 3e-3, seed: int = 0):
    """Train a Keras 3 (or tf_keras) model on sparse labels, compiled with Adam: a compiled
    model is what users save."""
    import keras

    keras.utils.set_random_seed(seed)
    optimizers = (backend.keras if type(model).__module__.startswith("tf_keras") else keras).optimizers
    model.compile(optimizer=optimizers.Adam(learning_rate),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
    return model


def save(model, file_format: str, folder: Path, stem: str) -> Path:
    """`keras` / `h5`: model.save; `export`: Keras 3 model.export() zipped; `savedmodel`: a
    tf_keras model.save(dir) zipped (with its Keras metadata and training config)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if file_format in ("keras", "h5"):
        path = folder / f"{stem}.{file_format}"
        model.save(path)
        return path
    directory = folder / f"{stem}_savedmodel"
    if file_format == "export":
        model.export(str(directory), verbose=False)
    elif file_format == "savedmodel":
        model.save(directory)
    else:
        raise ValueError(file_format)
    path = folder / f"{stem}_{file_format}.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for file in sorted(directory.rglob("*")):
            archive.write(file, file.relative_to(directory))
    shutil.rmtree(directory)
    return path


# ----------------------------------------------------------------------------- the run


class PrintingSink(RecordingSink):
    """The orchestrator's RecordingSink, printing each technique's start and end (a long
    bench run shows where it is) and handing each finished run to `on_finished`."""

    def __init__(self, on_finished=None):
        super().__init__()
        self.on_finished = on_finished

    def run_started(self, technique):
        super().run_started(technique)
        print(f"  {time.strftime('%H:%M:%S')} {technique} ...", flush=True)

    def run_finished(self, technique, run):
        super().run_finished(technique, run)
        print(f"  {time.strftime('%H:%M:%S')} {technique}: {run['status']} "
              f"{run.get('error') or ''}".rstrip(), flush=True)
        if self.on_finished:
            self.on_finished(technique, run, self)


def run_engine(model_path: Path, dataset_path: Path, output_dir: Path, techniques=None,
               options: dict | None = None, on_finished=None):
    """All (or the given) techniques through the real orchestrator, as the worker runs them;
    `on_finished(technique, run, sink)` after each."""
    from optimization import orchestrator
    from optimization.base import TECHNIQUES

    spec = orchestrator.ExperimentSpec(
        experiment_id=0, framework="tensorflow", model_path=Path(model_path),
        dataset_path=Path(dataset_path), dataset_name="custom", target_device="rpi4",
        goal="balanced", constraints={}, techniques=list(techniques or TECHNIQUES),
        output_dir=Path(output_dir), config={"techniques": options or {}})
    sink = PrintingSink(on_finished)
    orchestrator.run_experiment(spec, sink)
    return sink




def litert_accuracy(deploy_path: Path, x, y) -> float:
    """Accuracy of a `.tflite` in LiteRT's interpreter, one sample at a time, outside the
    engine (its own quantization of float input, if the file wants int8)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(deploy_path))
    interpreter.allocate_tensors()
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    correct = 0
    for sample, label in zip(x, y):
        value = sample[None].astype(np.float32)
        scale, zero_point = source["quantization"]
        if source["dtype"] != np.float32 and scale:
            value = np.round(value / scale + zero_point)
        interpreter.set_tensor(source["index"], value.astype(source["dtype"]))
        interpreter.invoke()
        correct += int(np.argmax(interpreter.get_tensor(target["index"])[0]) == label)
    return correct / len(y)


CORPUS = {  # name -> (builder(input shape), training epochs, file formats)
    "handwritten_cnn": (lambda shape: functional_cnn(shape), 6, ("keras", "export")),
    "handwritten_cnn_h5": (lambda shape: functional_cnn(shape, keras_ops=False), 6, ("h5",)),
    "mobilenet_v3_small": (lambda shape: keras_application("mobilenet_v3_small", shape), 8, ("keras", "export")),
    "efficientnet_b0": (lambda shape: keras_application("efficientnet_b0", shape), 8, ("keras", "export")),
}
TRAINING_TECHNIQUES = ("prune_unstructured", "prune_structured", "distillation", "qat", "hybrid")
SECTION = "## TensorFlow corpus"
REEVALUATION_TOLERANCE_PTS = 1.0


def bench_model(name: str, side: int, formats, work_dir: Path, fine_tuning_epochs: int | None,
                training_epochs: int | None = None, techniques=None) -> list[dict]:
    """Train `name` once at side x side, then for each file format: save it, run every (or each
    of `techniques`) technique through the orchestrator, and re-evaluate each deploy file in
    LiteRT. Each row is recorded in the results file after every technique (`complete` tells
    whether its run ended), so a stopped bench keeps what finished."""
    from optimization.datasets import load_dataset

    build, default_epochs, _ = CORPUS[name]
    epochs = training_epochs or default_epochs
    shape = (side, side, 3)
    x, y = prototype_dataset(shape)
    work_dir.mkdir(parents=True, exist_ok=True)
    dataset_path = work_dir / "data.npz"
    dataset_path.write_bytes(npz_bytes(x, y))
    test = load_dataset(dataset_path, "custom", "NHWC")
    started = time.monotonic()
    model = train(build(shape), x[:600], y[:600], epochs)  # the npz's train split
    trained_s = time.monotonic() - started
    options = {technique: {"epochs": fine_tuning_epochs} for technique in TRAINING_TECHNIQUES} \
        if fine_tuning_epochs else {}
    results = []
    for file_format in formats:
        print(f"{time.strftime('%H:%M:%S')} {name} {side}x{side} .{file_format} ...", flush=True)
        model_path = save(model, file_format, work_dir / "models", name)
        row = {"model": name, "side": side, "format": file_format, "file_bytes": model_path.stat().st_size,
               "training_epochs": epochs, "training_s": round(trained_s, 1),
               "fine_tuning_epochs": fine_tuning_epochs or "defaults", "baseline": {}, "runs": {},
               "complete": False}
        started = time.monotonic()

        def finished(technique, run, sink, row=row, started=started):
            entry = {key: run.get(key) for key in ("status", "accuracy", "accuracy_drop", "size_bytes",
                                                   "compression_ratio", "speedup", "error")}
            entry["wall_time_s"] = run["details"].get("wall_time_s")
            if run["status"] == "completed":
                entry["litert_accuracy"] = litert_accuracy(run["artifacts"]["deploy"], test.x_test, test.y_test)
            row["runs"][technique] = entry
            row["baseline"] = {k: sink.baseline_metrics.get(k)
                               for k in ("accuracy", "size_bytes", "latency_ms", "params", "macs")}
            row["total_wall_s"] = round(time.monotonic() - started, 1)
            record(row)

        run_engine(model_path, dataset_path, work_dir / f"out_{file_format}", techniques, options, finished)
        row.update(complete=True, total_wall_s=round(time.monotonic() - started, 1),
                   finished=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
        results = record(row)
    return results


def _cell(technique: str, run: dict | None, reasons: list[str]) -> str:
    """A completion-table cell; a run that did not complete points to its reason in `reasons`
    (numbered below the table: one reason is often shared by a whole row)."""
    if run is None:
        return "not run"
    if run["status"] != "completed":
        reason = " ".join(str(run.get("error") or "").split())
        if reason.startswith(technique + " "):  # the orchestrator names the technique first
            reason = "the technique" + reason[len(technique):]
        if reason not in reasons:
            reasons.append(reason)
        return f"{run['status']} [{reasons.index(reason) + 1}]"
    return f"{run['compression_ratio']:.2f}x, {run['accuracy_drop']:+.2f} pt, {run['wall_time_s']:.0f} s"


def _reevaluation_gap_pts(run: dict) -> float:
    return abs(run["accuracy"] - run["litert_accuracy"]) * 100


def _span(values, fmt: str) -> str:
    if not values:
        return "—"
    low, high = format(min(values), fmt), format(max(values), fmt)
    return low if low == high else f"{low} – {high}"


def write_section(results: list[dict], machine: str) -> None:
    from bench.common import BENCHMARKS, rewrite_section
    from optimization.base import TECHNIQUES

    order = {**{name: i for i, name in enumerate(CORPUS)}, **{f: i for i, f in enumerate(("keras", "h5", "export"))}}
    results = sorted(results, key=lambda r: (order.get(r["model"], 99), r["side"], order.get(r["format"], 99)))
    epochs = sorted({str(r["fine_tuning_epochs"]) for r in results})
    lines = [
        SECTION, "",
        "Generated by `bench/corpus_tensorflow.py` (raw: `bench/results/corpus_tensorflow.json`): Keras 3 "
        "`keras.applications` MobileNetV3Small and EfficientNetB0 (random init) and a hand-written Keras 3 "
        "functional CNN (`handwritten_cnn`: BatchNorm, depthwise, residual Add, squeeze-excite gate in "
        "`keras.ops` arithmetic; `handwritten_cnn_h5`: the same with a hard_sigmoid Activation, since Keras 3's "
        ".h5 cannot hold ops), trained here on generated data (10 classes, 600 train / 120 test), saved by "
        "Keras 3 as `.keras`, `.h5` or a `model.export()` SavedModel zip (`export`), and run through the "
        f"app's orchestrator. Fine-tuning techniques ran {' / '.join(epochs)} epoch(s). Machine: {machine}.", "",
        "Each cell: size ratio (FP32 `.tflite` / technique's `.tflite`), accuracy drop in points (positive = "
        "worse), the technique's wall time; whole run: baseline and all seven.", "",
        "| model | input | file | FP32 acc | " + " | ".join(TECHNIQUES) + " | whole run |",
        "|---|---|---|---:|" + "---|" * len(TECHNIQUES) + "---:|",
    ]
    reasons: list[str] = []
    for r in results:
        lines.append(f"| {r['model']} | {r['side']}x{r['side']} | {r['format']} | {r['baseline']['accuracy']:.2%} | "
                     + " | ".join(_cell(t, r["runs"].get(t), reasons) for t in TECHNIQUES)
                     + f" | {r['total_wall_s']:.0f} s{'' if r.get('complete', True) else ' (stopped)'} |")
    if reasons:
        lines += [""] + [f"[{number}] {reason}" for number, reason in enumerate(reasons, 1)]
    lines += ["", "Per technique, over the rows above:", "",
              "| technique | completed / run | skipped | failed | size ratio | drop (pt) | wall s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for technique in TECHNIQUES:
        runs = [r["runs"][technique] for r in results if technique in r["runs"]]
        done = [run for run in runs if run["status"] == "completed"]
        lines.append(
            f"| {technique} | {len(done)} / {len(runs)} | {sum(run['status'] == 'skipped' for run in runs)} "
            f"| {sum(run['status'] == 'failed' for run in runs)} "
            f"| {_span([run['compression_ratio'] for run in done], '.2f')} "
            f"| {_span([run['accuracy_drop'] for run in done], '+.2f')} "
            f"| {_span([run['wall_time_s'] for run in done], '.0f')} |")
    lines += ["", "Outside the engine: every completed run's deploy `.tflite` re-evaluated in LiteRT's own "
              "interpreter (`ai_edge_litert`, float input quantized by the file's own parameters) on the test "
              f"split, against the accuracy the run reported (tolerance {REEVALUATION_TOLERANCE_PTS:g} pt):", "",
              "| model | input | file | deploy files re-evaluated | largest gap (pt) | within tolerance |",
              "|---|---|---|---:|---:|---|"]
    for r in results:
        done = [run for run in r["runs"].values() if run["status"] == "completed"]
        gap = max((_reevaluation_gap_pts(run) for run in done), default=0.0)
        lines.append(f"| {r['model']} | {r['side']}x{r['side']} | {r['format']} | {len(done)} | {gap:.2f} "
                     f"| {'yes' if gap <= REEVALUATION_TOLERANCE_PTS else '**no**'} |")
    rewrite_section(BENCHMARKS, SECTION, "\n".join(lines) + "\n")


def record(result: dict) -> list[dict]:
    """Add `result` to the results file (replacing an earlier row of the same model, input and
    format), read back just before: runs started with --keep-previous side by side all land."""
    previous = json.loads(RESULTS.read_text())["results"] if RESULTS.exists() else []
    key = (result["model"], result["side"], result["format"])
    results = [r for r in previous if (r["model"], r["side"], r["format"]) != key] + [result]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine_description(), "results": results}, indent=2, default=str))
    return results


def machine_description() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs, niced"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="fine-tuning epochs for the five training techniques (default: theirs)")
    parser.add_argument("--training-epochs", type=int, default=None,
                        help="epochs to train each model before saving it (default: the corpus's)")
    parser.add_argument("--models", default=",".join(CORPUS))
    parser.add_argument("--formats", default=None,
                        help="file formats for every model (default: each model's own, see CORPUS)")
    parser.add_argument("--techniques", default=None, help="a comma-separated subset (default: all seven)")
    parser.add_argument("--side", type=int, default=INPUT_SHAPE[0], help="input height and width")
    parser.add_argument("--keep-previous", action="store_true",
                        help="add to the results file instead of starting it afresh (other rows are kept)")
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--section-only", action="store_true",
                        help="only rewrite the BENCHMARKS.md section from the results file")
    args = parser.parse_args()
    if args.section_only:
        write_section(json.loads(RESULTS.read_text())["results"], machine_description())
        return
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="edgeopt-corpus-tf-"))
    if not args.keep_previous:
        RESULTS.unlink(missing_ok=True)
    for name in args.models.split(","):
        formats = args.formats.split(",") if args.formats else CORPUS[name][2]
        results = bench_model(name, args.side, formats, work_dir / f"{name}_{args.side}", args.epochs,
                              args.training_epochs, args.techniques.split(",") if args.techniques else None)
    write_section(results, machine_description())
    print(f"wrote {RESULTS} and the {SECTION} section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
