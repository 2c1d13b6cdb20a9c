"""What a PyTorch upload is, and a state_dict's tensor names and shapes, without torch.

`torch_file_kind` tells TorchScript, torch.export and plain torch.save archives apart by the
entries each writer leaves. `state_dict_shapes` reads a torch.save pickle with an unpickler
that resolves only tensor-rebuild calls and containers, each to a stand-in that records the
shape: no tensor data is read and no other global can be reached (the Python documentation's
"restricting globals" pattern, after `pickle_scan` has already walked every opcode).
Standard library only: the web process runs this at upload.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path, PurePosixPath

from optimization.base import InvalidInputError, UnsafeModelError
# A state_dict's pickle holds names and shapes (~30 KB for MobileNetV2's 314 tensors); the
# bound keeps a crafted pickle from building much in the web process's memory.
MAX_STATE_DICT_PICKLE_BYTES = 8 * 2**20
# Legacy (pre-zip) torch.save files hold three small pickles (magic number, protocol, system
# info) before the object itself.
LEGACY_HEADER_PICKLES = 3


def torch_file_kind(path: Path) -> str:
    """"torchscript", "exported" (torch.export), "saved" (torch.save), or "unknown"."""
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            return "saved" if handle.read(2)[:1] == b"\x80" else "unknown"
    with zipfile.ZipFile(path) as archive:
        inner = {PurePosixPath(*PurePosixPath(name).parts[1:]).as_posix() for name in archive.namelist()}
    if "constants.pkl" in inner or any(name.startswith("code/") for name in inner):
        return "torchscript"
    if "archive_format" in inner or any(name.startswith("models/") for name in inner):
        return "exported"
    if "data.pkl" in inner:
        return "saved"
    return "unknown"


class _Storage:
    """Stands in for a tensor's storage: the data stays unread in the archive."""


def _tensor_shape(_storage, _offset, size, *_rest):
    return tuple(int(n) for n in size)


def _parameter(data, *_rest):
    return data


_STAND_INS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _tensor_shape,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor_shape,
    ("torch._utils", "_rebuild_tensor_v3"): _tensor_shape,
    ("torch._utils", "_rebuild_qtensor"): _tensor_shape,
    ("torch._utils", "_rebuild_parameter"): _parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _parameter,
    ("torch.nn.parameter", "Parameter"): _parameter,
}


class _ShapeUnpickler(pickle.Unpickler):
    def __init__(self, stream, label: str):
        super().__init__(stream)
        self.label = label

    def find_class(self, module: str, name: str):
        if (module, name) in _STAND_INS:
            return _STAND_INS[(module, name)]
        if module == "torch" and name.endswith("Storage"):
            return _Storage
        raise UnsafeModelError(
            f"{self.label} holds {module}.{name}, which a plain state_dict does not; save "
            "model.state_dict() with torch.save")

    def persistent_load(self, pid):
        return _Storage()


def state_dict_shapes(path: Path, label: str) -> dict[str, tuple[int, ...]]:
    """{parameter or buffer name: shape} of a torch.save'd state_dict; InvalidInputError when
    the file holds something else."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((m for m in archive.infolist()
                               if PurePosixPath(m.filename).parts[1:] == ("data.pkl",)), None)
                if member is None or member.file_size > MAX_STATE_DICT_PICKLE_BYTES:
                    raise InvalidInputError(f"{label} is not a torch.save file (no data.pkl of a readable size); "
                                            "save model.state_dict() with torch.save")
                state = _ShapeUnpickler(io.BytesIO(archive.read(member)), label).load()
        else:
            with open(path, "rb") as handle:
                unpickler = _ShapeUnpickler(io.BytesIO(handle.read(MAX_STATE_DICT_PICKLE_BYTES)), label)
                for _ in range(LEGACY_HEADER_PICKLES):
                    unpickler.load()
                state = unpickler.load()
    except (UnsafeModelError, InvalidInputError):
        raise
    except Exception as error:  # a malformed pickle raises any of several errors
        raise InvalidInputError(f"{label} is not a readable torch.save file ({type(error).__name__}); "
                                "save model.state_dict() with torch.save") from None
    if not (isinstance(state, dict) and state and all(
            isinstance(k, str) and isinstance(v, tuple) for k, v in state.items())):
        raise InvalidInputError(
            f"{label} is not a plain state_dict (names to tensors); save model.state_dict() with torch.save")
    return dict(state)
