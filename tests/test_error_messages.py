"""Errors stored on experiments and runs are for users: they never show an absolute server
path (storage files by their storage name, packages from the package on, anything else by
its file name) and drop the class name before a message written for users."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from experiments import storage, tasks
from experiments.models import Experiment, OptimizationRun
from experiments.sink import DjangoSink
from optimization.datasets import write_digits_preset

pytestmark = pytest.mark.django_db

PACKAGES = Path(next(p for p in sys.path if p.endswith("site-packages")))


def test_a_real_run_that_fails_on_a_missing_model_names_it_by_its_storage_name(
        ready_experiment, pretrained_model, storage_root):
    write_digits_preset(storage_root / "dataset" / "preset" / "digits")
    ready_experiment.enqueue()
    pretrained_model.unlink()  # e.g. removed by hand from the server

    assert tasks.run_experiment(ready_experiment.pk) == "failed"

    error = Experiment.objects.get(pk=ready_experiment.pk).error
    assert "models/pretrained/pytorch/digits_cnn.pt" in error, error
    assert str(storage_root) not in error and "/tmp/" not in error


def test_a_technique_error_is_stored_without_server_paths_or_a_class_name(ready_experiment, storage_root):
    from experiments.attempts import claim

    ready_experiment.enqueue()
    sink = DjangoSink(ready_experiment, claim(ready_experiment.pk))
    output = storage_root / "models" / "optimized" / str(ready_experiment.pk)

    sink.run_finished("ptq_int8", {"status": "failed", "error": (
        f"ValueError: cannot read {output}/ptq_int8.fp32.onnx in {PACKAGES}/onnx/__init__.py, "
        "extracted to '/tmp/edgeopt-imagefolder-x1y2/cats/0001.png'")})

    error = OptimizationRun.objects.get(experiment=ready_experiment, technique="ptq_int8").error
    assert error == (f"cannot read models/optimized/{ready_experiment.pk}/ptq_int8.fp32.onnx in "
                     "onnx/__init__.py, extracted to '0001.png'")


@pytest.mark.parametrize("message, public", [
    ("InvalidInputError: give input_shape", "give input_shape"),
    ("RuntimeError: shape mismatch", "RuntimeError: shape mismatch"),  # the class says what broke
    ("KeyError: 'classifier.weight'", "KeyError: 'classifier.weight'"),
    ("a ratio of 1/2, input / 255, see https://onnx.ai/onnx/operators", None),
])
def test_only_paths_and_user_facing_class_names_are_taken_out(message, public):
    assert storage.public_error(message) == (public or message)


def test_an_analysis_error_is_stored_without_the_results_folder(ready_experiment, storage_root):
    from experiments.attempts import claim

    ready_experiment.enqueue()
    sink = DjangoSink(ready_experiment, claim(ready_experiment.pk))

    sink.analysis({"error": f"analysis failed: cannot parse {sink.output_dir}/baseline.onnx"})

    stored = Experiment.objects.get(pk=ready_experiment.pk).analysis["error"]
    assert stored == f"analysis failed: cannot parse models/optimized/{ready_experiment.pk}/baseline.onnx"
