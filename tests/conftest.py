"""Shared fixtures: a storage folder per test, persona clients (the plain `client` is logged
in as the owner), API tokens, experiments in each state, and tiny model files made once per
session (no training)."""
from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

ROOT = Path(__file__).resolve().parent.parent
DEMO_BODY = {"name": "digits demo", "framework": "pytorch", "target_device": "rpi4", "dataset": "digits",
             "goal": "balanced", "constraints": {"max_accuracy_drop": 1.0}}


def pytest_configure(config):
    """The tests run the engine in this process, as the worker does: prepared once, before any
    test module imports a backend."""
    from optimization.worker import prepare_worker_process

    prepare_worker_process()


@pytest.fixture(autouse=True)
def storage_root(request, tmp_path):
    """Every test gets its own storage, so nothing touches the project's models/ or dataset/.
    Engine tests run without pytest-django (-p no:django) and need no settings."""
    root = tmp_path / "storage"
    root.mkdir()
    if request.config.pluginmanager.hasplugin("django"):
        request.getfixturevalue("settings").EDGEOPT_STORAGE_ROOT = root
    return root


# -- personas (in the manner of healthchecks' hc/test.py) ------------------------------------
# Users are made without a password (no slow hashing); clients log in with force_login.


@pytest.fixture
def owner(db, django_user_model):
    """The user who owns the experiments the fixtures below make."""
    return django_user_model.objects.create_user(username="owner")


@pytest.fixture
def other_user(db, django_user_model):
    """A second user, who must not see the owner's experiments."""
    return django_user_model.objects.create_user(username="other")


@pytest.fixture
def client(client, owner):
    """pytest-django's client, logged in as the owner: what the pages and the API need."""
    client.force_login(owner)
    return client


@pytest.fixture
def other_client(other_user):
    from django.test import Client

    other = Client()
    other.force_login(other_user)
    return other


@pytest.fixture
def anonymous(db):
    """A visitor or script without a session or a token."""
    from django.test import Client

    return Client()


@pytest.fixture
def api_token(owner) -> str:
    """An API token of the owner, as a script would hold it."""
    from experiments.models import ApiToken

    return ApiToken.issue(owner, "tests")[1]


@pytest.fixture
def auth_headers(api_token) -> dict:
    """The owner's token as a header: `client.get(url, headers=auth_headers)`, urllib, websockets."""
    return {"Authorization": f"Bearer {api_token}"}


class RunsCode:
    """Pickling this stores a call to os.system: loading the file would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="session")
def model_files(tmp_path_factory):
    """Tiny real PyTorch files: TorchScript .pt, a digits_cnn state_dict .pth, a torch.export .pt2,
    a pickled whole model and a .pth whose pickle would run a shell command (with the marker it
    would create)."""
    import torch

    from optimization.zoo.pytorch import build

    folder = tmp_path_factory.mktemp("models")
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    torch.jit.save(torch.jit.script(net), folder / "tiny.pt")
    torch.save(build("digits_cnn", 10, 1).state_dict(), folder / "weights.pth")
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 8, 8),)), folder / "exported.pt2")
    torch.save(net, folder / "whole_model.pth")
    marker = folder / "code-ran"
    torch.save({"weights": RunsCode(marker)}, folder / "trojan.pth")
    (folder / "trojan_legacy.pth").write_bytes(pickle.dumps(RunsCode(marker), protocol=2))
    return {"pt": folder / "tiny.pt", "state_dict": folder / "weights.pth", "exported": folder / "exported.pt2",
            "whole": folder / "whole_model.pth", "trojan": folder / "trojan.pth",
            "trojan_legacy": folder / "trojan_legacy.pth", "marker": marker}


def upload_file(path: Path, name: str | None = None) -> SimpleUploadedFile:
    return SimpleUploadedFile(name or path.name, path.read_bytes())


def npz_bytes() -> bytes:
    """A dataset archive with the x/y arrays the API asks for."""
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, x=np.zeros((4, 8, 8, 1), dtype=np.float32), y=np.arange(4))
    return buffer.getvalue()


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries no pixels: what a decompression bomb
    looks like to a header reader, in 60 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.fixture
def pretrained_model(storage_root, model_files):
    """A 'digits_cnn' in models/pretrained/pytorch/, as seed_demo would leave it."""
    folder = storage_root / "models" / "pretrained" / "pytorch"
    folder.mkdir(parents=True)
    path = folder / "digits_cnn.pt"
    path.write_bytes(model_files["pt"].read_bytes())
    return path


@pytest.fixture
def new_experiment(owner):
    """An experiment without a model (status created), the owner's unless told otherwise."""
    from experiments import services
    from experiments.forms import ExperimentForm

    def make(owned_by=None, **overrides):
        form = ExperimentForm(data={**DEMO_BODY, **overrides})
        assert form.is_valid(), form.errors
        return services.create_experiment(form.cleaned_data, owner=owned_by or owner)

    return make


@pytest.fixture
def ready_experiment(new_experiment, pretrained_model):
    """An experiment with the pretrained model attached (status ready)."""
    return new_experiment(pretrained_model="digits_cnn")


@pytest.fixture
def finished_experiment(ready_experiment, storage_root):
    """A completed experiment with one run, its two artifacts and a recommendation, written
    through the same sink the worker uses."""
    from experiments.attempts import claim
    from experiments.models import Experiment
    from experiments.sink import DjangoSink

    experiment = ready_experiment
    experiment.enqueue()
    sink = DjangoSink(experiment, claim(experiment.pk))
    output = sink.output_dir
    output.mkdir(parents=True)
    (output / "ptq_int8.onnx").write_bytes(b"\x08\x07onnx-bytes")
    (output / "ptq_int8.pt2").write_bytes(b"PK\x03\x04native")
    (output / "baseline.onnx").write_bytes(b"\x08\x07baseline")
    sink.baseline({"accuracy": 0.95, "size_bytes": 4000, "latency_ms": 0.5, "params": 650, "macs": 640,
                   "estimates": {"device": "rpi4", "latency_ms": 1.0, "memory_mb": 2.0, "energy_mj": 3.0},
                   "artifacts": {"deploy": output / "baseline.onnx", "native": experiment.source_model().absolute_path()}})
    sink.run_started("ptq_int8")
    sink.run_finished("ptq_int8", {
        "status": "completed", "accuracy": 0.94, "accuracy_drop": 1.0, "size_bytes": 1100,
        "compression_ratio": 3.6, "params": 650, "macs": 640, "latency_ms": 0.3, "speedup": 1.7,
        "estimates": {"device": "rpi4", "latency_ms": 0.6, "memory_mb": 1.0, "energy_mj": 1.5},
        "constraints_met": {"max_accuracy_drop": True}, "details": {"bits": 8}, "error": None,
        "artifacts": {"deploy": output / "ptq_int8.onnx", "native": output / "ptq_int8.pt2"}})
    sink.recommendation({"technique": "ptq_int8", "reasoning": "ptq_int8 is 3.6x smaller and loses 1.0 point.",
                         "satisfied": True, "ranking": [{"technique": "ptq_int8", "score": 1.0}]})
    experiment.refresh_from_db()
    experiment.finish(Experiment.Status.COMPLETED)
    return experiment


@pytest.fixture(scope="session")
def demo_storage(tmp_path_factory):
    """Storage with the digits preset and the PyTorch digits_cnn, trained once per session."""
    from optimization.demo import seed_demo

    root = tmp_path_factory.mktemp("demo-storage")
    seed_demo(root, frameworks=("pytorch",), log=lambda message: None)
    return root


@pytest.fixture
def stack(demo_storage, tmp_path, settings, transactional_db, auth_headers):
    """Real Daphne + qcluster processes on the test database, storage shared with this test;
    its requests carry the owner's API token."""
    from tests.live import running_stack

    settings.EDGEOPT_STORAGE_ROOT = demo_storage
    with running_stack(demo_storage, tmp_path / "logs", auth_headers) as running:
        try:
            yield running
        finally:
            print(running.logs())  # shown by pytest only when the test failed
