"""Artifacts appear whole or not at all.

Every file the engine keeps (baseline and technique deploy files, native `.pt2`/`.keras`) is
written through `atomic_output`: the saver writes a temporary name in the same folder, which
is fsynced and renamed over the final name only when the saver returned. A full disk, a crash
or any error in the saver leaves no partial file under the final name, nor the temporary one.
"""
from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


class ArtifactWriteError(Exception):
    """Storage refused an artifact; the message names the file by its name alone (never the
    server's folder) and says what to do."""


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path for a saver to write; then fsync it and rename it to `path`.

    The temporary name keeps `path`'s suffix, since savers such as Keras choose the format by
    it. On any error the temporary file is removed and the error re-raised; an OSError (disk
    full, read-only, denied) becomes ArtifactWriteError with a message for the user."""
    path = Path(path)
    partial = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield partial
        fsync_path(partial)
        os.replace(partial, path)
        fsync_path(path.parent)
    except OSError as exc:
        raise ArtifactWriteError(_describe(exc, path.name)) from exc
    finally:
        partial.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """Flush a file's bytes, or a folder's entries (what makes a rename durable), to disk."""
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _describe(exc: OSError, name: str) -> str:
    if exc.errno in FULL_ERRNOS:
        return (f"storage is full: could not write {name}; free some space (or ask the administrator "
                "to) and run the experiment again")
    reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
    return (f"could not write {name} ({reason}); ask the administrator to check the storage folder, "
            "then run the experiment again")
