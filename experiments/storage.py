"""File storage under settings.EDGEOPT_STORAGE_ROOT, laid out as the seed says:

    dataset/preset/{name}/                    dataset/custom/{framework}/{name}/
    models/pretrained/{framework}/{name}.*    models/custom/{framework}/{name}.*
    models/optimized/{experiment_id}/{technique}.*

Every path goes through `resolve`, which refuses anything that would leave the root.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from django.conf import settings
from django.utils.text import slugify

from optimization.atomic import fsync_path
from optimization.catalog import MODEL_SUFFIXES

SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class StorageError(ValueError):
    """A path would leave the storage root, or a name is not a plain file name."""


# Errors that mean "no room": the client may retry after space is freed (HTTP 507).
FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
FULL_STATUS, UNAVAILABLE_STATUS = 507, 503


class StorageWriteError(Exception):
    """The file system refused a write or a removal. `message` is for users and names no
    absolute server path; `status` is 507 when storage is full, 503 otherwise (read-only,
    permission denied, any other OSError)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.message, self.status = message, status

    @classmethod
    def from_os_error(cls, exc: OSError, action: str) -> StorageWriteError:
        if exc.errno in FULL_ERRNOS:
            return cls(f"storage is full: could not {action}; free some space (or ask the "
                       "administrator to) and try again", FULL_STATUS)
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        return cls(f"storage is unavailable: could not {action} ({reason}); try again later or "
                   "ask the administrator to check the storage folder", UNAVAILABLE_STATUS)


# Errors whose message is written for the user: the class name in front adds nothing.
USER_FACING_ERRORS = ("ValueError", "InvalidInputError", "UnsafeModelError", "ArtifactWriteError",
                      "TechniqueNotApplicable")
_PATH_PART = r"[^\s/'\"`:,;()\[\]{}<>]+"
_ABSOLUTE_PATH = re.compile(rf"(?<![\w.~/-])(?:/{_PATH_PART})+/?")
_PACKAGE_FOLDERS = ("site-packages", "dist-packages")


def public_error(message: str) -> str:
    """An error as stored on an experiment or a run, for users: no absolute server path (a
    file in storage by its storage name, an installed package's file from the package on,
    anything else by its last part) and no class name before a message written for users."""
    kind, colon, rest = str(message).partition(": ")
    text = rest if colon and kind in USER_FACING_ERRORS else str(message)
    return _ABSOLUTE_PATH.sub(lambda match: _public_path(match.group(0)), text)


def _public_path(text: str) -> str:
    path = Path(text)
    for base in (root(), Path(settings.EDGEOPT_STORAGE_ROOT)):
        if path.is_relative_to(base) and path != base:
            return path.relative_to(base).as_posix()
    for folder in _PACKAGE_FOLDERS:
        if folder in path.parts[:-1]:
            return Path(*path.parts[path.parts.index(folder) + 1:]).as_posix()
    return path.name


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


def atomic_write(path: Path, chunks: Iterable[bytes], action: str = "save the file") -> int:
    """Write `chunks` to `path` so that it either holds all of them or does not change: the
    bytes go to a hidden temporary name in the same folder, are fsynced, then renamed over
    `path`. On any OSError the partial file is removed and StorageWriteError (507 full /
    503 otherwise) is raised. Returns the number of bytes written. Every file the web side
    writes into storage goes through here (or `move_into_place` for one already written)."""
    path = resolve(path)
    partial = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        partial = Path(name)
        size = 0
        with os.fdopen(handle, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
                size += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
        partial = None
        fsync_path(path.parent)
        return size
    except OSError as exc:
        raise StorageWriteError.from_os_error(exc, action) from None
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)


def move_into_place(source: Path, destination: Path, action: str = "save the file") -> None:
    """Rename a file that `atomic_write` already wrote (and fsynced) to its final name; the
    rename is atomic because both lie under the root, on one file system."""
    destination = resolve(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(resolve(source), destination)
        fsync_path(destination.parent)
    except OSError as exc:
        raise StorageWriteError.from_os_error(exc, action) from None


def remove_file(relative_path: str) -> None:
    """Remove a stored file (gone already is fine); StorageWriteError when it cannot be."""
    path = resolve(relative_path)
    try:
        path.unlink(missing_ok=True)
        # An uploaded dataset has a folder of its own (dataset/custom/{framework}/{stem}/).
        if (Path(relative_path).parts[:2] == ("dataset", "custom") and path.parent.is_dir()
                and not any(path.parent.iterdir())):
            path.parent.rmdir()
    except OSError as exc:
        raise StorageWriteError.from_os_error(exc, f"remove {relative_path}") from None


def remove_tree(path: Path, ignore_errors: bool = False) -> None:
    """Remove a folder and everything in it (gone already is fine); StorageWriteError when
    anything in it cannot be removed, unless `ignore_errors`."""
    path = resolve(path)
    if path == root() or not path.exists():
        return
    try:
        shutil.rmtree(path)
    except OSError as exc:
        if not ignore_errors:
            raise StorageWriteError.from_os_error(exc, f"remove {relative(path)}/") from None
