"""The acceptance corpus, run before the real one: models nobody here wrote, saved the way their
frameworks save them by default, each uploaded through the real JSON API (Django's test client,
logged in as a user), run by the worker's own task in this process, and every artifact the API
serves re-evaluated outside the engine (onnxruntime for .onnx, LiteRT for .tflite) on the test
split. Records per file: the upload's answer, each technique's status or error, and the
accuracy the results report next to the accuracy of the downloaded file.

PyTorch: timm architectures and a hand-written model with control flow (random init, trained
briefly here) written by tests/foreign.py as `.pt2` (dynamic batch), TorchScript `.pt` (traced or
scripted), and ONNX from torch's dynamo and legacy exporters. TensorFlow: Keras 3 models from
bench/corpus_tensorflow.py (hand-written functional and Sequential CNNs, keras.applications
MobileNetV3Small and EfficientNetB0) as `.keras`, `.h5`, a `model.export()` SavedModel zip and a
`tf.saved_model.save` zip of the compiled model. 32x32 or 64x64 (`side`), 10 classes, generated data;
the fine-tuning techniques get one epoch (experiment config `{"techniques": {name: {"epochs": 1}}}`).

Not a test: `nice -n 10 python bench/acceptance_corpus.py --framework pytorch [--models a,b]
[--results FILE]`. Results merge into bench/results/acceptance_corpus.json (one entry per file).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "acceptance_corpus.json"
TECHNIQUES = ("ptq_int8", "ptq_int4", "prune_unstructured", "prune_structured", "distillation", "qat", "hybrid")
FINE_TUNING = ("prune_unstructured", "prune_structured", "distillation", "qat", "hybrid")
ONE_EPOCH = {"techniques": {name: {"epochs": 1} for name in FINE_TUNING}}
SIDE, CLASSES, SAMPLES, TRAIN = 32, 10, 480, 400
ACCURACY_TOLERANCE = 0.01  # one point

# name: (timm architecture, file format, side); every family of tests/foreign.py ARCHITECTURES, each
# format at least twice, TorchScript .pt on three families (its TorchScript -> torch.export
# conversion is the fragile path), one 64x64 file; the fragile files first so a short run finds them.
# `.script.pt`: torch.jit.script instead of trace, on two timm families and on tests/foreign.py's
# hand-written LoopingCNN, whose loop and tensor-valued branch torch.export cannot convert.
PYTORCH_CORPUS = {
    "convnext_atto.pt": ("convnext_atto", "pt", 32),
    "ghostnet_050.pt": ("ghostnet_050", "pt", 32),
    "lcnet_035.pt": ("lcnet_035", "pt", 32),
    "tinynet_e_64.pt2": ("tinynet_e", "pt2", 64),
    "regnetx_002.dynamo.onnx": ("regnetx_002", "onnx-dynamo", 32),
    "ghostnet_050.legacy.onnx": ("ghostnet_050", "onnx-legacy", 32),
    "mobilenetv3_small_050.dynamo.onnx": ("mobilenetv3_small_050", "onnx-dynamo", 32),
    "convnext_atto.legacy.onnx": ("convnext_atto", "onnx-legacy", 32),
    "resnet10t.pt2": ("resnet10t", "pt2", 32),
    "mobilenetv3_small_050.pt2": ("mobilenetv3_small_050", "pt2", 32),
    "tinynet_e.legacy.onnx": ("tinynet_e", "onnx-legacy", 32),
    "resnet10t.dynamo.onnx": ("resnet10t", "onnx-dynamo", 32),
    "resnet10t.script.pt": ("resnet10t", "pt-script", 32),
    "mobilenetv3_small_050.script.pt": ("mobilenetv3_small_050", "pt-script", 32),
    "looping_cnn.script.pt": ("looping_cnn", "pt-script", 32),
}
# name: (model builder, file format, side); the Keras applications' .h5 and SavedModel zips, a
# Sequential model, and 64x64 files besides the 32x32 functional ones.
TENSORFLOW_CORPUS = {
    "handwritten_cnn.keras": ("functional_cnn", "keras", 32),
    "handwritten_cnn.h5": ("functional_cnn_no_ops", "h5", 32),
    "handwritten_cnn_export.zip": ("functional_cnn", "export", 32),
    "handwritten_cnn_tf_saved_model.zip": ("functional_cnn", "tf_saved_model", 32),
    "mobilenet_v3_small.keras": ("mobilenet_v3_small", "keras", 32),
    "efficientnet_b0.keras": ("efficientnet_b0", "keras", 32),
    "sequential_cnn.keras": ("sequential_cnn", "keras", 32),
    "sequential_cnn.h5": ("sequential_cnn", "h5", 32),
    "mobilenet_v3_small.h5": ("mobilenet_v3_small", "h5", 32),
    "mobilenet_v3_small_export.zip": ("mobilenet_v3_small", "export", 32),
    "mobilenet_v3_small_tf_saved_model.zip": ("mobilenet_v3_small", "tf_saved_model", 32),
    "handwritten_cnn_64.keras": ("functional_cnn", "keras", 64),
    "mobilenet_v3_small_64.keras": ("mobilenet_v3_small", "keras", 64),
    "efficientnet_b0.h5": ("efficientnet_b0", "h5", 32),
    "efficientnet_b0_export.zip": ("efficientnet_b0", "export", 32),
    "efficientnet_b0_tf_saved_model.zip": ("efficientnet_b0", "tf_saved_model", 32),
}


def data(framework: str, side: int = SIDE):
    """Noisy copies of one coarse random image per class (tests/test_full_experiments.py), in
    the model's own layout: NCHW for PyTorch, NHWC for TensorFlow."""
    from tests.test_full_experiments import prototype_dataset

    x, y = prototype_dataset((side, side, 3), n=SAMPLES, classes=CLASSES)
    return (x.transpose(0, 3, 1, 2).copy() if framework == "pytorch" else x), y


def npz(x, y) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x_train=x[:TRAIN], y_train=y[:TRAIN], x_test=x[TRAIN:], y_test=y[TRAIN:])
    return buffer.getvalue()


# -- building the files --------------------------------------------------------------------


def build_pytorch(names: list[str], folder: Path, epochs: int):
    """Yields (name, path, x, y) one file at a time, so each file runs as soon as it is written;
    an architecture is trained once per side."""
    from optimization.backends import pytorch as backend
    import torch

    from tests.foreign import LoopingCNN, save, timm_model

    trained = {}
    for name in names:
        architecture, file_format, side = PYTORCH_CORPUS[name]
        x, y = data("pytorch", side)
        if (architecture, side) not in trained:
            torch.manual_seed(0)
            module = LoopingCNN(CLASSES) if architecture == "looping_cnn" else timm_model(architecture, CLASSES)
            dataset = type("Train", (), {"x_train": x[:TRAIN], "y_train": y[:TRAIN]})
            backend.train(module, dataset, epochs, 3e-3, lambda *_: None)
            trained[architecture, side] = module.eval()
        try:
            path = save(trained[architecture, side], (3, side, side), folder / name, file_format)
        except Exception:  # noqa: BLE001 - a file its own framework cannot write is no finding of ours
            print(f"{name}: could not be written: {traceback.format_exc()[-800:]}", flush=True)
            continue
        yield name, path, x, y


def build_tensorflow(names: list[str], folder: Path, epochs: int):
    from bench import corpus_tensorflow as keras_corpus

    builders = {"functional_cnn": keras_corpus.functional_cnn,
                "functional_cnn_no_ops": lambda shape: keras_corpus.functional_cnn(shape, keras_ops=False),
                "sequential_cnn": keras_corpus.sequential_cnn,
                "mobilenet_v3_small": lambda shape: keras_corpus.keras_application("mobilenet_v3_small", shape),
                "efficientnet_b0": lambda shape: keras_corpus.keras_application("efficientnet_b0", shape)}
    trained = {}
    for name in names:
        builder, file_format, side = TENSORFLOW_CORPUS[name]
        x, y = data("tensorflow", side)
        if (builder, side) not in trained:
            trained[builder, side] = keras_corpus.train(builders[builder]((side, side, 3)), x[:TRAIN], y[:TRAIN], epochs)
        model = trained[builder, side]
        try:
            path = save_keras(model, file_format, folder, Path(name))
        except Exception:  # noqa: BLE001 - a file its own framework cannot write is no finding of ours
            print(f"{name}: could not be written: {traceback.format_exc()[-800:]}", flush=True)
            continue
        yield name, path, x, y


def save_keras(model, file_format: str, folder: Path, name: Path) -> Path:
    from bench import corpus_tensorflow as keras_corpus

    if file_format != "tf_saved_model":
        return keras_corpus.save(model, file_format, folder, name.stem).rename(folder / name)
    import tensorflow as tf  # what tf.saved_model.save writes for a compiled Keras 3 model

    directory = folder / f"{name.stem}_dir"
    tf.saved_model.save(model, str(directory))
    with zipfile.ZipFile(folder / name, "w") as archive:
        for file in sorted(directory.rglob("*")):
            archive.write(file, file.relative_to(directory))
    shutil.rmtree(directory)
    return folder / name


# -- through the API -----------------------------------------------------------------------


def django_client(work: Path):
    os.environ["DATABASE_URL"] = f"sqlite:///{work / 'db.sqlite3'}"
    os.environ["EDGEOPT_STORAGE_ROOT"] = str(work / "storage")
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "edgeopt_site.settings")
    (work / "storage").mkdir(parents=True, exist_ok=True)
    import django

    django.setup()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.test import Client

    import experiments.models

    call_command("migrate", verbosity=0)
    experiments.models._enqueue_run = lambda experiment_id: None  # the task runs here instead
    user, _ = get_user_model().objects.get_or_create(username="acceptance")
    client = Client()
    client.force_login(user)
    return client


def run_file(client, framework: str, path: Path, x, y) -> dict:
    from django.core.files.uploadedfile import SimpleUploadedFile

    from experiments import tasks

    side = x.shape[2]  # NCHW and NHWC alike
    entry = {"file": path.name, "framework": framework, "side": side, "size_bytes": path.stat().st_size}
    body = {"name": f"acceptance {path.name}", "framework": framework, "target_device": "rpi4",
            "dataset": "custom", "goal": "balanced", "constraints": {"max_accuracy_drop": 5.0},
            "techniques": list(TECHNIQUES), "config": ONE_EPOCH}
    created = client.post("/api/experiments/create", json.dumps(body), content_type="application/json")
    if created.status_code != 201:
        return {**entry, "upload": f"create refused {created.status_code}: {created.json().get('error')}"}
    experiment_id = created.json()["id"]
    fields = {"input_shape": f"3,{side},{side}"} if path.suffix == ".pt" else {}
    upload = client.post(f"/api/experiments/{experiment_id}/upload",
                         {"file": SimpleUploadedFile(path.name, path.read_bytes()), **fields})
    entry["upload"] = "accepted" if upload.status_code == 200 else f"{upload.status_code}: {upload.json().get('error')}"
    if upload.status_code != 200:
        return entry
    dataset = client.post(f"/api/experiments/{experiment_id}/upload",
                          {"file": SimpleUploadedFile("data.npz", npz(x, y)), "kind": "dataset"})
    if dataset.status_code != 200:
        return {**entry, "dataset": f"{dataset.status_code}: {dataset.json().get('error')}"}
    started = client.post(f"/api/experiments/{experiment_id}/start")
    if started.status_code != 202:
        return {**entry, "start": f"{started.status_code}: {started.json().get('error')}"}
    began = time.monotonic()
    try:
        entry["status"] = tasks.run_experiment(experiment_id)
    except Exception:  # noqa: BLE001 - the corpus records what the worker would have logged
        entry["status"], entry["traceback"] = "crashed", traceback.format_exc()[-1500:]
    entry["seconds"] = round(time.monotonic() - began, 1)
    results = client.get(f"/api/experiments/{experiment_id}/results").json()
    entry["error"] = results.get("error")
    baseline = results.get("baseline") or {}
    entry["baseline"] = {"accuracy": baseline.get("accuracy"),
                         "reevaluated": reevaluate(client, experiment_id, "baseline", x, y, "?format=deploy")}
    entry["runs"] = {}
    for run in results.get("runs", []):
        record = {"status": run["status"], "accuracy": run.get("accuracy"), "error": run.get("error")}
        if run["status"] == "completed":
            record["reevaluated"] = reevaluate(client, experiment_id, run["technique"], x, y)
        entry["runs"][run["technique"]] = record
    return entry


def reevaluate(client, experiment_id: int, technique: str, x, y, query: str = "") -> float | str:
    """Accuracy of the downloaded deploy file on the test split, in onnxruntime or LiteRT."""
    response = client.get(f"/api/experiments/{experiment_id}/download/{technique}{query}")
    if response.status_code != 200:
        return f"download {response.status_code}: {response.json().get('error')}"
    data = b"".join(response.streaming_content)
    name = response["Content-Disposition"]
    try:
        logits = run_onnx(data, x[TRAIN:]) if ".onnx" in name else run_tflite(data, x[TRAIN:])
    except Exception as exc:  # noqa: BLE001 - a file that does not run is the finding
        return f"does not run outside the engine: {type(exc).__name__}: {str(exc)[:300]}"
    return float((logits.argmax(-1) == y[TRAIN:]).mean())


def run_onnx(model: bytes, x) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]


def run_tflite(model: bytes, x) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model)
    interpreter.allocate_tensors()
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    outputs = []
    for sample in x:  # one at a time: some converted models keep a fixed batch of 1
        value = sample[None].astype(np.float32)
        if source["dtype"] != np.float32:
            scale, zero = source["quantization"]
            value = np.clip(np.round(value / scale + zero), np.iinfo(source["dtype"]).min,
                            np.iinfo(source["dtype"]).max).astype(source["dtype"])
        interpreter.set_tensor(source["index"], value)
        interpreter.invoke()
        out = interpreter.get_tensor(target["index"]).astype(np.float32)
        if target["dtype"] != np.float32:
            scale, zero = target["quantization"]
            out = (out - zero) * scale
        outputs.append(out[0])
    return np.stack(outputs)


# -- the report ----------------------------------------------------------------------------


def agreement(reported, measured) -> str:
    if reported is None or not isinstance(measured, float):
        return "-" if measured is None else str(measured)[:60]
    mark = "ok" if abs(reported - measured) <= ACCURACY_TOLERANCE else "MISMATCH"
    return f"{reported:.3f}/{measured:.3f} {mark}"


def markdown(entries: dict) -> str:
    lines = ["| file | side | upload | run | seconds | baseline reported/re-evaluated | " + " | ".join(TECHNIQUES) + " |",
             "|---" * (6 + len(TECHNIQUES)) + "|"]
    for entry in entries.values():
        runs = entry.get("runs", {})
        cells = []
        for technique in TECHNIQUES:
            run = runs.get(technique)
            if run is None:
                cells.append("-")
            elif run["status"] != "completed":
                cells.append(f"{run['status']}: {(run.get('error') or '')[:60]}")
            else:
                cells.append(agreement(run["accuracy"], run.get("reevaluated")))
        baseline = entry.get("baseline") or {}
        lines.append(f"| {entry['file']} | {entry.get('side', SIDE)} | {entry['upload'][:80]} | {entry.get('status', '-')} | "
                     f"{entry.get('seconds', '-')} | "
                     f"{agreement(baseline.get('accuracy'), baseline.get('reevaluated'))} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", choices=("pytorch", "tensorflow"), required=True)
    parser.add_argument("--models", help="comma list of corpus file names (default: all of the framework)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of each model before saving")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    corpus = PYTORCH_CORPUS if args.framework == "pytorch" else TENSORFLOW_CORPUS
    names = args.models.split(",") if args.models else list(corpus)
    from optimization.worker import prepare_worker_process

    prepare_worker_process()  # as the worker does, before a backend (and Keras) loads
    entries = json.loads(args.results.read_text()) if args.results.is_file() else {}
    with tempfile.TemporaryDirectory(prefix="acceptance-") as work:
        work = Path(work)
        client = django_client(work)
        build = build_pytorch if args.framework == "pytorch" else build_tensorflow
        for name, path, x, y in build(names, work / "files", args.epochs):
            entries[name] = run_file(client, args.framework, path, x, y)
            print(json.dumps(entries[name])[:2000], flush=True)
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(entries, indent=2))
    print(markdown(entries))


if __name__ == "__main__":
    main()
