"""The experiment loop with a fake backend and fake techniques: ordering, progress,
failure isolation, stop, and resuming after a killed worker."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optimization import orchestrator
from optimization.base import (
    BaseOptimization,
    ExperimentStopped,
    LoadedModel,
    OptimizedResult,
    TechniqueNotApplicable,
)
from optimization.datasets import split


class FakeBackend:
    """Deploy files are text files holding the 'accuracy' the fake model reaches."""

    framework = "pytorch"
    deploy_suffix = ".onnx"
    native_suffix = ".pt2"

    def load(self, path, input_shape=None, architecture=None, num_classes=None):
        return LoadedModel("pytorch", module="fake", input_shape=(1, 2, 2), num_classes=2,
                           source_path=path, source_format="pt2")

    def export_deploy(self, model, path):
        path.write_text("1.0" + " " * 997)  # 1000 bytes, every prediction right
        return path

    def predict(self, deploy_path, x):
        right = float(Path(deploy_path).read_text().split()[0])
        labels = (x.reshape(len(x), -1).sum(axis=1) > 2).astype(int)
        n_wrong = int(round(len(x) * (1 - right)))
        labels[:n_wrong] = 1 - labels[:n_wrong]
        return np.eye(2)[labels]

    def latency_invoker(self, deploy_path, sample):
        """One 'inference' advances the evaluator's fake clock by 1 µs per byte of the file."""
        seconds = Path(deploy_path).stat().st_size / 1e6

        def invoke():
            FAKE_CLOCK[0] += seconds
        return invoke


FAKE_CLOCK = [0.0]


@pytest.fixture(autouse=True)
def fake_timing_clock(monkeypatch):
    from optimization import evaluator

    monkeypatch.setattr(evaluator.time, "perf_counter", lambda: FAKE_CLOCK[0])


class FakeTechnique(BaseOptimization):
    framework = "pytorch"

    def __init__(self, name, accuracy=1.0, size=250, steps=4, error=None, on_step=None):
        self.name, self.accuracy, self.size, self.steps = name, accuracy, size, steps
        self.error, self.on_step = error, on_step

    def estimate_time(self, model_info, config):
        return 2.0

    def optimize(self, model, config, dataset, progress):
        for step in range(self.steps):
            if self.on_step:
                self.on_step(self.name, step)
            progress(step / self.steps, f"{self.name} step {step}", {"loss": 1.0 / (step + 1)})
        if self.error:
            raise self.error
        path = config.output_dir / f"{self.name}.onnx"
        path.write_text(f"{self.accuracy}" + " " * (self.size - len(str(self.accuracy))))
        return OptimizedResult(artifacts={"deploy": path}, details={"precision": "int8"})


class ListSink:
    def __init__(self, stop_after_messages=None, completed=None):
        self.events = []
        self.stop_after_messages = stop_after_messages
        self.completed = completed or {}

    def progress(self, state):
        self.events.append(("progress", state))

    def analysis(self, analysis):
        self.events.append(("analysis", analysis))

    def baseline(self, metrics):
        self.events.append(("baseline", metrics))

    def run_started(self, technique):
        self.events.append(("run_started", technique))

    def run_finished(self, technique, run):
        self.events.append(("run_finished", technique, run))

    def recommendation(self, rec):
        self.events.append(("recommendation", rec))

    def should_stop(self):
        messages = sum(1 for e in self.events if e[0] == "progress")
        return self.stop_after_messages is not None and messages >= self.stop_after_messages

    def completed_runs(self):
        return self.completed

    def runs(self):
        return {e[1]: e[2] for e in self.events if e[0] == "run_finished"}


@pytest.fixture
def engine(monkeypatch, tmp_path):
    """Wires the fakes in; returns (make_spec, techniques-by-name to fill in)."""
    techniques = {}
    rng = np.random.default_rng(0)
    x = rng.random((200, 1, 2, 2)).astype(np.float32)
    dataset = split("fake", x, (x.reshape(200, -1).sum(axis=1) > 2).astype(int), "NCHW")
    monkeypatch.setattr(orchestrator, "get_backend", lambda fw: FakeBackend())
    monkeypatch.setattr(orchestrator, "load_dataset", lambda *a, **k: dataset)
    monkeypatch.setattr(orchestrator, "get_technique", lambda fw, name: techniques[name])
    monkeypatch.setattr(orchestrator, "_analyse_and_estimate",
                        lambda path, fw, device, precision=None: (
                            {"params": 10, "macs": 100},
                            {"device": device, "latency_ms": 1.0, "memory_mb": 1.0, "energy_mj": 1.0}))

    def make_spec(names, constraints=None):
        return orchestrator.ExperimentSpec(
            experiment_id=1, framework="pytorch", model_path=tmp_path / "m.pt2",
            dataset_path=tmp_path, dataset_name="fake", target_device="rpi4", goal="min_size",
            constraints=constraints or {}, techniques=names, output_dir=tmp_path / "out")

    return make_spec, techniques


def test_runs_every_technique_in_order_and_recommends(engine):
    make_spec, techniques = engine
    techniques["ptq_int8"] = FakeTechnique("ptq_int8", accuracy=0.99, size=250)
    techniques["ptq_int4"] = FakeTechnique("ptq_int4", accuracy=0.95, size=125)
    sink = ListSink()

    assert orchestrator.run_experiment(make_spec(["ptq_int8", "ptq_int4"]), sink) == "completed"

    order = [e[1] for e in sink.events if e[0] == "run_started"]
    assert order == ["ptq_int8", "ptq_int4"]
    runs = sink.runs()
    assert runs["ptq_int8"]["compression_ratio"] == pytest.approx(4.0)
    assert runs["ptq_int8"]["speedup"] == pytest.approx(4.0)
    assert (runs["ptq_int8"]["speedup_low"], runs["ptq_int8"]["speedup_high"]) == pytest.approx((4.0, 4.0))
    assert runs["ptq_int8"]["speedup_within_noise"] is False
    assert runs["ptq_int8"]["latency_ms_low"] <= runs["ptq_int8"]["latency_ms"] <= runs["ptq_int8"]["latency_ms_high"]
    assert runs["ptq_int4"]["accuracy_drop"] == pytest.approx(5.0, abs=1.0)
    n = runs["ptq_int4"]["accuracy_n"]
    assert n > 0 and runs["ptq_int4"]["accuracy_low"] < runs["ptq_int4"]["accuracy"] < runs["ptq_int4"]["accuracy_high"]
    assert sink.events[-1][0] == "recommendation"
    assert sink.events[-1][1]["technique"] == "ptq_int4"  # min_size, no constraints


def test_overall_progress_never_decreases_and_ends_near_one(engine):
    make_spec, techniques = engine
    techniques["ptq_int8"] = FakeTechnique("ptq_int8")
    techniques["qat"] = FakeTechnique("qat", steps=10)
    sink = ListSink()

    orchestrator.run_experiment(make_spec(["ptq_int8", "qat"]), sink)

    overall = [e[1]["overall_progress"] for e in sink.events if e[0] == "progress"]
    assert len(overall) > 10
    assert overall == sorted(overall)
    assert overall[-1] == pytest.approx(1.0)
    last = [e[1] for e in sink.events if e[0] == "progress"][-1]
    assert last["technique"] == "qat" and last["technique_index"] == 2 and last["technique_count"] == 2


def test_a_failing_technique_fails_only_its_own_run(engine):
    make_spec, techniques = engine
    techniques["ptq_int4"] = FakeTechnique("ptq_int4", error=TechniqueNotApplicable("no INT4 kernels"))
    techniques["qat"] = FakeTechnique("qat", error=RuntimeError("diverged"))
    techniques["ptq_int8"] = FakeTechnique("ptq_int8")
    sink = ListSink()

    assert orchestrator.run_experiment(make_spec(["ptq_int4", "qat", "ptq_int8"]), sink) == "completed"

    runs = sink.runs()
    assert runs["ptq_int4"]["status"] == "skipped" and "no INT4 kernels" in runs["ptq_int4"]["error"]
    assert runs["qat"]["status"] == "failed" and "diverged" in runs["qat"]["error"]
    assert runs["ptq_int8"]["status"] == "completed"


def test_stop_keeps_finished_runs_and_runs_nothing_after(engine):
    make_spec, techniques = engine
    techniques["ptq_int8"] = FakeTechnique("ptq_int8")
    techniques["qat"] = FakeTechnique("qat", steps=100)
    techniques["hybrid"] = FakeTechnique("hybrid")
    sink = ListSink(stop_after_messages=12)

    assert orchestrator.run_experiment(make_spec(["ptq_int8", "qat", "hybrid"]), sink) == "stopped"

    runs = sink.runs()
    assert runs["ptq_int8"]["status"] == "completed"
    assert runs["qat"]["status"] == "stopped"
    assert "hybrid" not in runs
    assert not any(e[0] == "recommendation" for e in sink.events)


def test_a_retried_attempt_skips_runs_finished_before_and_still_ranks_them(engine):
    make_spec, techniques = engine
    earlier = {"status": "completed", "accuracy": 1.0, "accuracy_drop": 0.0, "size_bytes": 100,
               "compression_ratio": 10.0, "latency_ms": 0.1, "speedup": 10.0,
               "estimates": {"latency_ms": 1.0, "memory_mb": 1.0, "energy_mj": 1.0}}
    calls = []
    techniques["qat"] = FakeTechnique("qat", on_step=lambda name, step: calls.append(name))
    sink = ListSink(completed={"ptq_int8": earlier})

    orchestrator.run_experiment(make_spec(["ptq_int8", "qat"]), sink)

    assert [e[1] for e in sink.events if e[0] == "run_started"] == ["qat"]
    assert sink.events[-1][1]["technique"] == "ptq_int8"  # the smallest, from the earlier attempt


def test_stop_during_a_technique_is_seen_within_one_progress_call(engine):
    make_spec, techniques = engine
    seen = []

    def record(name, step):
        seen.append(step)

    techniques["qat"] = FakeTechnique("qat", steps=1000, on_step=record)
    sink = ListSink(stop_after_messages=5)

    orchestrator.run_experiment(make_spec(["qat"]), sink)

    assert len(seen) < 10


def test_progress_raises_experiment_stopped_when_the_sink_says_stop(engine):
    sink = ListSink(stop_after_messages=0)
    tracker = orchestrator.ProgressTracker(sink, [("baseline", 1.0)])
    with pytest.raises(ExperimentStopped):
        tracker(0.5, "x")


def test_an_energy_limit_is_checked_per_run_and_the_experiment_completes(engine):
    make_spec, techniques = engine
    techniques["ptq_int8"] = FakeTechnique("ptq_int8")  # the fake estimate spends 1.0 mJ
    sink = ListSink()

    status = orchestrator.run_experiment(make_spec(["ptq_int8"], {"max_energy_mj": 0.5}), sink)

    assert status == "completed"
    assert sink.runs()["ptq_int8"]["constraints_met"] == {"max_energy_mj": False}
    recommendation = sink.events[-1][1]
    assert recommendation["satisfied"] is False and "max_energy_mj" in recommendation["reasoning"]


def test_a_run_whose_constraint_check_raises_fails_alone(engine, monkeypatch):
    make_spec, techniques = engine
    techniques["ptq_int8"] = FakeTechnique("ptq_int8")
    monkeypatch.setattr(orchestrator, "constraints_met", lambda run, constraints: 1 / 0)
    sink = ListSink()

    status = orchestrator.run_experiment(make_spec(["ptq_int8"], {"max_size_mb": 1}), sink)

    assert status == "completed"
    run = sink.runs()["ptq_int8"]
    assert run["status"] == "failed" and "ZeroDivisionError" in run["error"]
