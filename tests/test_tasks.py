"""The worker task and the DjangoSink, with a fake orchestrator standing in for the engine
(the lead's end-to-end test runs the real one)."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from experiments import attempts, tasks
from experiments.models import Experiment, ExperimentProgress, ModelFile, OptimizationRun, Recommendation
from experiments.reconciler import reconcile
from experiments.sink import DjangoSink

pytestmark = pytest.mark.django_db


def fake_engine(outcome="completed", techniques_done=("ptq_int8",), fail_with=None, seen=None,
                worker_dies=False):
    """An orchestrator that writes what the real one writes, through the sink."""

    def run_experiment(spec, sink):
        if seen is not None:
            seen.update(spec=spec, completed=sink.completed_runs())
        if fail_with:
            raise fail_with
        spec.output_dir.mkdir(parents=True, exist_ok=True)
        sink.analysis({"params": 650, "macs": 640, "input_shape": [1, 8, 8], "layers": [], "bottlenecks": []})
        sink.progress({"status": "running", "technique": "baseline", "overall_progress": 0.1, "message": "baseline"})
        baseline_file = spec.output_dir / "baseline.onnx"
        baseline_file.write_bytes(b"\x08baseline")
        sink.baseline({"accuracy": 0.9, "size_bytes": 100, "latency_ms": 1.0, "params": 650, "macs": 640,
                       "estimates": {}, "artifacts": {"deploy": baseline_file, "native": spec.model_path}})
        for name in techniques_done:
            sink.run_started(name)
            sink.progress({"status": "running", "technique": name, "technique_progress": 0.5, "message": name})
            deploy = spec.output_dir / f"{name}.onnx"
            deploy.write_bytes(b"\x08" + name.encode())
            sink.run_finished(name, {"status": "completed", "accuracy": 0.89, "accuracy_drop": 1.0,
                                     "size_bytes": 30, "compression_ratio": 3.3, "latency_ms": float("nan"),
                                     "constraints_met": {}, "details": {}, "error": None,
                                     "artifacts": {"deploy": deploy, "native": None}})
        if worker_dies:  # like a killed worker process: nothing after this line runs
            raise SystemExit("worker killed")
        if outcome == "completed":
            sink.recommendation({"technique": techniques_done[0], "reasoning": "smallest", "satisfied": True,
                                 "ranking": []})
        return outcome

    return run_experiment


@pytest.fixture
def queued_experiment(ready_experiment):
    ready_experiment.enqueue()
    return ready_experiment


def use_engine(monkeypatch, engine):
    monkeypatch.setattr("optimization.orchestrator.run_experiment", engine)


def claimed_sink(experiment) -> DjangoSink:
    """The sink of a worker that has just claimed the experiment."""
    return DjangoSink(experiment, attempts.claim(experiment.pk))


def silence_the_worker(experiment, settings, seconds_past_stale: int = 1) -> None:
    """As if the worker had died: its last heartbeat is older than EDGEOPT_STALE_AFTER_S."""
    long_ago = timezone.now() - timedelta(seconds=settings.EDGEOPT_STALE_AFTER_S + seconds_past_stale)
    Experiment.objects.filter(pk=experiment.pk).update(heartbeat_at=long_ago)


def test_task_runs_the_engine_and_records_everything(monkeypatch, queued_experiment, storage_root):
    seen = {}
    use_engine(monkeypatch, fake_engine(seen=seen))

    status = tasks.run_experiment(queued_experiment.pk)

    experiment = Experiment.objects.get(pk=queued_experiment.pk)
    assert status == experiment.status == "completed"
    assert experiment.attempts == 1 and experiment.started_at and experiment.finished_at
    assert experiment.analysis["params"] == 650
    assert experiment.baseline["accuracy"] == 0.9
    run = OptimizationRun.objects.get(experiment=experiment, technique="ptq_int8")
    assert run.status == "completed" and run.compression_ratio == 3.3
    assert run.latency_ms is None, "NaN is stored as null, not as invalid JSON"
    assert Recommendation.objects.get(experiment=experiment).technique == "ptq_int8"
    deploy = ModelFile.objects.get(experiment=experiment, role="optimized", technique="ptq_int8")
    assert deploy.path == f"models/optimized/{experiment.pk}/ptq_int8.onnx"
    assert not ModelFile.objects.filter(experiment=experiment, role="baseline", kind="native").exists(), \
        "the source model is not recorded as a result file"
    assert ExperimentProgress.objects.get(experiment=experiment).to_message()["type"] == "status"
    spec = seen["spec"]
    assert spec.model_path.is_absolute() and spec.model_path.exists()
    assert spec.dataset_path == storage_root / "dataset" / "preset" / "digits"
    assert spec.output_dir == storage_root / "models" / "optimized" / str(experiment.pk)


def test_engine_exception_marks_the_experiment_failed_with_the_message(monkeypatch, queued_experiment):
    use_engine(monkeypatch, fake_engine(fail_with=ValueError("model expects 3 channels")))

    status = tasks.run_experiment(queued_experiment.pk)

    experiment = Experiment.objects.get(pk=queued_experiment.pk)
    assert status == experiment.status == "failed"
    assert "model expects 3 channels" in experiment.error
    message = experiment.progress.to_message()
    assert (message["type"], message["status"]) == ("status", "failed")
    assert "model expects 3 channels" in message["message"]


def test_engine_stopped_marks_the_experiment_stopped_and_keeps_finished_runs(monkeypatch, queued_experiment):
    use_engine(monkeypatch, fake_engine(outcome="stopped"))

    tasks.run_experiment(queued_experiment.pk)

    experiment = Experiment.objects.get(pk=queued_experiment.pk)
    assert experiment.status == "stopped"
    assert experiment.runs.filter(status="completed").count() == 1


def test_a_retried_attempt_resumes_after_the_runs_already_finished(monkeypatch, queued_experiment, settings):
    use_engine(monkeypatch, fake_engine(worker_dies=True))
    with pytest.raises(SystemExit):
        tasks.run_experiment(queued_experiment.pk)
    assert Experiment.objects.get(pk=queued_experiment.pk).status == "running"
    silence_the_worker(queued_experiment, settings)
    assert reconcile()["requeued"] == [queued_experiment.pk]
    assert Experiment.objects.get(pk=queued_experiment.pk).status == "queued"
    seen = {}
    use_engine(monkeypatch, fake_engine(techniques_done=("qat",), seen=seen))

    status = tasks.run_experiment(queued_experiment.pk)

    assert status == "completed"
    assert set(seen["completed"]) == {"ptq_int8"}
    assert seen["completed"]["ptq_int8"]["artifacts"]["deploy"].name == "ptq_int8.onnx"
    assert Experiment.objects.get(pk=queued_experiment.pk).attempts == 2


def test_too_many_attempts_fail_the_experiment_without_running(monkeypatch, queued_experiment, settings):
    settings.EDGEOPT_MAX_ATTEMPTS = 2
    Experiment.objects.filter(pk=queued_experiment.pk).update(attempts=2)
    use_engine(monkeypatch, fake_engine(fail_with=AssertionError("must not run")))

    status = tasks.run_experiment(queued_experiment.pk)

    experiment = Experiment.objects.get(pk=queued_experiment.pk)
    assert status == experiment.status == "failed"
    assert "gave up after 2 attempts" in experiment.error


def test_a_task_for_an_experiment_stopped_while_queued_does_nothing(monkeypatch, queued_experiment):
    queued_experiment.request_stop()
    use_engine(monkeypatch, fake_engine(fail_with=AssertionError("must not run")))

    assert tasks.run_experiment(queued_experiment.pk) == "stopped"


def test_a_task_for_a_deleted_experiment_does_nothing():
    assert tasks.run_experiment(123456) == "missing"


def test_sink_throttles_progress_but_never_drops_a_technique_change(queued_experiment):
    sink = claimed_sink(queued_experiment)
    start = ExperimentProgress.objects.get(experiment=queued_experiment).seq

    for step in range(1, 50):
        sink.progress({"status": "running", "technique": "ptq_int8", "technique_progress": step / 50})
    sink.progress({"status": "running", "technique": "qat", "technique_progress": 0.3})

    row = ExperimentProgress.objects.get(experiment=queued_experiment)
    assert row.technique == "qat"
    assert 2 <= row.seq - start < 49


def test_sink_writes_a_throttled_state_with_the_next_run_update(queued_experiment):
    sink = claimed_sink(queued_experiment)
    sink.progress({"status": "running", "technique": "qat", "technique_progress": 0.1, "message": "epoch 1"})
    sink.progress({"status": "running", "technique": "qat", "technique_progress": 0.9, "message": "epoch 9"})

    sink.run_started("hybrid")

    row = ExperimentProgress.objects.get(experiment=queued_experiment)
    assert (row.message, row.technique_progress) == ("epoch 9", 0.9)


def test_sink_sees_a_stop_request(queued_experiment):
    sink = claimed_sink(queued_experiment)
    assert not sink.should_stop()

    queued_experiment.request_stop()
    sink._last_stop_check = 0.0  # as if the re-read interval had passed

    assert sink.should_stop()


def test_seed_demo_command_seeds_the_chosen_framework_into_storage(monkeypatch, storage_root):
    from django.core.management import call_command

    calls = []
    monkeypatch.setattr("optimization.demo.seed_demo",
                        lambda root, frameworks, log: calls.append((root, frameworks)) or [])

    call_command("seed_demo", "--framework", "tensorflow")

    assert calls == [(storage_root, ("tensorflow",))]


def test_a_stale_copy_cannot_undo_what_the_worker_did(queued_experiment):
    web_copy = Experiment.objects.get(pk=queued_experiment.pk)  # loaded while queued
    Experiment.objects.get(pk=queued_experiment.pk).mark_running()  # the worker's copy

    assert web_copy.request_stop() == "stopping"
    experiment = Experiment.objects.get(pk=queued_experiment.pk)
    assert (experiment.status, experiment.stop_requested) == ("running", True)
