"""The tables: experiments (each with an owner), their per-technique runs, stored files,
the recommendation, the live progress row the WebSocket reads, and users' API tokens."""
from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.conf import settings
from django.db import models, transaction
from django.db.models import F
from django.utils import timezone

from optimization import catalog

# Choices come from the catalog, the one list the engine, the API and the pages share.
FRAMEWORK_CHOICES = [(name, catalog.FRAMEWORK_LABELS[name]) for name in catalog.FRAMEWORKS]
TECHNIQUE_CHOICES = [(t.name, t.label) for t in catalog.TECHNIQUE_LIST]
TARGET_DEVICES = [(name, device["label"]) for name, device in catalog.DEVICES.items()]
GOALS = [(goal.name, goal.label) for goal in catalog.GOAL_LIST]
PLAN_CHOICES = [(name, label) for name, (label, _) in catalog.PLANS.items()]


STATUS_MESSAGES = {
    "ready": "model ready",
    "queued": "waiting for the worker",
    "running": "starting",
    "completed": "finished",
    "stopped": "stopped by the user; finished techniques are kept",
}


def default_techniques() -> list[str]:
    return list(catalog.TECHNIQUES)


class InvalidTransition(Exception):
    """The experiment is not in a state that allows this; the message says which states do."""


class Experiment(models.Model):
    """One model put through the chosen techniques.

    States and the methods that move between them (anything else raises InvalidTransition)::

        created  --attach_model()-->  ready
        ready | completed | failed | stopped  --enqueue()-->  queued      (old runs cleared)
        failed | stopped  --enqueue(resume=True)-->  queued                (finished runs kept)
        queued   --mark_running()-->  running                             (the worker took it)
        running  --mark_running()-->  running                             (a retried attempt)
        queued   --request_stop()-->  stopped                             (never started)
        running  --request_stop()-->  running, stop_requested             (the worker stops soon)
        running  --finish(status)-->  completed | failed | stopped
        queued   --finish("failed")--> failed                             (gave up before running)

    `attempts` counts how often the worker task started this run; django-q2 does not count
    a worker that died, so the task does (see tasks.run_experiment). While active, the attempt
    that owns the run holds `worker_token` and keeps `heartbeat_at` fresh (queued: the time it
    was queued); experiments/attempts.py claims, hands back and re-queues through them.
    """

    class Status(models.TextChoices):
        CREATED = "created"
        READY = "ready"
        QUEUED = "queued"
        RUNNING = "running"
        COMPLETED = "completed"
        FAILED = "failed"
        STOPPED = "stopped"

    STARTABLE = (Status.READY, Status.COMPLETED, Status.FAILED, Status.STOPPED)
    RESUMABLE = (Status.FAILED, Status.STOPPED)
    ACTIVE = (Status.QUEUED, Status.RUNNING)
    FINISHED = (Status.COMPLETED, Status.FAILED, Status.STOPPED)

    # PROTECT: deleting a user must not drop rows whose files would stay in storage; delete
    # their experiments first (that removes the files too).
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="experiments")
    name = models.CharField(max_length=100)
    framework = models.CharField(max_length=20, choices=FRAMEWORK_CHOICES)
    target_device = models.CharField(max_length=30, choices=TARGET_DEVICES)
    dataset = models.CharField(max_length=100, help_text='A preset name, or "custom" for an uploaded dataset.')
    goal = models.CharField(max_length=20, choices=GOALS, default=catalog.DEFAULT_GOAL)
    constraints = models.JSONField(default=dict, blank=True)
    techniques = models.JSONField(default=default_techniques)
    config = models.JSONField(
        default=dict, blank=True, help_text="input_shape, architecture, preprocessing, per-technique budgets"
    )
    plan = models.CharField(max_length=10, choices=PLAN_CHOICES, default=catalog.API_DEFAULT_PLAN,
                            help_text="budget: cheapest first, skip what cannot win or cannot finish in time")
    time_budget_s = models.FloatField(null=True, blank=True, help_text="no technique starts that cannot finish within it")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.CREATED, db_index=True)
    stop_requested = models.BooleanField(default=False)
    attempts = models.PositiveIntegerField(default=0)
    heartbeat_at = models.DateTimeField(null=True, blank=True, help_text="last sign of life of the run")
    worker_token = models.CharField(max_length=32, blank=True, help_text="the attempt that owns the run")
    error = models.TextField(blank=True)
    baseline = models.JSONField(null=True, blank=True)
    analysis = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "experiments"
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"#{self.pk} {self.name}"

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE

    def _require(self, allowed, action: str) -> None:
        if self.status not in allowed:
            names = ", ".join(str(s) for s in allowed)
            raise InvalidTransition(f"cannot {action} an experiment that is {self.status} (only when {names})")

    def _try_move(self, allowed, status: str, progress: dict | None = None, **fields) -> bool:
        """Move to `status` only if the row is still in one of `allowed` (one conditional
        UPDATE: the web and the worker may race), then mirror it in the progress row."""
        if not Experiment.objects.filter(pk=self.pk, status__in=allowed).update(status=status, **fields):
            self.refresh_from_db(fields=["status", "stop_requested"])
            return False
        self.status = status
        for name, value in fields.items():
            setattr(self, name, value)
        message = fields.get("error") or STATUS_MESSAGES.get(status, "")
        ExperimentProgress.publish(self, status=status, message=message, **(progress or {}))
        return True

    def _move(self, allowed, status: str, action: str, progress: dict | None = None, **fields) -> None:
        self._require(allowed, action)
        if not self._try_move(allowed, status, progress, **fields):
            self._require(allowed, action)  # another process moved it first: say to what

    # -- transitions -------------------------------------------------------------------

    def attach_model(self) -> None:
        self._move((self.Status.CREATED, self.Status.READY, *self.FINISHED), self.Status.READY, "attach a model to")

    def enqueue(self, resume: bool = False) -> None:
        """Queue a run, then hand the task to django-q2 once the transaction commits (the
        worker must find the queued row). A fresh run clears the previous one; `resume` (of
        a stopped or failed experiment) keeps the techniques that finished, completed, failed
        or skipped, and runs the rest (see tasks.run_experiment: finished runs are skipped)."""
        if resume:
            self._require(self.RESUMABLE, "resume")
            unfinished = self.runs.exclude(status__in=OptimizationRun.FINISHED)
            for stored in self.files.filter(role=ModelFile.Role.OPTIMIZED,
                                            technique__in=unfinished.values("technique")):
                stored.delete_with_file()
            unfinished.delete()
        else:
            self._require(self.STARTABLE, "start")
            self.runs.all().delete()
        Recommendation.objects.filter(experiment=self).delete()
        from . import storage

        if not resume:
            for stored in self.files.filter(role__in=(ModelFile.Role.OPTIMIZED, ModelFile.Role.BASELINE)):
                stored.delete_with_file()
            # Left-overs of the last run are overwritten by the next one anyway.
            storage.remove_tree(storage.optimized_dir(self.pk), ignore_errors=True)
        self._move(
            self.RESUMABLE if resume else self.STARTABLE, self.Status.QUEUED, "resume" if resume else "start",
            progress={
                "technique": "", "technique_index": 0, "technique_count": len(self.techniques),
                "technique_progress": 0.0, "overall_progress": 0.0, "eta_seconds": None, "metrics": {},
                "steps": [],
            },
            stop_requested=False, attempts=0, error="", started_at=None, finished_at=None,
            heartbeat_at=timezone.now(), worker_token="",
            **({} if resume else {"baseline": None}),
        )
        experiment_id = self.pk
        transaction.on_commit(lambda: _enqueue_run(experiment_id))

    def mark_running(self) -> None:
        self._move(self.ACTIVE, self.Status.RUNNING, "run", started_at=self.started_at or timezone.now())

    def request_stop(self) -> str:
        """Stop a queued run at once; ask a running one to stop. Returns the status the
        caller should report ("stopped" or "stopping")."""
        self._require(self.ACTIVE, "stop")
        if self._try_move((self.Status.QUEUED,), self.Status.STOPPED, finished_at=timezone.now()):
            return "stopped"
        if Experiment.objects.filter(pk=self.pk, status=self.Status.RUNNING).update(stop_requested=True):
            self.status, self.stop_requested = self.Status.RUNNING, True
            return "stopping"
        self.refresh_from_db(fields=["status"])  # it finished meanwhile
        raise InvalidTransition(f"cannot stop an experiment that is {self.status}")

    def finish(self, status: str, error: str = "") -> None:
        if status not in self.FINISHED:
            raise InvalidTransition(f"{status!r} is not a final status")
        allowed = self.ACTIVE if status == self.Status.FAILED else (self.Status.RUNNING,)
        self._move(allowed, status, f"finish ({status})", error=error, finished_at=timezone.now())

    # -- files -------------------------------------------------------------------------

    def source_model(self) -> ModelFile | None:
        return self.files.filter(role__in=(ModelFile.Role.UPLOAD, ModelFile.Role.PRETRAINED)).first()

    def dataset_file(self) -> ModelFile | None:
        return self.files.filter(role=ModelFile.Role.DATASET).first()

    def to_dict(self) -> dict:
        progress = getattr(self, "progress", None)
        model = self.source_model()
        dataset_file = self.dataset_file()
        return {
            "id": self.pk,
            "name": self.name,
            "framework": self.framework,
            "target_device": self.target_device,
            "dataset": self.dataset,
            "goal": self.goal,
            "constraints": self.constraints,
            "techniques": self.techniques,
            "config": self.config,
            "options": self.config.get("techniques", {}),
            "plan": self.plan,
            "time_budget_s": self.time_budget_s,
            "status": self.status,
            "stop_requested": self.stop_requested,
            "attempts": self.attempts,
            "error": self.error or None,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "model": model.to_dict() if model else None,
            "dataset_file": dataset_file.to_dict() if dataset_file else None,
            "progress": progress.to_message() if progress else None,
            "baseline": self.baseline,
            "analysis": self.analysis,
        }


def run_task_name(experiment_id: int) -> str:
    """The django-q2 task name of an experiment's run (the reconciler looks for it in the broker)."""
    return f"experiment-{experiment_id}"


def _enqueue_run(experiment_id: int) -> None:
    from django_q.tasks import async_task

    async_task("experiments.tasks.run_experiment", experiment_id, task_name=run_task_name(experiment_id))


def _iso(value) -> str | None:
    return value.isoformat() if value else None


class OptimizationRun(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        COMPLETED = "completed"
        FAILED = "failed"
        SKIPPED = "skipped"
        STOPPED = "stopped"

    FINISHED = (Status.COMPLETED, Status.FAILED, Status.SKIPPED)
    METRICS = (
        "accuracy", "accuracy_n", "accuracy_low", "accuracy_high", "accuracy_drop", "size_bytes",
        "compression_ratio", "params", "macs", "latency_ms", "latency_ms_low", "latency_ms_high",
        "speedup", "speedup_low", "speedup_high", "speedup_within_noise", "estimates",
        "constraints_met", "details",
    )

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="runs")
    technique = models.CharField(max_length=30, choices=TECHNIQUE_CHOICES)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING)
    accuracy = models.FloatField(null=True, blank=True)
    accuracy_n = models.PositiveIntegerField(null=True, blank=True, help_text="test samples")
    accuracy_low = models.FloatField(null=True, blank=True, help_text="95% Wilson interval")
    accuracy_high = models.FloatField(null=True, blank=True, help_text="95% Wilson interval")
    accuracy_drop = models.FloatField(null=True, blank=True, help_text="percentage points")
    size_bytes = models.BigIntegerField(null=True, blank=True)
    compression_ratio = models.FloatField(null=True, blank=True)
    params = models.BigIntegerField(null=True, blank=True)
    macs = models.FloatField(null=True, blank=True)
    latency_ms = models.FloatField(null=True, blank=True, help_text="measured on the host")
    latency_ms_low = models.FloatField(null=True, blank=True, help_text="fastest timing block")
    latency_ms_high = models.FloatField(null=True, blank=True, help_text="slowest timing block")
    speedup = models.FloatField(null=True, blank=True, help_text="median of ratios paired with the baseline")
    speedup_low = models.FloatField(null=True, blank=True)
    speedup_high = models.FloatField(null=True, blank=True)
    speedup_within_noise = models.BooleanField(null=True, blank=True,
                                               help_text="the paired ratios include 1: no difference shown")
    estimates = models.JSONField(default=dict, blank=True, help_text="estimated on the target device")
    constraints_met = models.JSONField(default=dict, blank=True)
    details = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "optimization_runs"
        constraints = [models.UniqueConstraint(fields=["experiment", "technique"], name="one_run_per_technique")]

    def __str__(self) -> str:
        return f"{self.technique} of experiment {self.experiment_id}"

    @property
    def passed_all(self) -> bool | None:
        return all(self.constraints_met.values()) if self.constraints_met else None

    def artifact_files(self) -> dict[str, ModelFile]:
        return {
            stored.kind: stored
            for stored in self.experiment.files.filter(role=ModelFile.Role.OPTIMIZED, technique=self.technique)
        }

    def to_dict(self) -> dict:
        artifacts = self.artifact_files()
        return {
            "technique": self.technique,
            "status": self.status,
            **{name: getattr(self, name) for name in self.METRICS},
            "artifacts": sorted(
                artifacts[kind].format if kind == ModelFile.Kind.DEPLOY else kind for kind in artifacts
            ),
            "error": self.error or None,
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
        }


class ModelFile(models.Model):
    """A file in storage; `path` is relative to EDGEOPT_STORAGE_ROOT."""

    class Role(models.TextChoices):
        UPLOAD = "upload"
        BASELINE = "baseline"
        OPTIMIZED = "optimized"
        DATASET = "dataset"
        PRETRAINED = "pretrained"

    class Kind(models.TextChoices):
        DEPLOY = "deploy"
        NATIVE = "native"
        SOURCE = "source"

    experiment = models.ForeignKey(
        Experiment, on_delete=models.CASCADE, related_name="files", null=True, blank=True
    )
    role = models.CharField(max_length=20, choices=Role.choices)
    technique = models.CharField(max_length=30, choices=TECHNIQUE_CHOICES, null=True, blank=True)
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.SOURCE)
    format = models.CharField(max_length=20, help_text="file suffix without the dot")
    path = models.CharField(max_length=500)
    size_bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "model_files"
        ordering = ["role", "technique", "kind"]

    def __str__(self) -> str:
        return self.path

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def absolute_path(self):
        from . import storage

        return storage.resolve(self.path)

    def delete_with_file(self) -> None:
        """Delete the row and its file; pretrained models are shared, only the row goes."""
        from . import storage

        if self.role != self.Role.PRETRAINED:
            storage.remove_file(self.path)
        self.delete()

    def to_dict(self) -> dict:
        return {
            "role": self.role,
            "technique": self.technique,
            "kind": self.kind,
            "format": self.format,
            "filename": self.filename,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
        }


class Recommendation(models.Model):
    experiment = models.OneToOneField(Experiment, on_delete=models.CASCADE, related_name="recommendation")
    technique = models.CharField(max_length=30, choices=TECHNIQUE_CHOICES, blank=True)
    reasoning = models.TextField()
    satisfied = models.BooleanField(default=False)
    ranking = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        db_table = "recommendations"

    def __str__(self) -> str:
        return f"{self.technique or 'none'} for experiment {self.experiment_id}"

    def to_dict(self) -> dict:
        return {
            "technique": self.technique or None,
            "reasoning": self.reasoning,
            "satisfied": self.satisfied,
            "ranking": self.ranking,
            "created_at": _iso(self.created_at),
        }


class ExperimentProgress(models.Model):
    """The live state of an experiment, written by the worker and read by the WebSocket
    consumer. `seq` grows on every write so a reader can tell that something changed."""

    PROGRESS_FIELDS = (
        "status", "technique", "technique_index", "technique_count", "technique_progress",
        "overall_progress", "eta_seconds", "message", "metrics", "steps",
    )

    experiment = models.OneToOneField(Experiment, on_delete=models.CASCADE, related_name="progress")
    status = models.CharField(max_length=20, default=Experiment.Status.CREATED)
    technique = models.CharField(max_length=30, blank=True)
    technique_index = models.PositiveIntegerField(default=0)
    technique_count = models.PositiveIntegerField(default=0)
    technique_progress = models.FloatField(default=0.0)
    overall_progress = models.FloatField(default=0.0)
    eta_seconds = models.FloatField(null=True, blank=True)
    message = models.TextField(blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    steps = models.JSONField(default=list, blank=True, help_text="the planned steps: [{technique, estimate_s}], the baseline first")
    seq = models.PositiveBigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "experiment_progress"
        verbose_name_plural = "experiment progress"

    def __str__(self) -> str:
        return f"progress of experiment {self.experiment_id} (seq {self.seq})"

    @classmethod
    def publish(cls, experiment: Experiment, **fields) -> None:
        """Write some fields and bump `seq` in one UPDATE (the web and the worker both
        write); create the row if an older experiment has none."""
        fields = {name: value for name, value in fields.items() if name in cls.PROGRESS_FIELDS}
        if fields.get("status") == Experiment.Status.COMPLETED:
            fields.update(overall_progress=1.0, technique_progress=1.0, eta_seconds=0.0)
        updated = cls.objects.filter(experiment=experiment).update(
            seq=F("seq") + 1, updated_at=timezone.now(), **fields
        )
        if not updated:
            cls.objects.create(
                experiment=experiment, technique_count=len(experiment.techniques), seq=1, **fields
            )

    @property
    def is_finished(self) -> bool:
        return self.status in Experiment.FINISHED

    def worker_silent_s(self) -> int | None:
        """Seconds the worker has shown no sign of life, when it looks gone (attempts.py)."""
        from .attempts import worker_silence_s

        experiment = self.experiment
        return worker_silence_s(experiment.status, experiment.heartbeat_at, experiment.started_at)

    def to_message(self) -> dict:
        """The WebSocket payload: "progress" while queued or running, "status" once final."""
        return {
            "type": "progress" if self.status in Experiment.ACTIVE else "status",
            **{name: getattr(self, name) for name in self.PROGRESS_FIELDS},
            "worker_silent_s": self.worker_silent_s() if self.status in Experiment.ACTIVE else None,
            "seq": self.seq,
            "updated_at": _iso(self.updated_at),
        }


LAST_USED_RESOLUTION = timedelta(minutes=1)


class ApiToken(models.Model):
    """A named token a script sends as `Authorization: Bearer <token>`. Only its SHA-256 is
    stored: the token is shown once, when made. SHA-256 without salt or stretching is
    enough here because the token is 256 random bits, not a password a person chose."""

    PREFIX = "eo_"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100)
    token_hash = models.CharField(max_length=64, unique=True)
    hint = models.CharField(max_length=12, help_text="the token's first characters, to tell tokens apart")
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        db_table = "api_tokens"
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.hint}…) of {self.user}"

    @staticmethod
    def hash(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    @classmethod
    def issue(cls, user, name: str) -> tuple[ApiToken, str]:
        """Make a token for `user`; returns the row and the token itself, which is not stored."""
        token = cls.PREFIX + secrets.token_urlsafe(32)
        row = cls.objects.create(user=user, name=name, token_hash=cls.hash(token), hint=token[:8])
        return row, token

    @classmethod
    def user_for(cls, token: str):
        """The active user a token belongs to, or None (unknown, revoked, or user inactive)."""
        row = cls.objects.select_related("user").filter(token_hash=cls.hash(token)).first()
        if row is None or not row.user.is_active:
            return None
        now = timezone.now()
        # At most once a minute, and one UPDATE, not a save(): a script polling every second
        # does not write every second, and concurrent requests with one token do not conflict.
        if row.last_used_at is None or now - row.last_used_at > LAST_USED_RESOLUTION:
            cls.objects.filter(pk=row.pk).update(last_used_at=now)
        return row.user
