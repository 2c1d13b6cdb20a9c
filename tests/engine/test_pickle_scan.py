"""check_torch_archive reads pickles without running them and refuses anything that would
import more than tensors and containers."""
from __future__ import annotations

import io
import os
import pickle
import zipfile

import pytest

from optimization.base import InvalidInputError, UnsafeModelError
from optimization.safety.pickle_scan import check_torch_archive


class CreatesFile:
    """Unpickling this opens (creates) a file: the classic pickle payload, harmless here."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


class RunsShellCommand:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def zip_with_pickle(path, payload: bytes, inner_name="archive/data.pkl"):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(inner_name, payload)
        archive.writestr("archive/version", "3\n")
    return path


@pytest.mark.parametrize("payload_class", [CreatesFile, RunsShellCommand])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_raw_pickle_pth_that_would_create_a_file_is_refused_and_creates_nothing(tmp_path, payload_class, protocol):
    target = tmp_path / "pwned.txt"
    upload = tmp_path / "model.pth"
    upload.write_bytes(pickle.dumps({"state": payload_class(target)}, protocol=protocol))
    with pytest.raises(UnsafeModelError, match="open|system"):
        check_torch_archive(upload)
    assert not target.exists()


def test_zipped_pickle_that_would_create_a_file_is_refused_and_creates_nothing(tmp_path):
    target = tmp_path / "pwned.txt"
    upload = zip_with_pickle(tmp_path / "model.pt", pickle.dumps(CreatesFile(target), protocol=2))
    with pytest.raises(UnsafeModelError, match=r"io\.open|builtins\.open"):
        check_torch_archive(upload)
    assert not target.exists()


def test_payload_nested_inside_a_pt2_archive_is_refused(tmp_path):
    inner = io.BytesIO()
    zip_with_pickle(inner, pickle.dumps(RunsShellCommand(tmp_path / "x"), protocol=4))
    upload = tmp_path / "model.pt2"
    with zipfile.ZipFile(upload, "w") as archive:
        archive.writestr("model/models/model.json", "{}")
        archive.writestr("model/data/sample_inputs/model.pt", inner.getvalue())
    with pytest.raises(UnsafeModelError, match="system"):
        check_torch_archive(upload)


def test_raw_opaque_object_pickle_inside_a_pt2_is_refused(tmp_path):
    upload = tmp_path / "model.pt2"
    with zipfile.ZipFile(upload, "w") as archive:
        archive.writestr("model/data/constants/opaque_obj_0", pickle.dumps(CreatesFile(tmp_path / "y")))
    with pytest.raises(UnsafeModelError):
        check_torch_archive(upload)
    assert not (tmp_path / "y").exists()


def test_plain_state_dict_pickle_is_accepted(tmp_path):
    from collections import OrderedDict

    upload = tmp_path / "weights.pth"
    upload.write_bytes(pickle.dumps(OrderedDict(layer=[1.0, 2.0], shape=(3, 4)), protocol=2))
    check_torch_archive(upload)


def test_file_that_is_neither_zip_nor_pickle_is_not_a_pytorch_file(tmp_path):
    upload = tmp_path / "model.pt"
    upload.write_bytes(b"hello, I am a text file")
    with pytest.raises(InvalidInputError, match="not a PyTorch file"):
        check_torch_archive(upload)


def test_archive_entry_with_parent_directory_is_refused(tmp_path):
    upload = zip_with_pickle(tmp_path / "model.pt", pickle.dumps({}, protocol=2), inner_name="../../data.pkl")
    with pytest.raises(UnsafeModelError, match="outside"):
        check_torch_archive(upload)


def test_real_torch_archives_of_zoo_models_pass(tmp_path):
    torch = pytest.importorskip("torch")
    from optimization.zoo.pytorch import build

    model = build("resnet_small", 10, 3).eval()
    example = torch.zeros(2, 3, 32, 32)
    torch.save(model.state_dict(), tmp_path / "m.pth")
    torch.jit.save(torch.jit.trace(model, example), tmp_path / "m.pt")
    torch.export.save(torch.export.export(model, (example,)), tmp_path / "m.pt2")
    for name in ("m.pth", "m.pt", "m.pt2"):
        check_torch_archive(tmp_path / name)


def test_pickled_whole_model_is_refused(tmp_path):
    torch = pytest.importorskip("torch")
    from optimization.zoo.pytorch import build

    torch.save(build("digits_cnn", 10, 1), tmp_path / "whole.pth")
    with pytest.raises(UnsafeModelError, match="DigitsCNN|state_dict"):
        check_torch_archive(tmp_path / "whole.pth")
