"""The engine's artifacts appear whole or not at all: a saver that fails (a full disk, any
error) leaves neither a partial file nor a temporary name, and the step fails with a message
that names the file, not the server's folder."""
from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from optimization.atomic import ArtifactWriteError, atomic_output


def write_half_then_fill_the_disk(content: bytes):
    """A saver that gets half its bytes out before the disk is full, as a real one would."""

    def save(path):
        with open(path, "wb") as handle:
            handle.write(content[: len(content) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    return save


def test_a_saved_artifact_appears_under_its_name_with_no_temporary_left(tmp_path):
    target = tmp_path / "out" / "ptq_int8.onnx"

    with atomic_output(target) as partial:
        assert partial.parent == target.parent and partial.suffix == ".onnx"
        partial.write_bytes(b"whole model")

    assert target.read_bytes() == b"whole model"
    assert [p.name for p in target.parent.iterdir()] == ["ptq_int8.onnx"]


def test_a_full_disk_fails_with_a_message_and_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out" / "baseline.onnx"

    with pytest.raises(ArtifactWriteError) as failed:
        with atomic_output(target) as partial:
            write_half_then_fill_the_disk(b"x" * 1000)(partial)

    assert "storage is full" in str(failed.value) and "baseline.onnx" in str(failed.value)
    assert str(tmp_path) not in str(failed.value)
    assert list(target.parent.iterdir()) == []


def test_a_failing_saver_keeps_the_previous_file_whole(tmp_path):
    target = tmp_path / "out" / "qat.keras"
    target.parent.mkdir()
    target.write_bytes(b"previous run")

    with pytest.raises(RuntimeError):
        with atomic_output(target) as partial:
            partial.write_bytes(b"half")
            raise RuntimeError("converter crashed")

    assert target.read_bytes() == b"previous run"
    assert [p.name for p in target.parent.iterdir()] == ["qat.keras"]


# --------------------------------------------------------------------------- in a real run

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from optimization import orchestrator  # noqa: E402
from optimization.backends import pytorch as backend  # noqa: E402
from optimization.datasets import write_digits_preset  # noqa: E402
from optimization.zoo.pytorch import build  # noqa: E402
from tests.engine.test_orchestrator import ListSink  # noqa: E402


@pytest.fixture
def digits_spec(tmp_path):
    """An untrained digits_cnn (accuracy does not matter here) and the digits preset."""
    model_path = backend.save_pt2(build("digits_cnn", 10, 1, width=4, hidden=16), (1, 8, 8),
                                  tmp_path / "model.pt2")
    preset = tmp_path / "digits"
    write_digits_preset(preset)

    def make(techniques):
        return orchestrator.ExperimentSpec(
            experiment_id=1, framework="pytorch", model_path=model_path, dataset_path=preset,
            dataset_name="digits", target_device="rpi4", goal="balanced", constraints={},
            techniques=techniques, output_dir=tmp_path / "optimized")

    return make


def fill_the_disk_when_saving(monkeypatch, file_name: str):
    """Writing `file_name` runs out of space half way, whether the saver is onnx.save or writes
    the serialized bytes itself (a cached export); any other file saves."""
    real_save, real_write_bytes = onnx.save, Path.write_bytes

    def is_target(path) -> bool:
        return bool(re.fullmatch(rf"\.{re.escape(Path(file_name).stem)}\.[0-9a-f]+\.partial\.onnx", Path(path).name))

    def save(model, path, *args, **kwargs):
        if is_target(path):
            write_half_then_fill_the_disk(model.SerializeToString())(path)
        return real_save(model, path, *args, **kwargs)

    def write_bytes(path, data):
        if is_target(path):
            write_half_then_fill_the_disk(data)(path)
        return real_write_bytes(path, data)

    monkeypatch.setattr(onnx, "save", save)
    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def test_a_full_disk_while_writing_the_baseline_fails_the_experiment_with_a_message(
        digits_spec, monkeypatch):
    fill_the_disk_when_saving(monkeypatch, "baseline.onnx")
    spec = digits_spec(["prune_unstructured"])

    with pytest.raises(ArtifactWriteError, match="storage is full: could not write baseline.onnx"):
        orchestrator.run_experiment(spec, ListSink())

    assert list(Path(spec.output_dir).iterdir()) == []


def test_a_full_disk_while_writing_a_technique_fails_that_technique_and_leaves_no_partial_file(
        digits_spec, monkeypatch):
    fill_the_disk_when_saving(monkeypatch, "prune_unstructured.onnx")
    spec = digits_spec(["prune_unstructured"])
    spec.config = {"techniques": {"prune_unstructured": {"epochs": 0}}}
    sink = ListSink()

    assert orchestrator.run_experiment(spec, sink) == "completed"

    run = sink.runs()["prune_unstructured"]
    assert run["status"] == "failed"
    assert "storage is full: could not write prune_unstructured.onnx" in run["error"]
    assert sorted(p.name for p in Path(spec.output_dir).iterdir()) == ["baseline.onnx"]
