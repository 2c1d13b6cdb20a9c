"""Refuse PyTorch files whose pickles would import anything but tensors and containers.

`torch.export.load` and `torch.jit.load` have no safe mode, and a pickled whole model runs
arbitrary code while unpickling. So before any torch loader sees an upload, every pickle in it
is read opcode by opcode with `pickletools.genops` (nothing is executed) and each global it
would import is checked against `ALLOWED_GLOBALS`, built from what real `torch.save`,
`torch.jit.save` and `torch.export.save` archives of our models contain.

Stdlib only: the web process calls this on upload.
"""
from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path, PurePosixPath

from optimization.base import InvalidInputError, UnsafeModelError

TORCH_SUFFIXES = (".pt", ".pt2", ".pth")
MAX_PICKLE_BYTES = 64 * 2**20  # a state_dict's pickle holds names and shapes, never the weights
MAX_ARCHIVE_MEMBERS = 100_000
MAX_UNCOMPRESSED_BYTES = 8 * 2**30
MAX_NESTING = 3  # .pt2 keeps torch.save archives (sample inputs, pickled weights) inside itself

ALLOWED_GLOBALS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "slice"),
        ("builtins", "complex"),
        ("torch._utils", "_rebuild_tensor"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch._utils", "_rebuild_qtensor"),
        ("torch._utils", "_rebuild_sparse_tensor"),
        ("torch._utils", "_rebuild_device_tensor_from_numpy"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch", "Tensor"),
        ("torch", "Size"),
        ("torch", "device"),
        ("torch", "dtype"),
        ("torch.nn.parameter", "Parameter"),
        ("torch.serialization", "_get_layout"),
        *(("torch", dtype) for dtype in (
            "float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32",
            "int64", "bool", "qint8", "quint8", "qint32", "per_tensor_affine",
            "per_channel_affine", "strided", "contiguous_format", "channels_last",
        )),
        *(("torch", storage) for storage in (
            "FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "ByteStorage",
            "CharStorage", "ShortStorage", "IntStorage", "LongStorage", "BoolStorage",
            "QInt8Storage", "QUInt8Storage", "QInt32Storage", "UntypedStorage",
        )),
    }
)
# TorchScript archives name their own module classes `__torch__.<python path>.<Class>`; the
# TorchScript unpickler resolves those to compiled script classes, never to Python code.
TORCHSCRIPT_MODULE_PREFIX = "__torch__"
TORCHSCRIPT_GLOBALS = frozenset({("torch.jit._pickle", name) for name in (
    "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag",
)})

_PICKLE_START = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
               "BINSTRING", "SHORT_BINSTRING"}
_MEMO_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


def check_torch_archive(path: Path) -> None:
    """Raise UnsafeModelError naming the first global outside the allowlist, InvalidInputError
    when the file is neither a zip archive nor a pickle; return None when it is safe to load."""
    path = Path(path)
    if path.suffix.lower() not in TORCH_SUFFIXES:
        raise InvalidInputError(f"{path.name}: a PyTorch model must end in {', '.join(TORCH_SUFFIXES)}")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            _check_zip(archive, path.name, depth=0)
    elif head[:2] in _PICKLE_START:
        with open(path, "rb") as handle:
            _check_pickle_sequence(handle, path.name)
    else:
        raise InvalidInputError(
            f"{path.name} is not a PyTorch file (neither a torch zip archive nor a pickle); upload a "
            "torch.export .pt2, a TorchScript .pt or a state_dict .pth"
        )


def _check_zip(archive: zipfile.ZipFile, label: str, depth: int) -> None:
    members = archive.infolist()
    if len(members) > MAX_ARCHIVE_MEMBERS:
        raise InvalidInputError(f"{label}: {len(members)} files in the archive is more than a model has")
    if sum(member.file_size for member in members) > MAX_UNCOMPRESSED_BYTES:
        raise InvalidInputError(f"{label}: the archive unpacks to more than {MAX_UNCOMPRESSED_BYTES >> 30} GiB")
    for member in members:
        name = PurePosixPath(member.filename)
        if name.is_absolute() or ".." in name.parts or "\\" in member.filename:
            raise UnsafeModelError(f"{label}: archive entry {member.filename!r} points outside the archive")
        if member.is_dir():
            continue
        where = f"{label}:{member.filename}"
        with archive.open(member) as stream:
            head = stream.read(4)
        if head == b"PK\x03\x04":
            if depth >= MAX_NESTING:
                raise UnsafeModelError(f"{where}: archives nested deeper than {MAX_NESTING} levels")
            with archive.open(member) as stream:
                nested = _read_bounded(stream, member.file_size, where, limit=MAX_UNCOMPRESSED_BYTES)
            with zipfile.ZipFile(io.BytesIO(nested)) as inner:
                _check_zip(inner, where, depth + 1)
        elif name.suffix in (".pkl", ".debug_pkl"):
            with archive.open(member) as stream:
                _check_pickle(_read_bounded(stream, member.file_size, where), where, strict=True)
        elif head[:2] in _PICKLE_START:
            # Raw tensor bytes may start like a pickle by chance, so a parse error here means
            # "not a pickle"; every global met before that point was still checked.
            with archive.open(member) as stream:
                _check_pickle(stream.read(MAX_PICKLE_BYTES), where, strict=False)


def _read_bounded(stream, size: int, where: str, limit: int = MAX_PICKLE_BYTES) -> bytes:
    if size > limit:
        raise InvalidInputError(f"{where}: {size} bytes is too large for this part of a model file")
    return stream.read(limit + 1)[:limit]


def _check_pickle_sequence(handle, where: str) -> None:
    """A legacy (pre-zip) torch.save file is several pickles in a row followed by raw storage
    bytes; the first must parse, the rest are checked for as long as they parse."""
    data = handle.read(MAX_PICKLE_BYTES)
    stream = io.BytesIO(data)
    first = True
    while stream.tell() < len(data) and data[stream.tell():stream.tell() + 2] in _PICKLE_START:
        if not _check_pickle_stream(stream, where, strict=first):
            return
        first = False


def _check_pickle(data: bytes, where: str, strict: bool) -> None:
    _check_pickle_stream(io.BytesIO(data), where, strict)


def _check_pickle_stream(stream: io.BytesIO, where: str, strict: bool) -> bool:
    """Walk one pickle; True when it parsed to its STOP opcode."""
    memo: dict = {}
    recent_strings: list = []
    try:
        for opcode, arg, _ in pickletools.genops(stream):
            name = opcode.name
            if name in _STRING_OPS:
                recent_strings.append(arg)
            elif name in _MEMO_PUT_OPS:
                memo[arg] = recent_strings[-1] if recent_strings else None
            elif name == "MEMOIZE":
                memo[len(memo)] = recent_strings[-1] if recent_strings else None
            elif name in _MEMO_GET_OPS:
                recent_strings.append(memo.get(arg))
            elif name in ("GLOBAL", "INST"):
                module, _, attribute = str(arg).partition(" ")
                _check_global(module, attribute, where)
            elif name == "STACK_GLOBAL":
                if len(recent_strings) < 2 or not all(isinstance(s, str) for s in recent_strings[-2:]):
                    raise UnsafeModelError(f"{where}: a pickle builds an import name we cannot read statically")
                _check_global(recent_strings[-2], recent_strings[-1], where)
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise UnsafeModelError(f"{where}: a pickle uses the copyreg extension registry")
            if name not in _STRING_OPS and name not in _MEMO_PUT_OPS and name not in _MEMO_GET_OPS \
                    and name != "MEMOIZE":
                recent_strings.append(None)
    except UnsafeModelError:
        raise
    except Exception as error:  # genops raises ValueError and friends on malformed input
        if strict:
            raise InvalidInputError(f"{where} is not a readable pickle ({error}); is this a PyTorch file?")
        return False
    return True


def _check_global(module: str, attribute: str, where: str) -> None:
    if (module, attribute) in ALLOWED_GLOBALS or (module, attribute) in TORCHSCRIPT_GLOBALS:
        return
    if module == TORCHSCRIPT_MODULE_PREFIX or module.startswith(TORCHSCRIPT_MODULE_PREFIX + "."):
        return
    raise UnsafeModelError(
        f"{where} would import {module}.{attribute} while loading, which can run arbitrary code. "
        "Export the model with torch.export (.pt2) or TorchScript (.pt), or upload a state_dict (.pth) "
        "together with an architecture name."
    )
