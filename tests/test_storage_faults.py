"""Storage that refuses: a full disk or a read-only folder answers 507 / 503 JSON without an
absolute server path, leaves no partial file, and a DELETE that cannot remove the files
keeps the rows."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from experiments import storage
from experiments.models import Experiment, ModelFile
from tests.conftest import upload_file

pytestmark = pytest.mark.django_db


def files_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file())


@pytest.fixture
def full_disk(monkeypatch):
    """Every write into storage fails the way a full disk does, after a first byte landed."""
    real_fdopen = os.fdopen

    class FillsUp:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            os.write(self.handle.fileno(), data[:1])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

    monkeypatch.setattr(storage.os, "fdopen", lambda fd, mode="r": FillsUp(real_fdopen(fd, mode)))


def test_upload_onto_a_full_disk_answers_507_json_and_leaves_no_partial_file(
        client, new_experiment, model_files, storage_root, full_disk):
    experiment = new_experiment()

    response = client.post(f"/api/experiments/{experiment.pk}/upload",
                              {"file": upload_file(model_files["pt"])})

    assert response.status_code == 507
    message = response.json()["error"]
    assert "full" in message and str(storage_root) not in message
    assert files_under(storage_root) == []
    assert not ModelFile.objects.filter(experiment=experiment).exists()
    assert Experiment.objects.get(pk=experiment.pk).status == "created"


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_upload_onto_read_only_storage_answers_503_json_without_a_server_path(
        client, new_experiment, model_files, storage_root, monkeypatch, code):
    experiment = new_experiment()

    def read_only(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(storage_root / "models"))

    monkeypatch.setattr(storage.tempfile, "mkstemp", read_only)

    response = client.post(f"/api/experiments/{experiment.pk}/upload",
                              {"file": upload_file(model_files["pt"])})

    assert response.status_code == 503
    assert str(storage_root) not in response.json()["error"]
    assert files_under(storage_root) == []


def test_upload_whose_final_rename_fails_keeps_nothing_in_storage(
        client, new_experiment, model_files, storage_root, monkeypatch):
    experiment = new_experiment()
    monkeypatch.setattr(storage, "move_into_place", lambda *a, **k: (_ for _ in ()).throw(
        storage.StorageWriteError.from_os_error(OSError(errno.ENOSPC, "full"), "save the upload")))

    response = client.post(f"/api/experiments/{experiment.pk}/upload",
                              {"file": upload_file(model_files["pt"]), "input_shape": "1,8,8"})

    assert response.status_code == 507
    assert files_under(storage_root) == []


def test_atomic_write_replaces_the_file_whole_and_leaves_no_temporary_name(storage_root):
    target = storage_root / "models" / "custom" / "pytorch" / "model.pt"

    size = storage.atomic_write(target, [b"ab", b"cd"])

    assert size == 4 and target.read_bytes() == b"abcd"
    assert files_under(storage_root) == [target]


def test_delete_with_unremovable_files_answers_503_and_keeps_the_rows(
        client, finished_experiment, storage_root, monkeypatch):
    # Tests run as root, whom chmod does not stop: the removal itself is made to refuse.
    def permission_denied(self, missing_ok=False):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))

    monkeypatch.setattr(Path, "unlink", permission_denied)
    files_before = files_under(storage_root)
    rows_before = ModelFile.objects.filter(experiment=finished_experiment).count()

    response = client.delete(f"/api/experiments/{finished_experiment.pk}")

    assert response.status_code == 503
    assert str(storage_root) not in response.json()["error"]
    assert Experiment.objects.filter(pk=finished_experiment.pk).exists()
    assert ModelFile.objects.filter(experiment=finished_experiment).count() == rows_before
    assert files_under(storage_root) == files_before


def test_delete_that_fails_on_the_results_folder_keeps_the_experiment(
        client, finished_experiment, monkeypatch):
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(storage.shutil, "rmtree", read_only)

    response = client.delete(f"/api/experiments/{finished_experiment.pk}")

    assert response.status_code == 503
    assert Experiment.objects.filter(pk=finished_experiment.pk).exists()


def test_delete_removes_every_stored_file_then_the_rows(client, finished_experiment, storage_root):
    response = client.delete(f"/api/experiments/{finished_experiment.pk}")

    assert response.status_code == 204
    assert not Experiment.objects.filter(pk=finished_experiment.pk).exists()
    assert not storage.optimized_dir(finished_experiment.pk).exists()
    assert files_under(storage_root) == [storage_root / "models" / "pretrained" / "pytorch" / "digits_cnn.pt"]
