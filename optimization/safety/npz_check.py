"""Read an uploaded `.npz` dataset's array headers without loading any array.

An `.npz` is a zip of `.npy` files, each starting with a small header that declares its
dtype and shape. Reading only those says what loading would cost and whether it would be
safe: an object dtype would unpickle code, and a few hundred KB of zeros can declare
gigabytes. numpy and the standard library only: the web process runs this at upload.
"""
from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from optimization.base import InvalidInputError, UnsafeModelError
from optimization.safety.archives import DEFAULT_MAX_RATIO, check_zip_archive

KEY_SETS = (("x", "y"), ("x_train", "y_train", "x_test", "y_test"))
# Below this much declared data the compression ratio says nothing (tiny files compress anyhow).
RATIO_FLOOR_BYTES = 2**20


def read_npz_headers(path: Path, label: str, max_bytes: int, max_ratio: float = DEFAULT_MAX_RATIO) -> dict:
    """{array name: (dtype, shape)} for every array, after checking the names, dtypes, the
    declared total against `max_bytes`, the declared size against the compressed size, and
    that each x has as many samples as its y. Raises InvalidInputError / UnsafeModelError
    with a message that says what to upload instead."""
    members = check_zip_archive(path, label, max_total_bytes=max_bytes)
    headers, total = {}, 0
    with zipfile.ZipFile(path) as archive:
        for member in members:
            if not member.filename.endswith(".npy"):
                raise InvalidInputError(f"{label}: {member.filename!r} is not a .npy array; "
                                        "save the arrays with numpy.savez")
            name = member.filename[:-4]
            with archive.open(member) as handle:
                dtype, shape = _npy_header(handle, label, name)
            declared = math.prod(shape) * dtype.itemsize
            if declared > RATIO_FLOOR_BYTES and declared > max_ratio * max(member.compress_size, 1):
                raise InvalidInputError(
                    f"{label}: array {name!r} declares {declared / 2**20:.0f} MiB in {member.compress_size} "
                    "compressed bytes, which looks like a decompression bomb")
            total += declared
            headers[name] = (dtype, shape)
    if total > max_bytes:
        raise InvalidInputError(f"{label} declares {total / 2**20:.0f} MiB of arrays; at most "
                                f"{max_bytes / 2**20:.0f} MiB are accepted (EDGEOPT_MAX_DATASET_MB)")
    keys = next((keys for keys in KEY_SETS if set(keys) <= set(headers)), None)
    if keys is None:
        raise InvalidInputError(f"{label} must hold arrays x_train y_train x_test y_test (or x y); "
                                f"it holds {', '.join(sorted(headers)) or 'none'}")
    for x_name in (k for k in keys if k.startswith("x")):
        y_name = "y" + x_name[1:]
        (_, x_shape), (_, y_shape) = headers[x_name], headers[y_name]
        if len(x_shape) < 2:
            raise InvalidInputError(f"{label}: {x_name} has shape {x_shape}; it needs a sample axis and the "
                                    "sample's own axes, e.g. (n, 28, 28, 1)")
        if not (len(y_shape) == 1 or (len(y_shape) == 2 and y_shape[1] == 1)):
            raise InvalidInputError(f"{label}: {y_name} has shape {y_shape}; labels are one class index "
                                    "per sample, shape (n,)")
        if x_shape[0] != y_shape[0]:
            raise InvalidInputError(f"{label}: {x_name} has {x_shape[0]} samples but {y_name} has {y_shape[0]} labels")
        if headers[y_name][0].kind not in "iu":
            raise InvalidInputError(f"{label}: {y_name} has dtype {headers[y_name][0]}; labels are integer class "
                                    "indices (0, 1, 2, ...), e.g. y.astype('int64')")
    samples = {name: headers[name][1][1:] for name in keys if name.startswith("x")}
    if len(set(samples.values())) > 1:
        raise InvalidInputError(f"{label}: x_train and x_test must hold samples of one shape; they hold "
                                f"{samples['x_train']} and {samples['x_test']}")
    return headers


# How each framework's models take one sample, for messages.
SAMPLE_LAYOUTS = {"pytorch": "channels first (C, H, W)", "tensorflow": "channels last (H, W, C)"}


def check_samples_fit(headers: dict, input_shape, framework: str, label: str) -> None:
    """The samples of an .npz checked by read_npz_headers must have the model's input shape
    (one sample, no batch): the engine uses uploaded arrays as they are."""
    wanted = tuple(int(n) for n in input_shape)
    for name in ("x", "x_train", "x_test"):
        if name in headers and headers[name][1][1:] != wanted:
            got = headers[name][1]
            raise InvalidInputError(
                f"{label}: {name} holds samples of shape {got[1:]} but the model takes {wanted} "
                f"({SAMPLE_LAYOUTS.get(framework, 'its own layout')}, no batch): save {name} as an array "
                f"of shape {(got[0], *wanted)}, or give the model's input_shape if it is not {wanted}")


def _npy_header(handle, label: str, name: str) -> tuple[np.dtype, tuple[int, ...]]:
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    except (ValueError, SyntaxError, OSError) as exc:
        raise InvalidInputError(f"{label}: array {name!r} has no readable .npy header ({exc})") from None
    if dtype.hasobject:
        raise UnsafeModelError(f"{label}: array {name!r} holds Python objects, which would unpickle code on "
                               "load; save numeric arrays (float32, uint8, int64)")
    if dtype.kind not in "biuf":
        raise InvalidInputError(f"{label}: array {name!r} has dtype {dtype}; use a numeric dtype")
    return dtype, tuple(int(n) for n in shape)
