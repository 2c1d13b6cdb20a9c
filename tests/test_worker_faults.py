"""Worker faults with real processes: `manage.py qcluster` killed with -9 or stopped with
SIGTERM mid-technique, and two qclusters sharing experiments through Redis on PostgreSQL.
The demo digits_cnn with ptq_int8 + a few epochs of qat keeps each test near a minute."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
from experiments.models import Experiment, OptimizationRun
from tests.live import running_stack

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]
STALE_AFTER_S = 4  # the worker's heartbeat beats every STALE_AFTER_S / 6 s
TECHNIQUES = ["ptq_int8", "qat"]


@pytest.fixture
def live(demo_storage, tmp_path, settings, auth_headers):
    """Start a stack with extra environment: live(EDGEOPT_BROKER="redis", ...)."""
    settings.EDGEOPT_STORAGE_ROOT = demo_storage
    settings.EDGEOPT_STALE_AFTER_S = STALE_AFTER_S  # this process judges worker silence the same way
    stacks = []

    def start(workers: int = 1, **env: str):
        context = running_stack(demo_storage, tmp_path / f"logs{len(stacks)}", auth_headers, workers=workers,
                                EDGEOPT_STALE_AFTER_S=str(STALE_AFTER_S), **env)
        stacks.append(context)
        return context.__enter__()

    yield start
    for context in reversed(stacks):
        context.__exit__(None, None, None)


def start_demo(stack, techniques=TECHNIQUES, qat_epochs: int = 3) -> int:
    body = {"name": "faults", "framework": "pytorch", "target_device": "rpi4", "dataset": "digits",
            "techniques": techniques, "pretrained_model": "digits_cnn",
            "config": {"techniques": {"qat": {"epochs": qat_epochs}}}}
    status, experiment, _ = stack.request("POST", "/api/experiments/create", body)
    assert status == 201, experiment
    status, started, _ = stack.request("POST", f"/api/experiments/{experiment['id']}/start")
    assert status == 202, started
    return experiment["id"]


def wait_for(condition, timeout: float, what: str, stack):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout}s: {what}\n{stack.logs()}")


def fine_tuning_under_way(experiment_id: int) -> bool:
    """qat is training (ptq_int8 finished before it), neither at its start nor its end."""
    experiment = Experiment.objects.select_related("progress").get(pk=experiment_id)
    progress = experiment.progress
    return (experiment.status == "running" and progress.technique == "qat"
            and 0.05 < progress.technique_progress < 0.8)


def finished_run(experiment_id: int, technique: str) -> OptimizationRun:
    run = OptimizationRun.objects.get(experiment_id=experiment_id, technique=technique)
    assert run.status == "completed" and run.finished_at, run
    return run


def test_after_kill_9_of_the_worker_a_new_qcluster_completes_the_run_keeping_finished_techniques(live):
    stack = live(EDGEOPT_MAX_ATTEMPTS="3")
    experiment_id = start_demo(stack)
    wait_for(lambda: fine_tuning_under_way(experiment_id), 240, "qat under way", stack)
    kept = finished_run(experiment_id, "ptq_int8")

    stack.processes.kill("worker")

    # No worker at all: the API says so (the page too: test_reconciler.py) instead of a frozen bar.
    progress = wait_for(lambda: stack.request("GET", f"/api/experiments/{experiment_id}")[1]["progress"]
                        if Experiment.objects.get(pk=experiment_id).progress.worker_silent_s() is not None else None,
                        60, "the worker reported silent", stack)
    assert progress["status"] == "running" and progress["worker_silent_s"] >= STALE_AFTER_S

    stack.processes.start_worker("worker-after-kill")
    # The new qcluster's start-up reconcile queues it again and takes it: running within 2 minutes.
    wait_for(lambda: Experiment.objects.filter(pk=experiment_id, status="running", attempts=2).exists(),
             120, "running again after the restart", stack)
    experiment = stack.wait_until_finished(experiment_id, timeout=900)

    assert experiment["status"] == "completed", stack.logs()
    assert experiment["attempts"] == 2
    assert OptimizationRun.objects.get(pk=kept.pk).finished_at == kept.finished_at, "ptq_int8 was run again"
    assert finished_run(experiment_id, "qat").finished_at > kept.finished_at


def test_sigterm_stops_qcluster_within_10_s_and_a_new_worker_completes_the_run(live):
    stack = live()
    experiment_id = start_demo(stack)
    wait_for(lambda: fine_tuning_under_way(experiment_id), 240, "qat under way", stack)
    kept = finished_run(experiment_id, "ptq_int8")
    qcluster = stack.processes.running["worker"]

    qcluster.send_signal(signal.SIGTERM)  # to the main process only, as `kill PID` or `docker stop` do
    qcluster.wait(timeout=10)

    with pytest.raises(ProcessLookupError):  # its sentinel and workers are gone too
        os.killpg(qcluster.pid, 0)
    experiment = Experiment.objects.select_related("progress").get(pk=experiment_id)
    assert experiment.status == "queued", stack.logs()
    assert experiment.attempts == 0, "an interrupted attempt is given back"
    assert "interrupted" in experiment.progress.message
    assert not experiment.error

    stack.processes.start_worker("worker-after-sigterm")
    finished = stack.wait_until_finished(experiment_id, timeout=900)

    assert finished["status"] == "completed" and finished["attempts"] == 1
    assert OptimizationRun.objects.get(pk=kept.pk).finished_at == kept.finished_at


def terminate_other_database_connections() -> None:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE datname = current_database() AND pid <> pg_backend_pid()")


def redis_reachable(url: str) -> bool:
    try:
        import redis

        return bool(redis.from_url(url, socket_connect_timeout=1).ping())
    except Exception:
        return False


REDIS_TEST_URL = os.getenv("EDGEOPT_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


def test_two_qclusters_on_postgresql_and_redis_share_four_experiments_push_progress_and_survive_a_cut_connection(
        live, settings):
    if not settings.DATABASES["default"]["ENGINE"].endswith("postgresql"):
        pytest.skip("runs on PostgreSQL (DATABASE_URL=postgres://...), as CI does")
    if not redis_reachable(REDIS_TEST_URL):
        pytest.skip(f"no Redis at {REDIS_TEST_URL}")
    import redis

    redis.from_url(REDIS_TEST_URL).flushdb()  # a database of its own: no queue left from another run
    stack = live(workers=2, EDGEOPT_BROKER="redis", CHANNEL_LAYER="redis", REDIS_URL=REDIS_TEST_URL,
                 EDGEOPT_PROGRESS_POLL_MS="0",  # the WebSocket hears only what the worker pushes
                 EDGEOPT_MAX_ACTIVE_PER_USER="4")

    watched = start_demo(stack, techniques=["ptq_int8"])
    with stack.websocket(watched) as ws:
        others = [start_demo(stack, techniques=["ptq_int8"]) for _ in range(3)]
        messages = []
        while not (messages and messages[-1]["type"] == "status"):
            messages.append(json.loads(ws.recv(timeout=240)))
            if len(messages) == 3:  # mid-run: what a PostgreSQL restart does to every connection
                terminate_other_database_connections()

    assert messages[-1]["status"] == "completed"
    running = [m for m in messages if m["type"] == "progress" and m["status"] == "running"]
    assert len(running) >= 3 and any(m["technique"] == "ptq_int8" for m in running)
    for experiment_id in others:
        assert stack.wait_until_finished(experiment_id, timeout=900)["status"] == "completed"
    assert [e.attempts for e in Experiment.objects.filter(pk__in=[watched, *others])] == [1] * 4, \
        "an experiment ran twice, or a run did not survive its database connection being cut"
    logs = {name: (stack.log_dir / f"{name}.log").read_text() for name in ("worker", "worker2")}
    assert all("claimed experiment" in log for log in logs.values()), "one qcluster did all the work"
