"""GET /api/experiments/{id}/bundle/{technique}: a zip that deploys and re-measures one result."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile

import pytest

# transaction=True: the worker task's heartbeat thread writes on its own connection, which must see the rows
pytestmark = pytest.mark.django_db(transaction=True)


def bundle_files(response) -> dict[str, bytes]:
    """{name inside the bundle's folder: bytes}"""
    archive = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    folders = {name.split("/", 1)[0] for name in archive.namelist()}
    assert len(folders) == 1, "everything sits in one folder"
    return {name.split("/", 1)[1]: archive.read(name) for name in archive.namelist()}


def test_bundle_holds_the_model_run_script_preprocessing_labels_test_split_and_report(
        client, finished_experiment, storage_root):
    from optimization.datasets import write_digits_preset

    write_digits_preset(storage_root / "dataset" / "preset" / "digits")

    response = client.get(f"/api/experiments/{finished_experiment.pk}/bundle/ptq_int8")

    assert response.status_code == 200
    assert response["Content-Type"] == "application/zip"
    assert "ptq_int8_bundle.zip" in response["Content-Disposition"]
    files = bundle_files(response)
    assert files["model.onnx"] == b"\x08\x07onnx-bytes"
    assert b"def main" in files["run.py"]
    preprocessing = json.loads(files["preprocessing.json"])
    assert preprocessing["layout"] == "NCHW" and preprocessing["input_shape"] == [1, 8, 8]
    assert json.loads(files["labels.json"])["labels"]["9"] == "9"
    assert "x_test" in zipfile.ZipFile(io.BytesIO(files["test_split.npz"])).namelist()[0]
    report = json.loads(files["report.json"])
    assert report["technique"]["details"] == {"bits": 8}
    assert report["measured_on_host"]["accuracy"] == 0.94
    assert report["estimated_on_device"]["latency_ms"] == 0.6
    assert len(report["dataset"]["sha256"]) == 64 and report["dataset"]["test_samples"] == 359
    assert report["seed"] == 0 and report["environment"]["packages"]["numpy"]
    assert report["recommended"] is True


def test_bundle_of_an_unknown_technique_is_404_and_of_a_failed_run_is_409(client, finished_experiment):
    finished_experiment.runs.filter(technique="ptq_int8").update(status="failed")

    unknown = client.get(f"/api/experiments/{finished_experiment.pk}/bundle/magic")
    failed = client.get(f"/api/experiments/{finished_experiment.pk}/bundle/ptq_int8")
    never_ran = client.get(f"/api/experiments/{finished_experiment.pk}/bundle/qat")

    assert unknown.status_code == 404 and "unknown technique" in unknown.json()["error"]
    assert failed.status_code == 409 and "only a completed run" in failed.json()["error"]
    assert never_ran.status_code == 404


# -- the real thing: run.py on this machine prints the run's own top-1 ---------------------------


@pytest.fixture(scope="session")
def two_framework_storage(demo_storage, tmp_path_factory):
    """The session's demo storage plus the TensorFlow digits_cnn (trained once)."""
    from optimization.demo import seed_demo

    root = tmp_path_factory.mktemp("bundle-storage")
    shutil.copytree(demo_storage, root, dirs_exist_ok=True)
    seed_demo(root, frameworks=("tensorflow",), log=lambda message: None)
    return root


def run_ptq_int8(framework: str, owner):
    """A real one-technique experiment on the demo model, run by the worker's task in-process."""
    from experiments import services, tasks
    from experiments.forms import ExperimentForm

    form = ExperimentForm(data={"name": f"bundle {framework}", "framework": framework, "target_device": "rpi4",
                                "dataset": "digits", "techniques": ["ptq_int8"], "pretrained_model": "digits_cnn"})
    assert form.is_valid(), form.errors
    experiment = services.create_experiment(form.cleaned_data, owner=owner)
    experiment.enqueue()
    assert tasks.run_experiment(experiment.pk) == "completed"
    return experiment.runs.get(technique="ptq_int8")


@pytest.mark.slow
@pytest.mark.parametrize("framework, model_file", [("pytorch", "model.onnx"), ("tensorflow", "model.tflite")])
def test_run_py_from_the_bundle_prints_a_latency_and_the_runs_own_top1(
        client, owner, settings, two_framework_storage, tmp_path, framework, model_file):
    settings.EDGEOPT_STORAGE_ROOT = two_framework_storage
    run = run_ptq_int8(framework, owner)
    response = client.get(f"/api/experiments/{run.experiment_id}/bundle/ptq_int8")
    assert response.status_code == 200
    folder = tmp_path / "bundle"
    folder.mkdir()
    for name, data in bundle_files(response).items():
        (folder / name).write_bytes(data)
    assert (folder / model_file).is_file()

    printed = subprocess.run([sys.executable, "run.py", "--repeats", "30"], cwd=folder,
                             capture_output=True, text=True, timeout=300)
    measured = subprocess.run([sys.executable, "run.py", "--repeats", "30", "--threads", "2", "--json"],
                              cwd=folder, capture_output=True, text=True, timeout=300)

    assert printed.returncode == 0, printed.stderr
    assert "latency_ms" in printed.stdout and f"top1       {run.accuracy:.4f}" in printed.stdout
    result = json.loads(measured.stdout)
    assert result["latency_ms"] > 0 and result["threads"] == 2
    assert result["samples"] == 359
    assert result["top1"] == pytest.approx(run.accuracy, abs=1e-9)


def test_another_users_bundle_is_404(other_client, finished_experiment):
    response = other_client.get(f"/api/experiments/{finished_experiment.pk}/bundle/ptq_int8")

    assert response.status_code == 404
