"""A deployable bundle of one result: GET /api/experiments/{id}/bundle/{technique}.

The zip holds the deploy model (`model.onnx` or `model.tflite`), `run.py` (experiments/
bundle_run.py: loads the model in the deploy runtime, times it and measures top-1), the
input preprocessing and label map as JSON, the test split as `test_split.npz` when the
dataset is small, and `report.json` (library versions, seed, dataset sha256, the
technique's options, the measured and estimated numbers).

Built in the web process from stored files and rows: numpy reads the dataset, nothing
here imports torch or tensorflow.
"""
from __future__ import annotations

import hashlib
import io
import json
import platform
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path, PurePosixPath

import numpy as np
from django.utils import timezone

from optimization.base import LAYOUTS, TECHNIQUES
from optimization.datasets import DEFAULT_SPLIT_SEED, load_dataset

from . import storage
from .models import Experiment, ModelFile, OptimizationRun, Recommendation

RUN_SCRIPT = Path(__file__).with_name("bundle_run.py")
# The test split travels in the zip when its source and its arrays are this small; otherwise
# run.py takes --data, and loading a large dataset in a web request is not worth it.
MAX_DATASET_SOURCE_BYTES = 64 * 2**20
MAX_TEST_SPLIT_BYTES = 32 * 2**20
REPORTED_PACKAGES = ("numpy", "onnx", "onnxruntime", "torch", "torchao", "torch-pruning", "tensorflow",
                     "tf_keras", "tensorflow-model-optimization", "ai-edge-litert", "ai-edge-quantizer")
RUNTIME_REQUIREMENTS = {"onnx": "onnxruntime numpy", "tflite": "ai-edge-litert numpy"}


class BundleError(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.message, self.status = message, status


def build_bundle(experiment: Experiment, technique: str):
    """(an open temporary file holding the zip, its download name). Raises BundleError."""
    if technique != "baseline" and technique not in TECHNIQUES:
        raise BundleError(f"unknown technique {technique!r}; use baseline or one of {', '.join(TECHNIQUES)}", 404)
    run = None
    if technique == "baseline":
        stored = experiment.files.filter(role=ModelFile.Role.BASELINE, kind=ModelFile.Kind.DEPLOY).first()
    else:
        run = experiment.runs.filter(technique=technique).first()
        if run is None:
            raise BundleError(f"experiment {experiment.pk} has no {technique} run", 404)
        if run.status != OptimizationRun.Status.COMPLETED:
            raise BundleError(f"the {technique} run is {run.status}: only a completed run has a model to deploy", 409)
        stored = experiment.files.filter(role=ModelFile.Role.OPTIMIZED, technique=technique,
                                         kind=ModelFile.Kind.DEPLOY).first()
    if stored is None:
        raise BundleError(f"experiment {experiment.pk} has no deploy file for {technique}", 404)
    try:
        model_path = stored.absolute_path()
    except storage.StorageError:
        raise BundleError("the stored file is outside the storage folder", 404) from None
    if not model_path.is_file():
        raise BundleError(f"the {technique} file is missing from storage", 404)

    folder = PurePosixPath(f"{storage.upload_stem(experiment.pk, experiment.name)}_{technique}")
    split = _test_split(experiment)
    model_name = f"model.{stored.format}"
    bundle = tempfile.TemporaryFile()
    with zipfile.ZipFile(bundle, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(model_path, str(folder / model_name))
        archive.write(RUN_SCRIPT, str(folder / "run.py"))
        archive.writestr(str(folder / "preprocessing.json"), _json(_preprocessing(experiment, split)))
        archive.writestr(str(folder / "labels.json"), _json(_labels(experiment, split)))
        archive.writestr(str(folder / "requirements.txt"), RUNTIME_REQUIREMENTS.get(stored.format, "numpy") + "\n")
        if split is not None:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, x_test=split.x_test, y_test=split.y_test)
            archive.writestr(str(folder / "test_split.npz"), buffer.getvalue())
        archive.writestr(str(folder / "report.json"),
                         _json(_report(experiment, technique, run, stored, model_path, split)))
    bundle.seek(0)
    return bundle, f"{folder.name}_bundle.zip"


def _json(value) -> str:
    return json.dumps(value, indent=2, sort_keys=False) + "\n"


def _dataset_source(experiment: Experiment) -> Path | None:
    if experiment.dataset == "custom":
        stored = experiment.dataset_file()
        return stored.absolute_path() if stored else None
    return storage.preset_dir(experiment.dataset)


def _source_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.is_file() else 0


def _test_split(experiment: Experiment):
    """The dataset as the engine loads it (same split, same preprocessing), or None when it
    is too large to ship or cannot be read here."""
    source = _dataset_source(experiment)
    if source is None or not source.exists() or _source_bytes(source) > MAX_DATASET_SOURCE_BYTES:
        return None
    try:
        dataset = load_dataset(source, experiment.dataset, LAYOUTS[experiment.framework],
                               experiment.config.get("preprocessing"))
    except Exception:  # the bundle is still useful without it; run.py then asks for --data
        return None
    return dataset if dataset.x_test.nbytes <= MAX_TEST_SPLIT_BYTES else None


def _input_shape(experiment: Experiment, split) -> list[int] | None:
    if split is not None:
        return list(split.x_test.shape[1:])
    shape = (experiment.analysis or {}).get("input_shape")
    return list(shape) if shape else experiment.config.get("input_shape")


def _preprocessing(experiment: Experiment, split) -> dict:
    preprocessing = experiment.config.get("preprocessing") or {}
    layout = LAYOUTS[experiment.framework]
    dataset_file = experiment.dataset_file() if experiment.dataset == "custom" else None
    if dataset_file is not None and dataset_file.format == "npz":
        steps = ["none: the uploaded .npz arrays are fed as they are"]
    else:
        steps = ["images scaled to [0, 1] (pixel / 255)"]
    if preprocessing.get("resize"):
        steps.append(f"resized (bilinear) to {preprocessing['resize'][0]}x{preprocessing['resize'][1]}")
    if preprocessing.get("channels"):
        steps.append(f"converted to {preprocessing['channels']} channel(s)")
    if preprocessing.get("normalize"):
        steps.append("normalised: (x - mean) / std per channel")
    steps.append(f"arranged as {layout} float32, batch first")
    return {
        "input_shape": _input_shape(experiment, split),
        "layout": layout,
        "dtype": "float32",
        "batch_axis": 0,
        "resize": preprocessing.get("resize"),
        "channels": preprocessing.get("channels"),
        "normalize": preprocessing.get("normalize"),
        "steps": steps,
        "dataset": experiment.dataset,
    }


def _labels(experiment: Experiment, split) -> dict:
    names = _image_folder_classes(experiment)
    if names is None:
        count = split.num_classes if split is not None else _output_classes(experiment)
        names = [str(index) for index in range(count or 0)]
        note = "the dataset gives class indices; index i is label i"
    else:
        note = "class folders of the uploaded ImageFolder zip, in sorted name order"
    return {"labels": {str(index): name for index, name in enumerate(names)}, "note": note}


def _output_classes(experiment: Experiment) -> int | None:
    layers = (experiment.analysis or {}).get("layers") or []
    shape = layers[-1].get("output_shape") if layers else None
    return int(shape[-1]) if shape else None


def _image_folder_classes(experiment: Experiment) -> list[str] | None:
    """Class names of an ImageFolder upload, from the zip's listing: one folder per class,
    inside train/ when the archive has train/ and test/ (the engine's rule)."""
    stored = experiment.dataset_file() if experiment.dataset == "custom" else None
    if stored is None or stored.format != "zip":
        return None
    with zipfile.ZipFile(stored.absolute_path()) as archive:
        paths = [PurePosixPath(name) for name in archive.namelist()]
    paths = [p for p in paths if not any(part.startswith((".", "__MACOSX")) for part in p.parts)]
    depth = 0
    while True:  # a zip of a folder holds that folder: descend through single wrappers
        entries = {p.parts[depth] for p in paths if len(p.parts) > depth}
        folders = {p.parts[depth] for p in paths if len(p.parts) > depth + 1}
        if len(entries) != 1 or entries != folders:
            break
        depth += 1
    folders = {p.parts[depth] for p in paths if len(p.parts) > depth + 1}
    train = next((name for name in folders if name.lower() == "train"), None)
    if train and any(name.lower() in ("test", "val") for name in folders):
        return sorted({p.parts[depth + 1] for p in paths if len(p.parts) > depth + 2 and p.parts[depth] == train})
    return sorted(folders)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dataset_sha256(experiment: Experiment) -> str | None:
    """The uploaded file's digest; for a preset folder, the digest of its files' names and
    digests in name order."""
    if experiment.dataset == "custom":
        stored = experiment.dataset_file()
        return (stored.sha256 or _sha256(stored.absolute_path())) if stored else None
    folder = storage.preset_dir(experiment.dataset)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(folder)}\0{_sha256(path)}\n".encode())
    return digest.hexdigest()


def _versions() -> dict:
    found = {"python": platform.python_version()}
    for name in REPORTED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def _report(experiment: Experiment, technique: str, run: OptimizationRun | None, stored: ModelFile,
            model_path: Path, split) -> dict:
    baseline = experiment.baseline or {}
    source = experiment.source_model()
    recommendation = Recommendation.objects.filter(experiment=experiment).first()
    details = {key: value for key, value in (run.details if run else {}).items() if key != "analysis"}
    measured = {name: getattr(run, name) if run else baseline.get(name)
                for name in ("accuracy", "size_bytes", "latency_ms")}
    if run:
        measured.update(accuracy_drop_points=run.accuracy_drop, compression_ratio=run.compression_ratio,
                        speedup=run.speedup, params=run.params, macs=run.macs)
    return {
        "bundle": {"created": timezone.now().isoformat(), "experiment": experiment.pk,
                   "experiment_name": experiment.name, "technique": technique},
        "model": {"file": f"model.{stored.format}", "format": stored.format, "size_bytes": model_path.stat().st_size,
                  "sha256": _sha256(model_path),
                  "runtime": {"onnx": "onnxruntime", "tflite": "LiteRT"}.get(stored.format, stored.format)},
        "source_model": {"file": source.filename, "sha256": source.sha256} if source else None,
        "framework": experiment.framework,
        "seed": int(experiment.config.get("seed", 0)),
        "environment": {
            "packages": _versions(),
            "note": "installed in the EdgeOpt environment that served this bundle; the worker runs the same "
                    "environment unless deployed apart",
        },
        "dataset": {
            "name": experiment.dataset,
            "sha256": _dataset_sha256(experiment),
            "split": {"seed": DEFAULT_SPLIT_SEED, "test_fraction": 0.2,
                      "note": "the test part is held out before calibration and fine-tuning samples are drawn"},
            "test_samples": int(len(split.y_test)) if split is not None else None,
            "test_split_in_bundle": split is not None,
        },
        "technique": {
            "name": technique,
            "options_requested": (experiment.config.get("techniques") or {}).get(technique, {}),
            "details": details,
        },
        "goal": experiment.goal,
        "constraints": experiment.constraints,
        "constraints_met": run.constraints_met if run else None,
        "recommended": bool(recommendation and recommendation.technique == technique),
        "measured_on_host": {
            **measured,
            "note": "accuracy on the held-out test split; latency: batch 1, one thread, lowest of five "
                    "block medians, without the host's matrix engine (AMX)",
        },
        "baseline_measured_on_host": {name: baseline.get(name) for name in ("accuracy", "size_bytes", "latency_ms")},
        "estimated_on_device": (run.estimates if run else baseline.get("estimates")) or {},
    }
