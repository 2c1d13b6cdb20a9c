"""Who runs an experiment: one attempt at a time, and proof of life while it runs.

A worker task *claims* an experiment with one conditional UPDATE that gives it a fresh
`worker_token`. Every later write of that attempt (heartbeats, results, the final status)
names the token, so an attempt that lost the experiment — re-queued by the reconciler while
it hung, or a second delivery of the same task — stops at its next write instead of running
beside the new owner. django-q2's ORM broker hands a killed worker's task out again after
`retry` seconds and its Redis broker loses it; either way the claim decides, never the broker.

Transitions beyond the model's (see Experiment's docstring)::

    queued (no owner) | running (heartbeat stale)  --claim()-->  running, new token, attempts + 1
    running (owner)   --hand_back()-->  queued, attempt given back     (the worker is shutting down;
                                        stopped if the user asked it to stop)
    running (stale)   --requeue_abandoned()-->  queued                 (the attempt counts)
    running (stale)   --end_abandoned()-->      failed                 (no attempts left)
                                                 stopped                (the user asked to stop it)
"""
from __future__ import annotations

import logging
import threading
import uuid
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from .models import STATUS_MESSAGES, Experiment, ExperimentProgress, _enqueue_run

logger = logging.getLogger(__name__)
# django-q2's scheduler advances the reconcile schedule at least once a minute while any
# qcluster runs; silence for longer than this means none is running.
CLUSTER_SILENT_AFTER_S = 150
RECONCILE_SCHEDULE = "edgeopt: re-queue abandoned experiments"


class LostOwnership(BaseException):
    """Another attempt owns the experiment now. A BaseException so that no `except Exception`
    in the engine mistakes it for a failed technique: the attempt must just end, writing nothing."""


class DatabaseUnavailable(BaseException):
    """A write failed again after reconnecting. Not the technique's fault, so not an Exception
    the engine would record as its failure: the attempt ends, its heartbeat goes stale, and the
    reconciler re-queues the run once the database is back."""


class WorkerShuttingDown(BaseException):
    """The qcluster was asked to stop: end the run at this progress call and hand it back."""


def stale_before(now=None):
    return (now or timezone.now()) - timedelta(seconds=settings.EDGEOPT_STALE_AFTER_S)


def heartbeat_interval() -> float:
    """How often a running attempt proves it lives: several beats per stale period."""
    return max(0.5, settings.EDGEOPT_STALE_AFTER_S / 6)


def gave_up_message(attempts: int) -> str:
    return (f"gave up after {attempts} attempts: the worker stopped during each one (killed, out of "
            "memory, past the task timeout or its machine went down); try fewer techniques or a smaller budget")


def claim(experiment_id: int) -> str | None:
    """Make the calling attempt the experiment's owner; its token, or None when the experiment
    is not waiting for a worker (finished, stopped, or running with a live owner)."""
    token, now = uuid.uuid4().hex, timezone.now()
    abandoned = Q(heartbeat_at__lt=stale_before(now)) | Q(heartbeat_at__isnull=True)
    claimable = Q(status=Experiment.Status.QUEUED, worker_token="") | Q(Q(status=Experiment.Status.RUNNING) & abandoned)
    claimed = Experiment.objects.filter(claimable, pk=experiment_id).update(
        status=Experiment.Status.RUNNING, worker_token=token, heartbeat_at=now,
        attempts=F("attempts") + 1, started_at=Coalesce("started_at", now),
    )
    return token if claimed else None


def beat(experiment_id: int, token: str) -> None:
    """Refresh the heartbeat; LostOwnership when another attempt owns the run now."""
    if not Experiment.objects.filter(pk=experiment_id, status=Experiment.Status.RUNNING,
                                     worker_token=token).update(heartbeat_at=timezone.now()):
        raise LostOwnership(f"experiment {experiment_id} is no longer this attempt's")


@transaction.atomic
def finish(experiment: Experiment, token: str, status: str, error: str = "") -> None:
    """The model's finish, only while `token` still owns the run (the row is locked first,
    so the reconciler cannot re-queue it in between)."""
    owned = Experiment.objects.select_for_update().filter(
        pk=experiment.pk, status=Experiment.Status.RUNNING, worker_token=token)
    if not owned.exists():
        raise LostOwnership(f"experiment {experiment.pk} is no longer this attempt's")
    experiment.refresh_from_db()
    experiment.finish(status, error=error)


def hand_back(experiment: Experiment, token: str, message: str) -> bool:
    """Queue the run again for the next worker and give this attempt back: it was interrupted,
    not failed. Finished techniques are kept (the next attempt resumes after them). A run the
    user had asked to stop ends stopped instead."""
    if _requeue(Q(worker_token=token, stop_requested=False), experiment.pk, message, attempts=F("attempts") - 1):
        return True
    return _end(Q(status=Experiment.Status.RUNNING, worker_token=token, stop_requested=True), experiment.pk,
                Experiment.Status.STOPPED)


def requeue_abandoned(experiment_id: int, token: str, now=None) -> bool:
    silence = settings.EDGEOPT_STALE_AFTER_S
    return _requeue(_still_abandoned(token, now), experiment_id,
                    f"the worker stopped responding (no sign of life for over {silence} s); "
                    "queued again, finished techniques are kept")


def end_abandoned(experiment_id: int, token: str, status: str, error: str = "", now=None) -> bool:
    """Finish a silent run for good: failed (no attempts left) or stopped (as the user asked)."""
    return _end(_still_abandoned(token, now), experiment_id, status, error)


def _end(condition: Q, experiment_id: int, status: str, error: str = "") -> bool:
    with transaction.atomic():
        moved = Experiment.objects.filter(condition, pk=experiment_id).update(
            status=status, error=error, finished_at=timezone.now(), worker_token="")
        if moved:
            _publish(experiment_id, status=status, message=error or STATUS_MESSAGES[status])
    return bool(moved)


def enqueue_again(experiment_id: int) -> bool:
    """A queued experiment whose task vanished (taken by a cluster that died): a new task."""
    with transaction.atomic():
        moved = Experiment.objects.filter(pk=experiment_id, status=Experiment.Status.QUEUED, worker_token="").update(
            heartbeat_at=timezone.now())
        if moved:
            transaction.on_commit(lambda: _enqueue_run(experiment_id))
    return bool(moved)


def _still_abandoned(token: str, now=None) -> Q:
    """The run is still the silent attempt's: one conditional UPDATE decides, so a heartbeat
    that lands first keeps the run where it is."""
    return Q(status=Experiment.Status.RUNNING, worker_token=token) & (
        Q(heartbeat_at__lt=stale_before(now)) | Q(heartbeat_at__isnull=True))


def _requeue(condition: Q, experiment_id: int, message: str, **fields) -> bool:
    with transaction.atomic():
        moved = Experiment.objects.filter(condition, pk=experiment_id, status=Experiment.Status.RUNNING).update(
            status=Experiment.Status.QUEUED, worker_token="", heartbeat_at=timezone.now(), **fields)
        if moved:
            _publish(experiment_id, status=Experiment.Status.QUEUED, message=message, eta_seconds=None)
            transaction.on_commit(lambda: _enqueue_run(experiment_id))
    return bool(moved)


def _publish(experiment_id: int, **fields) -> None:
    from .sink import notify

    ExperimentProgress.publish(Experiment.objects.get(pk=experiment_id), **fields)
    transaction.on_commit(lambda: notify(experiment_id))


# -- what the pages show -------------------------------------------------------------------


def worker_silence_s(status: str, heartbeat_at, started_at, now=None) -> int | None:
    """Seconds without a sign of life from the worker when the run looks abandoned (a running
    experiment's heartbeat is stale, or a queued one waits while no qcluster runs at all);
    None while all is well or the experiment is not active."""
    now = now or timezone.now()
    if status == Experiment.Status.RUNNING:
        if heartbeat_at is None or heartbeat_at < stale_before(now):
            return _seconds_since(heartbeat_at or started_at, now)
        return None
    if status == Experiment.Status.QUEUED:
        last_seen = last_cluster_sign_of_life()
        if last_seen is None or last_seen < now - timedelta(seconds=CLUSTER_SILENT_AFTER_S):
            return _seconds_since(last_seen or heartbeat_at, now)
    return None


def last_cluster_sign_of_life():
    """When a qcluster last ran the scheduler: it moves the reconcile schedule's next run on."""
    from django_q.models import Schedule

    next_run = Schedule.objects.filter(name=RECONCILE_SCHEDULE).values_list("next_run", flat=True).first()
    return next_run - timedelta(minutes=1) if next_run else None


def _seconds_since(moment, now) -> int:
    return int((now - moment).total_seconds()) if moment else 0


# -- the heartbeat while a long step runs ---------------------------------------------------


class HeartbeatThread(threading.Thread):
    """Beats every `heartbeat_interval()` seconds on its own database connection, so a step
    that calls no progress for minutes (a conversion, an export) still shows the run alive.
    `lost` is set when another attempt took the run; the sink raises at its next call."""

    def __init__(self, experiment_id: int, token: str):
        super().__init__(name=f"heartbeat-{experiment_id}", daemon=True)
        self.experiment_id, self.token = experiment_id, token
        self.lost = threading.Event()
        self._done = threading.Event()

    def run(self) -> None:
        try:
            while not self._done.wait(heartbeat_interval()):
                try:
                    beat(self.experiment_id, self.token)
                except LostOwnership:
                    self.lost.set()
                    return
                except DatabaseError:  # the database restarts: reconnect at the next beat
                    logger.warning("heartbeat of experiment %s not written", self.experiment_id, exc_info=True)
                    connection.close()
        finally:
            connection.close()

    def stop(self) -> None:
        self._done.set()
        self.join()
