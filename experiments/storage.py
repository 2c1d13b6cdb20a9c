"""File storage under settings.EDGEOPT_STORAGE_ROOT, laid out as the seed says:

    dataset/preset/{name}/                    dataset/custom/{framework}/{name}/
    models/pretrained/{framework}/{name}.*    models/custom/{framework}/{name}.*
    models/optimized/{experiment_id}/{technique}.*

Every path goes through `resolve`, which refuses anything that would leave the root.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from django.conf import settings
from django.utils.text import slugify

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Formats a framework loads, in the order a pretrained model is picked when several exist.
MODEL_SUFFIXES = {
    "pytorch": (".pt2", ".pt", ".pth", ".onnx"),
    "tensorflow": (".keras", ".h5", ".zip"),
}
DATASET_SUFFIXES = (".npz", ".zip")


class StorageError(ValueError):
    """A path would leave the storage root, or a name is not a plain file name."""


def root() -> Path:
    return Path(settings.EDGEOPT_STORAGE_ROOT).resolve()


def resolve(*parts: str | Path) -> Path:
    """The absolute path of `parts` under the root; raises StorageError outside it."""
    base = root()
    path = base.joinpath(*parts).resolve()
    if path != base and not path.is_relative_to(base):
        raise StorageError(f"{Path(*parts)} is outside the storage folder")
    return path


def relative(path: Path) -> str:
    """The path as stored in ModelFile.path: relative to the root, forward slashes."""
    return resolve(path).relative_to(root()).as_posix()


def safe_name(name: str) -> str:
    if not SAFE_NAME.match(name or "") or ".." in name:
        raise StorageError(f"{name!r} is not a valid name (letters, digits, - _ . only)")
    return name


def upload_stem(experiment_id: int, title: str) -> str:
    """Stored uploads are named after the experiment, never after the uploaded file."""
    return f"exp{experiment_id}_{slugify(title)[:40] or 'upload'}"


def preset_dir(name: str) -> Path:
    return resolve("dataset", "preset", safe_name(name))


def list_presets() -> list[str]:
    """Preset datasets in storage; `digits` is always offered because the engine writes it
    on first use (it ships with scikit-learn)."""
    folder = resolve("dataset", "preset")
    found = {p.name for p in folder.iterdir() if p.is_dir() and SAFE_NAME.match(p.name)} if folder.is_dir() else set()
    return sorted(found | {"digits"})


def pretrained_models(framework: str) -> dict[str, Path]:
    """{name: path} of the demo models for a framework, the preferred format per name."""
    folder = resolve("models", "pretrained", safe_name(framework))
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for suffix in reversed(MODEL_SUFFIXES.get(framework, ())):
        for path in folder.glob(f"*{suffix}"):
            if path.is_file() and SAFE_NAME.match(path.stem):
                found[path.stem] = path
    return dict(sorted(found.items()))


def custom_model_path(framework: str, stem: str, suffix: str) -> Path:
    return resolve("models", "custom", safe_name(framework), safe_name(stem + suffix))


def custom_dataset_path(framework: str, stem: str, suffix: str) -> Path:
    return resolve("dataset", "custom", safe_name(framework), safe_name(stem), safe_name("dataset" + suffix))


def optimized_dir(experiment_id: int) -> Path:
    return resolve("models", "optimized", str(int(experiment_id)))


def temp_dir() -> Path:
    """Uploads land here first, on the same file system, so moving them in is atomic
    (under models/, which the project's .gitignore already covers)."""
    folder = resolve("models", ".incoming")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def remove_file(relative_path: str) -> None:
    path = resolve(relative_path)
    path.unlink(missing_ok=True)
    # An uploaded dataset has a folder of its own (dataset/custom/{framework}/{stem}/).
    if Path(relative_path).parts[:2] == ("dataset", "custom") and path.parent.is_dir() and not any(path.parent.iterdir()):
        path.parent.rmdir()


def remove_tree(path: Path, ignore_errors: bool = False) -> None:
    """Remove a folder under the storage root; an OSError is raised unless `ignore_errors`."""
    path = resolve(path)
    if path != root() and path.exists():
        shutil.rmtree(path, ignore_errors=ignore_errors)
