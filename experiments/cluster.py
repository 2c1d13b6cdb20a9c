"""Hooks into the `manage.py qcluster` processes: a graceful stop and the start-up reconcile.

How django-q2 stops: SIGTERM (or SIGINT) reaches the cluster's main process, whose handler
asks its sentinel process to stop; the sentinel stops fetching tasks, then waits for every
worker process to finish its task. The workers never hear of it (the sentinel and the workers
keep SIGTERM's default action, so signalling them kills them outright). A running experiment
would hold the stop for up to the task timeout, an hour.

So the main process also sets `_stopping`, a byte of shared memory it created before forking
the sentinel and, through it, the workers (no lock: a worker killed while reading it must not
leave the main process waiting for a lock forever). A running experiment's progress callback sees it
(DjangoSink.should_stop), raises WorkerShuttingDown at that call, and the task hands the
experiment back to the queue (attempts.hand_back); the worker then takes the sentinel's stop
and the cluster exits within seconds. Under systemd use KillMode=mixed, so that only the main
process gets the SIGTERM (a worker that gets it directly dies, and the reconciler re-queues
its experiment after EDGEOPT_STALE_AFTER_S instead).
"""
from __future__ import annotations

import logging
import multiprocessing
import sys

logger = logging.getLogger(__name__)
_stopping = None  # shared byte, created in the qcluster main process only


def is_qcluster_command(argv: list[str]) -> bool:
    return argv[1:2] == ["qcluster"]


def prepare_qcluster() -> None:
    """In the qcluster main process, before django-q2 builds its Cluster: share the stopping
    flag, chain it into django-q2's signal handler, reconcile when each worker starts."""
    global _stopping
    from django_q.cluster import Cluster
    from django_q.signals import post_spawn

    _stopping = multiprocessing.get_context("fork").RawValue("b", 0)
    stop_cluster = Cluster.sig_handler

    def sig_handler(cluster, signum, frame):
        _stopping.value = 1
        stop_cluster(cluster, signum, frame)

    Cluster.sig_handler = sig_handler
    post_spawn.connect(reconcile_on_worker_start, dispatch_uid="edgeopt-reconcile-on-start")


def stopping() -> bool:
    """True in a worker whose qcluster was asked to stop."""
    return _stopping is not None and bool(_stopping.value)


def reconcile_on_worker_start(sender, proc_name, **kwargs) -> None:
    """A qcluster (re)started: pick up what a dead worker left, without waiting for the schedule."""
    from .reconciler import ensure_schedule, reconcile

    try:
        ensure_schedule()
        reconcile()
    except Exception:  # never keep a worker from starting; the schedule tries again
        logger.exception("reconcile at worker start failed")


def prepare_if_qcluster() -> None:
    if is_qcluster_command(sys.argv):
        prepare_qcluster()
