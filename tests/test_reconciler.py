"""One owner per run, the reconciler, the graceful stop and a lost database connection, in
process with a fake engine (tests/test_worker_faults.py does it with real qclusters)."""
from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone
from django_q.models import OrmQ

from experiments import attempts, cluster, tasks
from experiments.models import Experiment, ExperimentProgress, OptimizationRun
from experiments.reconciler import ensure_schedule, reconcile
from experiments.sink import DjangoSink
from tests.test_tasks import fake_engine, silence_the_worker as silence, use_engine

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def queued_experiment(ready_experiment):
    ready_experiment.enqueue()
    return ready_experiment


def queued_tasks(experiment) -> int:
    return sum(1 for row in OrmQ.objects.all() if row.name() == f"experiment-{experiment.pk}")


def test_only_one_of_two_deliveries_of_a_task_claims_the_experiment(queued_experiment):
    first, second = attempts.claim(queued_experiment.pk), attempts.claim(queued_experiment.pk)

    assert first and second is None
    experiment = Experiment.objects.get(pk=queued_experiment.pk)
    assert (experiment.status, experiment.attempts, experiment.worker_token) == ("running", 1, first)


def test_a_second_delivery_of_a_running_experiment_s_task_does_nothing(monkeypatch, queued_experiment):
    attempts.claim(queued_experiment.pk)  # a live worker runs it
    use_engine(monkeypatch, fake_engine(fail_with=AssertionError("must not run twice")))

    assert tasks.run_experiment(queued_experiment.pk) == "running"
    assert Experiment.objects.get(pk=queued_experiment.pk).attempts == 1


def test_reconciler_requeues_a_silent_run_and_the_next_attempt_resumes(monkeypatch, queued_experiment, settings):
    use_engine(monkeypatch, fake_engine(worker_dies=True))
    with pytest.raises(SystemExit):
        tasks.run_experiment(queued_experiment.pk)
    assert reconcile()["requeued"] == [], "a fresh heartbeat is left alone"
    silence(queued_experiment, settings)

    assert reconcile()["requeued"] == [queued_experiment.pk]
    experiment = Experiment.objects.select_related("progress").get(pk=queued_experiment.pk)
    assert (experiment.status, experiment.worker_token) == ("queued", "")
    assert "stopped responding" in experiment.progress.message
    assert queued_tasks(experiment) == 2, "a new task beside the dead worker's"
    seen = {}
    use_engine(monkeypatch, fake_engine(techniques_done=("qat",), seen=seen))
    assert tasks.run_experiment(queued_experiment.pk) == "completed"
    assert set(seen["completed"]) == {"ptq_int8"}
    assert Experiment.objects.get(pk=queued_experiment.pk).attempts == 2


def test_reconciler_fails_a_silent_run_that_used_its_attempts(queued_experiment, settings):
    settings.EDGEOPT_MAX_ATTEMPTS = 2
    attempts.claim(queued_experiment.pk)
    Experiment.objects.filter(pk=queued_experiment.pk).update(attempts=2)
    silence(queued_experiment, settings)

    assert reconcile()["failed"] == [queued_experiment.pk]
    experiment = Experiment.objects.select_related("progress").get(pk=queued_experiment.pk)
    assert experiment.status == "failed" and "gave up after 2 attempts" in experiment.error
    assert experiment.progress.to_message()["type"] == "status"


def test_reconciler_stops_a_silent_run_the_user_asked_to_stop(queued_experiment, settings):
    attempts.claim(queued_experiment.pk)
    Experiment.objects.get(pk=queued_experiment.pk).request_stop()
    silence(queued_experiment, settings)

    assert reconcile()["stopped"] == [queued_experiment.pk]
    assert Experiment.objects.get(pk=queued_experiment.pk).status == "stopped"


def test_an_attempt_that_lost_its_run_writes_nothing_more(queued_experiment, settings):
    stale_sink = DjangoSink(queued_experiment, attempts.claim(queued_experiment.pk))
    silence(queued_experiment, settings)
    reconcile()
    new_token = attempts.claim(queued_experiment.pk)

    with pytest.raises(attempts.LostOwnership):
        stale_sink.run_started("qat")
    with pytest.raises(attempts.LostOwnership):
        stale_sink.should_stop()
    assert not OptimizationRun.objects.filter(experiment=queued_experiment).exists()
    assert Experiment.objects.get(pk=queued_experiment.pk).worker_token == new_token


def test_reconciler_queues_a_new_task_for_a_queued_experiment_whose_task_vanished(queued_experiment, settings):
    silence(queued_experiment, settings)
    assert reconcile()["enqueued_again"] == [], "its task still waits in the broker"
    OrmQ.objects.all().delete()  # taken by a cluster that died

    assert reconcile()["enqueued_again"] == [queued_experiment.pk]
    assert queued_tasks(queued_experiment) == 1
    assert reconcile()["enqueued_again"] == [], "not again while the new task waits"


def test_a_stopping_qcluster_hands_the_run_back_without_using_an_attempt(monkeypatch, queued_experiment):
    def engine(spec, sink):
        fake_engine(outcome="running")(spec, sink)  # ptq_int8 finishes
        monkeypatch.setattr(cluster, "stopping", lambda: True)  # SIGTERM reached the qcluster
        sink.should_stop()  # the next progress call
        raise AssertionError("should_stop must raise")

    use_engine(monkeypatch, engine)

    assert tasks.run_experiment(queued_experiment.pk) == "interrupted"
    experiment = Experiment.objects.select_related("progress").get(pk=queued_experiment.pk)
    assert (experiment.status, experiment.attempts, experiment.error) == ("queued", 0, "")
    assert "interrupted" in experiment.progress.message
    assert experiment.runs.get(technique="ptq_int8").status == "completed"
    assert queued_tasks(experiment) == 2


def test_a_stopping_qcluster_ends_a_run_the_user_asked_to_stop_instead_of_queueing_it(monkeypatch,
                                                                                     queued_experiment):
    def engine(spec, sink):
        Experiment.objects.get(pk=spec.experiment_id).request_stop()
        monkeypatch.setattr(cluster, "stopping", lambda: True)
        sink.should_stop()
        raise AssertionError("should_stop must raise")

    use_engine(monkeypatch, engine)

    assert tasks.run_experiment(queued_experiment.pk) == "interrupted"
    assert Experiment.objects.get(pk=queued_experiment.pk).status == "stopped"


def test_a_task_fetched_by_a_stopping_qcluster_is_left_for_the_next_worker(monkeypatch, queued_experiment):
    monkeypatch.setattr(cluster, "stopping", lambda: True)

    assert tasks.run_experiment(queued_experiment.pk) == "handed back"
    experiment = Experiment.objects.get(pk=queued_experiment.pk)
    assert (experiment.status, experiment.attempts) == ("queued", 0)
    assert queued_tasks(experiment) == 2


def test_progress_says_the_worker_is_not_responding_once_the_heartbeat_is_stale(queued_experiment, settings,
                                                                                 client):
    attempts.claim(queued_experiment.pk)
    assert ExperimentProgress.objects.get(experiment=queued_experiment).worker_silent_s() is None
    silence(queued_experiment, settings, seconds_past_stale=30)

    progress = client.get(f"/api/experiments/{queued_experiment.pk}").json()["progress"]
    page = client.get(f"/experiments/{queued_experiment.pk}/").content.decode()

    assert progress["worker_silent_s"] >= settings.EDGEOPT_STALE_AFTER_S + 30
    assert "The worker is not responding" in page


def test_a_queued_experiment_says_when_no_qcluster_runs_at_all(queued_experiment, client):
    from django_q.models import Schedule

    ensure_schedule()
    Schedule.objects.filter(name=attempts.RECONCILE_SCHEDULE).update(next_run=timezone.now() - timedelta(hours=1))
    page = client.get(f"/experiments/{queued_experiment.pk}/").content.decode()
    assert "No worker is running" in page

    Schedule.objects.filter(name=attempts.RECONCILE_SCHEDULE).update(next_run=timezone.now() + timedelta(seconds=30))
    page = client.get(f"/experiments/{queued_experiment.pk}/").content.decode()
    assert "No worker is running" not in page


def test_the_reconciler_is_scheduled_every_minute_once():
    from django_q.models import Schedule

    ensure_schedule()
    ensure_schedule()
    schedule = Schedule.objects.get(name=attempts.RECONCILE_SCHEDULE)
    assert (schedule.func, schedule.schedule_type, schedule.minutes) == (
        "experiments.reconciler.reconcile", Schedule.MINUTES, 1)


def test_the_heartbeat_thread_keeps_a_step_without_progress_calls_alive(queued_experiment, settings):
    settings.EDGEOPT_STALE_AFTER_S = 3  # a beat every 0.5 s
    token = attempts.claim(queued_experiment.pk)
    heartbeat = attempts.HeartbeatThread(queued_experiment.pk, token)
    heartbeat.start()
    try:
        time.sleep(settings.EDGEOPT_STALE_AFTER_S + 1)  # a long conversion: no progress call
        assert reconcile()["requeued"] == []
    finally:
        heartbeat.stop()
    experiment = Experiment.objects.get(pk=queued_experiment.pk)
    assert (experiment.status, experiment.worker_token) == ("running", token)


def test_the_sink_reconnects_after_postgresql_drops_its_connection(queued_experiment):
    if connection.vendor != "postgresql":
        pytest.skip("terminates a PostgreSQL backend (DATABASE_URL=postgres://...), as CI runs")
    import psycopg2

    sink = DjangoSink(queued_experiment, attempts.claim(queued_experiment.pk))
    sink.progress({"status": "running", "technique": "baseline", "technique_progress": 0.0})
    settings_dict = connection.settings_dict
    backend_pid = connection.connection.get_backend_pid()
    admin = psycopg2.connect(dbname=settings_dict["NAME"], user=settings_dict["USER"] or "postgres",
                             host=settings_dict["HOST"] or "127.0.0.1", port=settings_dict["PORT"] or 5432)
    admin.autocommit = True
    with admin.cursor() as cursor:  # what a PostgreSQL restart does to the worker's connection
        cursor.execute("SELECT pg_terminate_backend(%s)", [backend_pid])
        for _ in range(100):  # it is signalled; wait until it is gone
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [backend_pid])
            if cursor.fetchone()[0] == 0:
                break
            time.sleep(0.1)
    admin.close()

    sink.run_started("qat")
    sink.progress({"status": "running", "technique": "qat", "technique_progress": 0.5, "message": "epoch 2"})

    assert connection.connection.get_backend_pid() != backend_pid
    assert OptimizationRun.objects.get(experiment=queued_experiment, technique="qat").status == "running"
    assert ExperimentProgress.objects.get(experiment=queued_experiment).technique == "qat"


def test_a_database_that_stays_away_ends_the_attempt_without_failing_the_technique(monkeypatch, queued_experiment,
                                                                                   settings):
    from django.db import OperationalError

    def engine(spec, sink):
        sink.run_started("ptq_int8")
        monkeypatch.setattr(ExperimentProgress, "publish", lambda *a, **k: (_ for _ in ()).throw(
            OperationalError("server closed the connection unexpectedly")))
        try:
            sink.progress({"status": "running", "technique": "ptq_int8", "technique_progress": 0.0})  # always written
        except Exception:  # what the orchestrator does with a technique's error
            raise AssertionError("a database outage was reported as the technique's error") from None
        return "completed"

    use_engine(monkeypatch, engine)

    assert tasks.run_experiment(queued_experiment.pk) == "database unavailable"
    monkeypatch.undo()
    experiment = Experiment.objects.get(pk=queued_experiment.pk)
    assert experiment.status == "running" and not experiment.error
    assert experiment.runs.get(technique="ptq_int8").status == "running", "left for the next attempt"
    silence(experiment, settings)
    assert reconcile()["requeued"] == [experiment.pk]
