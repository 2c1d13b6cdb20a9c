"""DjangoSink: where the engine's orchestrator writes what it does (see
optimization.orchestrator.ExperimentSink). Runs in the worker process."""
from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from . import attempts, cluster, storage
from .models import Experiment, ExperimentProgress, ModelFile, OptimizationRun, Recommendation

logger = logging.getLogger(__name__)


def jsonable(value):
    """Numbers, strings, lists and dicts only: numpy scalars become floats, paths strings,
    NaN and infinity None (JSON has no such numbers)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def retry_after_reconnect(write):
    """Run a database write; when the connection broke (PostgreSQL restarted, the backend was
    terminated), reconnect and run it once more. Each wrapped write is whole on its own (one
    statement or one transaction), so running it again is safe. If that fails too, the
    database is away for longer: DatabaseUnavailable ends the attempt without recording
    anything as failed, and the reconciler re-queues the run once the database is back."""

    @functools.wraps(write)
    def wrapper(*args, **kwargs):
        try:
            return write(*args, **kwargs)
        except (OperationalError, InterfaceError):
            if connection.in_atomic_block:
                raise  # the enclosing transaction is lost anyway: its owner retries
            logger.warning("database connection lost in %s; reconnecting", write.__name__, exc_info=True)
            connection.close()
        try:
            return write(*args, **kwargs)
        except (OperationalError, InterfaceError) as exc:
            raise attempts.DatabaseUnavailable(f"the database is unavailable: {exc}") from exc

    return wrapper


def group_name(experiment_id: int) -> str:
    return f"experiment_{experiment_id}"


def notify(experiment_id: int) -> None:
    """Best effort push to consumers when a cross-process channel layer is configured; the
    consumers poll the progress row anyway, so a lost message costs nothing."""
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(group_name(experiment_id), {"type": "experiment.changed"})
    except Exception:  # the push is an optimisation, never a reason to fail a run
        logger.debug("channel layer push failed", exc_info=True)


class DjangoSink:
    """Writes for one attempt, the owner of `token` (experiments.attempts): every write checks
    the token, and LostOwnership ends an attempt whose experiment was given to another."""

    min_write_interval = 0.1  # at most ~10 progress writes a second
    stop_check_interval = 0.3

    def __init__(self, experiment: Experiment, token: str, heartbeat: attempts.HeartbeatThread | None = None):
        self.experiment = experiment
        self.token = token
        self.heartbeat = heartbeat
        self.output_dir = storage.optimized_dir(experiment.pk)
        self._last_write = 0.0
        self._last_beat = 0.0
        self._last_technique: str | None = None
        self._pending: dict | None = None
        self._last_stop_check = 0.0
        self._stop = False

    # -- progress --------------------------------------------------------------------------

    def progress(self, state: dict) -> None:
        """Write the progress row, at most every `min_write_interval` seconds; the start and
        end of a step and a change of technique are always written, and a skipped state is
        written with the next run or baseline update, so the last word is never lost."""
        fields = jsonable({name: state[name] for name in ExperimentProgress.PROGRESS_FIELDS if name in state})
        fields.pop("status", None)  # the experiment's status is the task's to set
        if fields.get("message") is None:
            fields.pop("message", None)
        technique = fields.get("technique")
        boundary = fields.get("technique_progress") in (0.0, 1.0) or technique != self._last_technique
        if not boundary and time.monotonic() - self._last_write < self.min_write_interval:
            self._pending = fields
            return
        self._write(fields)

    @retry_after_reconnect
    def _write(self, fields: dict) -> None:
        now = time.monotonic()
        if now - self._last_beat >= attempts.heartbeat_interval():
            attempts.beat(self.experiment.pk, self.token)
            self._last_beat = now
        self._last_write, self._pending = now, None
        self._last_technique = fields.get("technique", self._last_technique)
        ExperimentProgress.publish(self.experiment, **fields)
        notify(self.experiment.pk)

    def _touch(self) -> None:
        """Bump `seq` after a row change (runs, baseline) so watchers re-render."""
        self._write(self._pending or {})

    def should_stop(self) -> bool:
        """The orchestrator asks at every progress call. A user's stop answers True; a stopping
        qcluster raises WorkerShuttingDown and a lost run LostOwnership, which end the attempt
        without recording the technique as stopped."""
        if cluster.stopping():
            raise attempts.WorkerShuttingDown("the worker is shutting down")
        if self.heartbeat is not None and self.heartbeat.lost.is_set():
            raise attempts.LostOwnership(f"experiment {self.experiment.pk} is no longer this attempt's")
        now = time.monotonic()
        if not self._stop and now - self._last_stop_check >= self.stop_check_interval:
            self._last_stop_check = now
            self._stop = self._read_stop_request()
        return self._stop

    @retry_after_reconnect
    def _read_stop_request(self) -> bool:
        row = Experiment.objects.filter(pk=self.experiment.pk).values("stop_requested", "worker_token").first()
        if row is None or row["worker_token"] != self.token:
            raise attempts.LostOwnership(f"experiment {self.experiment.pk} is no longer this attempt's")
        return row["stop_requested"]

    # -- results ---------------------------------------------------------------------------

    @retry_after_reconnect
    def analysis(self, analysis: dict) -> None:
        if analysis.get("error"):  # "analysis failed: ..." may name the deploy file's folder
            analysis = {**analysis, "error": storage.public_error(analysis["error"])}
        with transaction.atomic():
            attempts.beat(self.experiment.pk, self.token)
            Experiment.objects.filter(pk=self.experiment.pk).update(analysis=jsonable(analysis))

    @retry_after_reconnect
    def baseline(self, metrics: dict) -> None:
        metrics = dict(metrics)
        artifacts = metrics.pop("artifacts", None) or {}
        with transaction.atomic():
            attempts.beat(self.experiment.pk, self.token)
            Experiment.objects.filter(pk=self.experiment.pk).update(baseline=jsonable(metrics))
            self.experiment.files.filter(role=ModelFile.Role.BASELINE).delete()
            self._record_artifacts(ModelFile.Role.BASELINE, None, artifacts)
        self._touch()

    @retry_after_reconnect
    def run_started(self, technique: str) -> None:
        with transaction.atomic():
            attempts.beat(self.experiment.pk, self.token)
            OptimizationRun.objects.update_or_create(
                experiment=self.experiment, technique=technique,
                defaults={"status": OptimizationRun.Status.RUNNING, "started_at": timezone.now(),
                          "finished_at": None, "error": ""},
            )
        self._touch()

    @retry_after_reconnect
    def run_finished(self, technique: str, run: dict) -> None:
        run = dict(run)
        artifacts = run.pop("artifacts", None) or {}
        fields = jsonable({name: run.get(name) for name in OptimizationRun.METRICS})
        for name in ("estimates", "constraints_met", "details"):
            fields[name] = fields[name] or {}
        with transaction.atomic():
            attempts.beat(self.experiment.pk, self.token)
            OptimizationRun.objects.update_or_create(
                experiment=self.experiment, technique=technique,
                defaults={**fields, "status": run.get("status") or OptimizationRun.Status.COMPLETED,
                          "error": storage.public_error(run.get("error") or ""), "finished_at": timezone.now()},
            )
            self.experiment.files.filter(role=ModelFile.Role.OPTIMIZED, technique=technique).delete()
            self._record_artifacts(ModelFile.Role.OPTIMIZED, technique, artifacts)
        self._touch()

    @retry_after_reconnect
    def recommendation(self, rec: dict) -> None:
        rec = jsonable(rec)
        with transaction.atomic():
            attempts.beat(self.experiment.pk, self.token)
            Recommendation.objects.update_or_create(
                experiment=self.experiment,
                defaults={"technique": rec.get("technique") or "", "reasoning": rec.get("reasoning") or "",
                          "satisfied": bool(rec.get("satisfied")), "ranking": rec.get("ranking") or []},
            )
        self._touch()

    @retry_after_reconnect
    def completed_runs(self) -> dict[str, dict]:
        """Runs a previous attempt finished, in the shape the orchestrator gave them."""
        finished = {}
        for run in self.experiment.runs.filter(status__in=OptimizationRun.FINISHED):
            files = run.artifact_files()
            finished[run.technique] = {
                "status": run.status,
                **{name: getattr(run, name) for name in OptimizationRun.METRICS},
                "error": run.error or None,
                "artifacts": {kind: stored.absolute_path() for kind, stored in files.items()},
            }
        return finished

    def _record_artifacts(self, role: str, technique: str | None, artifacts: dict) -> None:
        """Record the files the engine wrote for this experiment. Anything outside its
        output folder (the baseline's "native" is the user's own upload) is not ours to
        record: deleting the experiment's results must never delete the source model."""
        for kind, path in artifacts.items():
            if not path or kind not in ModelFile.Kind.values:
                continue
            path = Path(path).resolve()
            if not path.is_relative_to(self.output_dir) or not path.is_file():
                continue
            ModelFile.objects.create(
                experiment=self.experiment, role=role, technique=technique, kind=kind,
                format=path.suffix.lstrip("."), path=storage.relative(path),
                size_bytes=path.stat().st_size,
            )
