"""django-q2 entry points. The web process imports this module to enqueue, so the engine
(and with it torch / tensorflow) is imported inside the task, in the worker only."""
from __future__ import annotations

import logging

from django.conf import settings
from django.db.models import F

from . import storage
from .models import Experiment
from .sink import DjangoSink, notify

logger = logging.getLogger(__name__)


def build_spec(experiment: Experiment):
    from optimization.orchestrator import ExperimentSpec

    model = experiment.source_model()
    if model is None:
        raise ValueError("the experiment has no model")
    if experiment.dataset == "custom":
        dataset_file = experiment.dataset_file()
        if dataset_file is None:
            raise ValueError("the dataset is 'custom' but none was uploaded")
        dataset_path = dataset_file.absolute_path()
    else:
        dataset_path = storage.preset_dir(experiment.dataset)
    return ExperimentSpec(
        experiment_id=experiment.pk,
        framework=experiment.framework,
        model_path=model.absolute_path(),
        dataset_path=dataset_path,
        dataset_name=experiment.dataset,
        target_device=experiment.target_device,
        goal=experiment.goal,
        constraints=experiment.constraints,
        techniques=list(experiment.techniques),
        output_dir=storage.optimized_dir(experiment.pk),
        config={"seed": 0, **experiment.config},
        plan=experiment.plan,
        time_budget_s=experiment.time_budget_s,
    )


def run_experiment(experiment_id: int) -> str:
    """Run one queued experiment to its end and return the final status.

    Counts its own attempts: when a worker dies (out of memory, killed) django-q2 hands the
    task out again after `retry` seconds without counting, so a model that kills the worker
    would otherwise loop forever. A retried attempt resumes: finished techniques are kept."""
    if not Experiment.objects.filter(pk=experiment_id).update(attempts=F("attempts") + 1):
        logger.warning("experiment %s no longer exists; nothing to run", experiment_id)
        return "missing"
    experiment = Experiment.objects.get(pk=experiment_id)
    if not experiment.is_active:
        logger.info("experiment %s is %s; not running it", experiment_id, experiment.status)
        return experiment.status
    if experiment.attempts > settings.EDGEOPT_MAX_ATTEMPTS:
        experiment.finish(Experiment.Status.FAILED, error=(
            f"gave up after {experiment.attempts - 1} attempts: the worker stopped during each one "
            "(out of memory or past the task timeout?); try fewer techniques or a smaller budget"))
        notify(experiment_id)
        return experiment.status

    experiment.mark_running()
    error = ""
    try:
        from optimization.worker import prepare_worker_process

        prepare_worker_process()  # before the engine loads torch / TensorFlow
        from optimization.orchestrator import run_experiment as run_with_engine

        status = run_with_engine(build_spec(experiment), DjangoSink(experiment))
        if status not in Experiment.FINISHED:
            raise ValueError(f"the engine ended with an unknown status {status!r}")
        if status == Experiment.Status.FAILED:
            error = "the run failed; each technique's error is in its row"
    except Exception as exc:
        logger.exception("experiment %s failed", experiment_id)
        status, error = Experiment.Status.FAILED, storage.public_error(f"{type(exc).__name__}: {exc}")
    experiment.refresh_from_db()
    experiment.finish(status, error=error)
    notify(experiment_id)
    return status
