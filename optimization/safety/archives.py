"""Extract uploaded zip archives (ImageFolder datasets, SavedModels) without trusting them.

Every entry is checked BEFORE anything is written: no absolute paths, no `..`, no symlinks,
nothing that resolves outside the destination, and limits on the number of files, the total
unpacked size and the compression ratio (a zip bomb unpacks a few KB into gigabytes).
Stdlib only: the web process may call this.
"""
from __future__ import annotations

import stat
import zipfile
from pathlib import Path, PurePosixPath

from optimization.base import InvalidInputError, UnsafeModelError

DEFAULT_MAX_FILES = 10_000
DEFAULT_MAX_TOTAL_BYTES = 2 * 2**30
DEFAULT_MAX_RATIO = 200.0  # images and weights compress far less than this; bombs compress far more
_COPY_CHUNK = 2**20


def safe_extract_zip(
    zip_path: Path,
    dest_dir: Path,
    max_files: int = DEFAULT_MAX_FILES,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> list[Path]:
    """Extract `zip_path` into `dest_dir` and return the extracted file paths.

    Raises UnsafeModelError for entries that would escape `dest_dir` or are links, and
    InvalidInputError for a file that is not a zip or breaks the size limits.
    """
    zip_path, dest_dir = Path(zip_path), Path(dest_dir)
    if not zipfile.is_zipfile(zip_path):
        raise InvalidInputError(f"{zip_path.name} is not a zip archive")
    dest_root = dest_dir.resolve()
    with zipfile.ZipFile(zip_path) as archive:
        members = archive.infolist()
        targets = _plan(members, dest_root, zip_path.name, max_files, max_total_bytes, max_ratio)
        dest_root.mkdir(parents=True, exist_ok=True)
        written = []
        for member, target in zip(members, targets):
            if member.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as source, open(target, "wb") as sink:
                _copy_bounded(source, sink, member.file_size, member.filename)
            written.append(target)
    return written


def check_zip_archive(
    zip_path: Path,
    label: str,
    max_files: int = DEFAULT_MAX_FILES,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    max_ratio: float = DEFAULT_MAX_RATIO,
) -> list[zipfile.ZipInfo]:
    """The checks of `safe_extract_zip` without extracting (the upload runs them, the worker
    again when it extracts); returns the members. `label` names the file in messages."""
    if not zipfile.is_zipfile(zip_path):
        raise InvalidInputError(f"{label} is not a zip archive")
    with zipfile.ZipFile(zip_path) as archive:
        members = archive.infolist()
    _plan(members, Path("/archive-root"), label, max_files, max_total_bytes, max_ratio)
    return members


def _plan(members, dest_root: Path, label: str, max_files: int, max_total_bytes: int,
          max_ratio: float) -> list[Path]:
    if len(members) > max_files:
        raise InvalidInputError(f"{label} holds {len(members)} entries; at most {max_files} are accepted")
    total = sum(member.file_size for member in members)
    if total > max_total_bytes:
        raise InvalidInputError(
            f"{label} unpacks to {total / 2**20:.0f} MiB; at most {max_total_bytes / 2**20:.0f} MiB are accepted"
        )
    compressed = sum(member.compress_size for member in members)
    if total > 2**20 and total > max_ratio * max(compressed, 1):
        raise InvalidInputError(
            f"{label} expands {total / max(compressed, 1):.0f}x when unpacked, which looks like a zip bomb"
        )
    targets = []
    for member in members:
        name = member.filename
        parts = PurePosixPath(name.replace("\\", "/"))
        if name.startswith(("/", "\\")) or parts.is_absolute() or ":" in parts.parts[0]:
            relative_name = name.lstrip("/\\")  # so that the message does not read like a server path
            raise UnsafeModelError(f"{label}: entry {relative_name!r} is an absolute path, outside the archive; "
                                   "zip the files with paths relative to the archive")
        if ".." in parts.parts:
            raise UnsafeModelError(f"{label}: entry {name!r} points outside the archive")
        if member.flag_bits & 0x1:
            raise InvalidInputError(f"{label}: entry {name!r} is encrypted; upload an archive without a password")
        if stat.S_ISLNK(member.external_attr >> 16):
            raise UnsafeModelError(f"{label}: entry {name!r} is a symbolic link; links are not accepted")
        target = (dest_root / parts).resolve()
        if target != dest_root and dest_root not in target.parents:
            raise UnsafeModelError(f"{label}: entry {name!r} resolves outside the extraction folder")
        targets.append(target)
    return targets


def _copy_bounded(source, sink, declared_size: int, name: str) -> None:
    """Copy at most the size the entry declares: a forged header cannot unpack more."""
    remaining = declared_size
    while True:
        chunk = source.read(min(_COPY_CHUNK, remaining + 1))
        if not chunk:
            return
        remaining -= len(chunk)
        if remaining < 0:
            raise InvalidInputError(f"entry {name!r} is larger than its header says")
        sink.write(chunk)
