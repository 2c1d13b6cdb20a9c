"""Real storage faults, not simulated ones: an experiment's results folder on a tmpfs of a few
hundred KB fills up for real (ENOSPC from the kernel), and a read-only remount refuses the
removal. Mounting needs root (as in the development container); elsewhere these skip and
tests/engine/test_atomic.py and tests/test_storage_faults.py cover the same paths with
simulated errors."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from experiments import tasks
from experiments.models import Experiment, ModelFile, OptimizationRun

# transaction=True: the worker task's heartbeat thread writes on its own connection, which must see the rows
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def tmpfs():
    """mount(folder, size, read_only=False): a tmpfs on `folder`, unmounted after the test."""
    mounted: list[Path] = []

    def mount(folder: Path, size: str, read_only: bool = False) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.fixture
def digits_experiment(storage_root, new_experiment):
    """An experiment on an untrained digits_cnn .pt2 (~1.4 MB as ONNX) and the digits preset,
    queued; accuracy does not matter here."""
    from optimization.backends.pytorch import save_pt2
    from optimization.datasets import write_digits_preset
    from optimization.zoo.pytorch import build

    write_digits_preset(storage_root / "dataset" / "preset" / "digits")
    save_pt2(build("digits_cnn", 10, 1), (1, 8, 8), storage_root / "models" / "pretrained" / "pytorch" / "digits_cnn.pt2")
    experiment = new_experiment(pretrained_model="digits_cnn", techniques=["prune_unstructured"],
                                config={"techniques": {"prune_unstructured": {"epochs": 0}}})
    experiment.enqueue()
    return experiment


def results_folder(storage_root: Path, experiment) -> Path:
    return storage_root / "models" / "optimized" / str(experiment.pk)


def test_a_full_disk_while_writing_the_baseline_fails_the_experiment_with_a_message(
        digits_experiment, storage_root, tmpfs):
    folder = tmpfs(results_folder(storage_root, digits_experiment), "256k")

    assert tasks.run_experiment(digits_experiment.pk) == "failed"

    error = Experiment.objects.get(pk=digits_experiment.pk).error
    assert error.startswith("storage is full: could not write baseline.onnx; free some space"), error
    assert list(folder.iterdir()) == [], "no partial baseline.onnx, no temporary file"


def test_a_full_disk_while_a_technique_writes_fails_that_technique_and_keeps_the_baseline(
        digits_experiment, storage_root, tmpfs):
    folder = tmpfs(results_folder(storage_root, digits_experiment), "2m")  # the baseline fits, no more

    assert tasks.run_experiment(digits_experiment.pk) == "completed"

    run = OptimizationRun.objects.get(experiment=digits_experiment, technique="prune_unstructured")
    assert run.status == "failed"
    assert run.error.startswith("storage is full: could not write prune_unstructured"), run.error
    assert [p.name for p in folder.iterdir()] == ["baseline.onnx"]
    assert ModelFile.objects.get(experiment=digits_experiment, role="baseline").absolute_path() == folder / "baseline.onnx"


def test_delete_on_read_only_storage_answers_503_and_keeps_files_and_rows(
        client, finished_experiment, storage_root, tmpfs):
    folder = results_folder(storage_root, finished_experiment)
    files = {path.name: path.read_bytes() for path in folder.iterdir()}
    tmpfs(folder, "1m")
    for name, content in files.items():
        (folder / name).write_bytes(content)
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    rows = ModelFile.objects.filter(experiment=finished_experiment).count()

    response = client.delete(f"/api/experiments/{finished_experiment.pk}")

    assert response.status_code == 503, response.content
    assert "Read-only file system" in response.json()["error"] and str(storage_root) not in response.json()["error"]
    assert Experiment.objects.filter(pk=finished_experiment.pk).exists()
    assert ModelFile.objects.filter(experiment=finished_experiment).count() == rows
    assert {path.name for path in folder.iterdir()} == set(files)
