"""Finds experiments that no worker is running any more and gives them to the next one.

Runs when a qcluster worker starts (experiments.cluster) and from a django-q2 schedule every
minute, the finest django-q2 schedules go (created by migration 0004_heartbeat, and again at
start-up if it was deleted). Any number of qclusters may run it at once:
each move is one conditional UPDATE (experiments.attempts), so two reconcilers never move
the same experiment twice.

- running, heartbeat older than EDGEOPT_STALE_AFTER_S: the worker died (kill -9, out of
  memory, its machine went down). Queued again, resuming after the finished techniques;
  failed with the reason once EDGEOPT_MAX_ATTEMPTS attempts were used; stopped if the user
  had asked it to stop.
- queued for longer than that with no task waiting in the broker: the task was taken by a
  cluster that died (the Redis broker loses it; the ORM broker would hand it out again only
  after `retry`, over an hour). A new task is queued; a duplicate is harmless (the claim).
"""
from __future__ import annotations

import logging

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from . import attempts
from .models import Experiment, run_task_name

logger = logging.getLogger(__name__)


def reconcile() -> dict[str, list[int]]:
    """Move what needs moving; returns the ids moved, by what happened to them."""
    now = timezone.now()
    silent = Q(heartbeat_at__lt=attempts.stale_before(now)) | Q(heartbeat_at__isnull=True)
    moved: dict[str, list[int]] = {"requeued": [], "failed": [], "stopped": [], "enqueued_again": []}
    abandoned = Experiment.objects.filter(silent, status=Experiment.Status.RUNNING).values_list(
        "pk", "worker_token", "attempts", "stop_requested")
    for experiment_id, token, used, stop_requested in abandoned:
        if stop_requested:
            if attempts.end_abandoned(experiment_id, token, Experiment.Status.STOPPED, now=now):
                moved["stopped"].append(experiment_id)
        elif used >= settings.EDGEOPT_MAX_ATTEMPTS:
            if attempts.end_abandoned(experiment_id, token, Experiment.Status.FAILED,
                                      attempts.gave_up_message(used), now):
                moved["failed"].append(experiment_id)
        elif attempts.requeue_abandoned(experiment_id, token, now):
            moved["requeued"].append(experiment_id)
    waiting = list(Experiment.objects.filter(silent, status=Experiment.Status.QUEUED).values_list("pk", flat=True))
    if waiting:
        in_broker = waiting_task_names()
        for experiment_id in waiting:
            if run_task_name(experiment_id) not in in_broker and attempts.enqueue_again(experiment_id):
                moved["enqueued_again"].append(experiment_id)
    if any(moved.values()):
        logger.warning("reconciler: %s", moved)
    return moved


def ensure_schedule() -> None:
    """The reconcile schedule, if it is missing (the migration creates it)."""
    from django_q.models import Schedule

    if not Schedule.objects.filter(name=attempts.RECONCILE_SCHEDULE).exists():
        Schedule.objects.create(name=attempts.RECONCILE_SCHEDULE, func="experiments.reconciler.reconcile",
                                schedule_type=Schedule.MINUTES, minutes=1, repeats=-1, next_run=timezone.now())


def waiting_task_names() -> set[str]:
    """Names of the tasks waiting in the broker for any worker to take them (not those a
    cluster already took: if it died, they are exactly the lost ones)."""
    from django_q.brokers import get_broker
    from django_q.models import OrmQ
    from django_q.signing import SignedPackage

    broker = get_broker()
    if settings.EDGEOPT_BROKER == "redis":
        payloads = broker.connection.lrange(broker.list_key, 0, -1)
    else:
        payloads = OrmQ.objects.filter(key=broker.list_key, lock__lte=timezone.now()).values_list("payload", flat=True)
    names = set()
    for payload in payloads:
        try:
            names.add(SignedPackage.loads(payload).get("name"))
        except Exception:  # another app's or a corrupt package: not ours to judge
            continue
    return names
