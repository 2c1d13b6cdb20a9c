"""Architectures nobody on the project wrote (timm, random init, trained briefly here), uploaded
through the API in the files their users write: a `.pt2` exported with a dynamic batch range,
and ONNX from torch's dynamo and legacy exporters. The worker's task runs in-process; every
technique's download is then re-run in onnxruntime, outside the engine, on the test split.
The breadth (seven architectures, both sizes, every format) is in bench/corpus_pytorch.py."""
from __future__ import annotations

import json

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from optimization.base import TECHNIQUES
from tests.test_full_experiments import npz, prototype_dataset

# transaction=True: the worker task's heartbeat thread writes on its own connection, which must see the rows
pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

torch = pytest.importorskip("torch")
try:
    from tests.foreign import import_timm

    import_timm()
except ImportError:  # timm/torchvision are test extras, installed --no-deps by the Makefile
    pytest.skip("timm is not installed", allow_module_level=True)

FINE_TUNING = ("prune_unstructured", "prune_structured", "distillation", "qat", "hybrid")
ONE_EPOCH = {"techniques": {name: {"epochs": 1} for name in FINE_TUNING}}
TRAIN, SIDE = 480, 32


@pytest.fixture(scope="module")
def data():
    x, y = prototype_dataset((SIDE, SIDE, 3))
    return x.transpose(0, 3, 1, 2).copy(), y  # NCHW, the layout of the model's own input


@pytest.fixture(scope="module")
def mobilenet(data):
    """Learns the data in 6 epochs (lcnet_035 needed more; batch-norm statistics lag)."""
    return trained_timm("mobilenetv3_small_050", data, epochs=6)


def trained_timm(name: str, data, epochs: int):
    from optimization.backends import pytorch as backend
    from tests.foreign import timm_model

    x, y = data
    module = timm_model(name, num_classes=10)
    dataset = type("Train", (), {"x_train": x[:TRAIN], "y_train": y[:TRAIN]})
    backend.train(module, dataset, epochs, 3e-3, lambda *_: None)
    return module.eval()


def run_in_process(client, monkeypatch, model_path, data, techniques=None, input_shape=None) -> tuple[int, dict]:
    """Create, upload the model and the data, start, and run the worker's task here."""
    from experiments import tasks

    monkeypatch.setattr("experiments.models._enqueue_run", lambda experiment_id: None)
    x, y = data
    body = {"name": f"corpus {model_path.name}", "framework": "pytorch", "target_device": "rpi5",
            "dataset": "custom", "goal": "balanced", "constraints": {"max_accuracy_drop": 5.0}, "config": ONE_EPOCH}
    if techniques:
        body["techniques"] = list(techniques)
    response = client.post("/api/experiments/create", json.dumps(body), content_type="application/json")
    assert response.status_code == 201, response.content
    experiment_id = response.json()["id"]
    shape = {"input_shape": ",".join(map(str, input_shape))} if input_shape else {}
    upload = client.post(f"/api/experiments/{experiment_id}/upload",
                         {"file": SimpleUploadedFile(model_path.name, model_path.read_bytes()), **shape})
    assert upload.status_code == 200, upload.content
    dataset = npz(x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:])
    upload = client.post(f"/api/experiments/{experiment_id}/upload",
                         {"file": SimpleUploadedFile("data.npz", dataset), "kind": "dataset"})
    assert upload.status_code == 200, upload.content
    assert client.post(f"/api/experiments/{experiment_id}/start").status_code == 202

    assert tasks.run_experiment(experiment_id) == "completed"

    return experiment_id, client.get(f"/api/experiments/{experiment_id}/results").json()


def not_completed(runs: dict) -> dict:
    return {name: (run["status"], run["error"]) for name, run in runs.items() if run["status"] != "completed"}


def assert_downloads_reproduce_the_reported_accuracy(client, experiment_id: int, results: dict, data) -> None:
    import onnxruntime as ort

    x, y = data
    for run in (run for run in results["runs"] if run["status"] == "completed"):
        response = client.get(f"/api/experiments/{experiment_id}/download/{run['technique']}")
        assert response.status_code == 200
        session = ort.InferenceSession(b"".join(response.streaming_content), providers=["CPUExecutionProvider"])
        logits = session.run(None, {session.get_inputs()[0].name: x[TRAIN:]})[0]
        assert abs(float((logits.argmax(-1) == y[TRAIN:]).mean()) - run["accuracy"]) <= 0.01, run["technique"]


def test_a_timm_onnx_dynamo_export_is_converted_to_pytorch_and_completes_all_seven(client, monkeypatch, data,
                                                                                 mobilenet, tmp_path):
    """onnx2torch writes HardSigmoid with `Tensor.add` next to its Add modules' `torch.add`: QAT
    must keep the two apart for torchao's X86 quantizer."""
    from tests.foreign import save

    path = save(mobilenet, (3, SIDE, SIDE), tmp_path / "mnv3.onnx", "onnx-dynamo")

    experiment_id, results = run_in_process(client, monkeypatch, path, data)

    experiment = client.get(f"/api/experiments/{experiment_id}").json()
    assert experiment["analysis"]["model_preparation"]["pytorch_form"]["converter"] == "onnx2torch"
    runs = {run["technique"]: run for run in results["runs"]}
    assert sorted(runs) == sorted(TECHNIQUES)
    assert not_completed(runs) == {}
    assert results["baseline"]["accuracy"] > 0.5
    assert_downloads_reproduce_the_reported_accuracy(client, experiment_id, results, data)


def test_a_timm_pt2_with_a_batch_range_below_the_training_batch_completes_all_seven(client, monkeypatch, data,
                                                                                    mobilenet, tmp_path):
    from tests.foreign import save

    path = save(mobilenet, (3, SIDE, SIDE), tmp_path / "mnv3.pt2", "pt2", batch_range=(2, 48))

    experiment_id, results = run_in_process(client, monkeypatch, path, data)

    runs = {run["technique"]: run for run in results["runs"]}
    assert sorted(runs) == sorted(TECHNIQUES)
    assert not_completed(runs) == {}
    assert "batches 2 to 48" in runs["qat"]["details"]["model_preparation"]["batch"]
    assert results["baseline"]["accuracy"] > 0.5
    assert_downloads_reproduce_the_reported_accuracy(client, experiment_id, results, data)


def test_a_timm_convnext_legacy_onnx_export_runs_quantization_and_channel_pruning(client, monkeypatch, data,
                                                                                  tmp_path):
    """LayerNorm and GELU, written by the TorchScript-based exporter with a dynamic batch axis;
    its layer scales are bare initializers that channel pruning must narrow with their channels."""
    from tests.foreign import save

    path = save(trained_timm("convnext_atto", data, epochs=2), (3, SIDE, SIDE), tmp_path / "convnext.onnx",
                "onnx-legacy")
    techniques = ("ptq_int8", "ptq_int4", "prune_structured", "distillation", "hybrid")

    experiment_id, results = run_in_process(client, monkeypatch, path, data, techniques=techniques)

    assert [run["status"] for run in results["runs"]] == ["completed"] * 5, [run["error"] for run in results["runs"]]
    assert_downloads_reproduce_the_reported_accuracy(client, experiment_id, results, data)


def test_a_timm_efficientnet_style_torchscript_file_runs_quantization_and_qat(client, monkeypatch, data, tmp_path):
    """TorchScript records no input shape: the experiment's config gives it."""
    from tests.foreign import save

    path = save(trained_timm("tinynet_e", data, epochs=3), (3, SIDE, SIDE), tmp_path / "tinynet.pt", "pt")

    experiment_id, results = run_in_process(client, monkeypatch, path, data, techniques=("ptq_int8", "ptq_int4", "qat"),
                                            input_shape=[3, SIDE, SIDE])

    assert [run["status"] for run in results["runs"]] == ["completed"] * 3, [run["error"] for run in results["runs"]]
    assert_downloads_reproduce_the_reported_accuracy(client, experiment_id, results, data)


def test_a_zip_of_a_timm_dynamo_export_with_its_external_data_file_uploads_and_runs(client, monkeypatch, data,
                                                                                    mobilenet, tmp_path):
    """torch.onnx.export's default: the weights in model.onnx.data beside model.onnx."""
    import zipfile

    folder = tmp_path / "export"
    folder.mkdir()
    torch.onnx.export(mobilenet, (torch.zeros(2, 3, SIDE, SIDE),), str(folder / "model.onnx"), dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
    assert (folder / "model.onnx.data").exists()
    archive = tmp_path / "mnv3.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for file in folder.iterdir():
            zipped.write(file, file.name)

    experiment_id, results = run_in_process(client, monkeypatch, archive, data, techniques=("ptq_int8", "qat"))

    assert [run["status"] for run in results["runs"]] == ["completed", "completed"], results["runs"]
    assert results["baseline"]["accuracy"] > 0.5
    assert_downloads_reproduce_the_reported_accuracy(client, experiment_id, results, data)
