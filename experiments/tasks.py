"""django-q2 entry points. The web process imports this module to enqueue, so the engine
(and with it torch / tensorflow) is imported inside the task, in the worker only."""
from __future__ import annotations

import logging

from django.conf import settings

from . import attempts, cluster, storage
from .models import STATUS_MESSAGES, Experiment, ExperimentProgress, _enqueue_run
from .sink import DjangoSink, notify, retry_after_reconnect

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
    """Run one queued experiment to its end and return what became of it.

    The task first claims the experiment (experiments.attempts): a second delivery of the same
    task, or a task for a run that another worker owns, does nothing. Attempts are counted by
    the claim, since django-q2 does not count a worker that died; a model that kills the worker
    each time fails after EDGEOPT_MAX_ATTEMPTS. A later attempt resumes: finished techniques
    are kept. A stopping qcluster hands the run back to the queue without using an attempt."""
    try:
        return _claim_and_run(experiment_id)
    except attempts.DatabaseUnavailable:
        logger.exception("experiment %s: the database went away; the reconciler re-queues the run", experiment_id)
        return "database unavailable"


def _claim_and_run(experiment_id: int) -> str:
    if cluster.stopping():
        # Fetched by this cluster just before it was asked to stop: leave it to the next worker.
        _enqueue_run(experiment_id)
        return "handed back"
    token = retry_after_reconnect(attempts.claim)(experiment_id)
    experiment = Experiment.objects.filter(pk=experiment_id).first()
    if experiment is None:
        logger.warning("experiment %s no longer exists; nothing to run", experiment_id)
        return "missing"
    if token is None:
        logger.info("experiment %s is %s and not this task's to run", experiment_id, experiment.status)
        return experiment.status
    logger.info("claimed experiment %s (attempt %s)", experiment_id, experiment.attempts)
    ExperimentProgress.publish(experiment, status=Experiment.Status.RUNNING, message=STATUS_MESSAGES["running"])
    if experiment.attempts > settings.EDGEOPT_MAX_ATTEMPTS:
        attempts.finish(experiment, token, Experiment.Status.FAILED, attempts.gave_up_message(experiment.attempts - 1))
        notify(experiment_id)
        return experiment.status

    heartbeat = attempts.HeartbeatThread(experiment_id, token)
    heartbeat.start()
    try:
        status, error = _run_engine(experiment, DjangoSink(experiment, token, heartbeat))
    except attempts.WorkerShuttingDown:
        retry_after_reconnect(attempts.hand_back)(
            experiment, token, "interrupted: the worker is shutting down; queued again, finished techniques are kept")
        return "interrupted"
    except attempts.LostOwnership:
        logger.warning("experiment %s was given to another attempt; this one ends here", experiment_id)
        return "lost"
    finally:
        heartbeat.stop()
    try:
        retry_after_reconnect(attempts.finish)(experiment, token, status, error)
    except attempts.LostOwnership:
        logger.warning("experiment %s was given to another attempt before this one finished", experiment_id)
        return "lost"
    notify(experiment_id)
    return status


def _run_engine(experiment: Experiment, sink: DjangoSink) -> tuple[str, str]:
    """(final status, error) of the engine's run."""
    try:
        from optimization.worker import prepare_worker_process

        prepare_worker_process()  # before the engine loads torch / TensorFlow
        from optimization.orchestrator import run_experiment as run_with_engine

        status = run_with_engine(build_spec(experiment), sink)
        if status not in Experiment.FINISHED:
            raise ValueError(f"the engine ended with an unknown status {status!r}")
        if status == Experiment.Status.FAILED:
            return status, "the run failed; each technique's error is in its row"
        return status, ""
    except Exception as exc:
        logger.exception("experiment %s failed", experiment.pk)
        return Experiment.Status.FAILED, storage.public_error(f"{type(exc).__name__}: {exc}")
