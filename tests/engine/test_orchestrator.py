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
    tracker = orchestrator.ProgressTracker(sink, [("baseline", 1.0, 0.0)])
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


# ----------------------------------------------------------------------------- the planner

BASELINE = {"accuracy": 0.98, "size_bytes": 1000, "latency_ms": 1.0,
            "estimates": {"latency_ms": 10.0, "energy_mj": 20.0}}


def finished(size, drop=0.2, latency=5.0, accuracy=0.97):
    return {"status": "completed", "size_bytes": size, "accuracy": accuracy, "accuracy_drop": drop,
            "estimates": {"latency_ms": latency, "energy_mj": 2 * latency, "memory_mb": 1.0}}


def defaults(name):
    from optimization.catalog import validate_options

    return validate_options(name, "pytorch", {})


def test_qat_cannot_beat_int8_on_size_once_int8_meets_the_accuracy_limit():
    reason = orchestrator.cannot_win("qat", defaults("qat"), BASELINE, {"ptq_int8": finished(260)},
                                     "min_size", {"max_accuracy_drop": 1.0})
    assert "cannot beat ptq_int8 on size" in reason and "same INT8 graph as ptq_int8" in reason


def test_a_technique_that_could_still_win_is_not_skipped():
    runs = {"ptq_int8": finished(260)}
    assert orchestrator.cannot_win("hybrid", defaults("hybrid"), BASELINE, runs, "min_size", {}) is None
    # a 50% channel cut is at best 4x smaller: 250 bytes could still beat 260
    assert orchestrator.cannot_win("distillation", defaults("distillation"), BASELINE, runs, "min_size", {}) is None
    runs["ptq_int4"] = finished(130)
    reason = orchestrator.cannot_win("distillation", defaults("distillation"), BASELINE, runs, "min_size", {})
    assert "cannot beat ptq_int4" in reason and "at best 4x smaller" in reason


def test_nothing_is_skipped_for_the_goal_while_no_run_meets_the_constraints():
    runs = {"ptq_int8": finished(260, drop=3.0)}
    assert orchestrator.cannot_win("qat", defaults("qat"), BASELINE, runs, "min_size", {"max_accuracy_drop": 1.0}) is None


def test_a_constraint_out_of_reach_even_at_best_skips_the_technique():
    reason = orchestrator.cannot_win("prune_unstructured", defaults("prune_unstructured"), BASELINE, {},
                                     "max_accuracy", {"max_size_mb": 0.0005})
    assert reason.startswith("cannot meet max_size_mb") and "dense file stores every zero" in reason


def test_balanced_and_accuracy_goals_leave_room_for_better_accuracy():
    lossy, lossless = {"ptq_int8": finished(260, drop=0.5)}, {"ptq_int8": finished(260, drop=0.0)}
    assert orchestrator.cannot_win("qat", defaults("qat"), BASELINE, lossy, "balanced", {}) is None
    assert "on balance" in orchestrator.cannot_win("qat", defaults("qat"), BASELINE, lossless, "balanced", {})
    assert orchestrator.cannot_win("qat", defaults("qat"), BASELINE, lossy, "max_accuracy", {}) is None


def with_estimate(technique, seconds):
    technique.estimate_time = lambda model_info, config: seconds
    return technique


def test_budget_plan_runs_cheapest_first_and_skips_what_cannot_win(engine):
    make_spec, techniques = engine
    techniques["qat"] = with_estimate(FakeTechnique("qat", size=250), 5.0)
    techniques["ptq_int8"] = with_estimate(FakeTechnique("ptq_int8", size=250), 1.0)
    spec = make_spec(["qat", "ptq_int8"], {"max_accuracy_drop": 1.0})
    spec.plan = "budget"
    sink = ListSink()

    assert orchestrator.run_experiment(spec, sink) == "completed"

    assert [e[1] for e in sink.events if e[0] == "run_started"] == ["ptq_int8", "qat"]
    qat = sink.runs()["qat"]
    assert qat["status"] == "skipped" and "cannot beat ptq_int8" in qat["error"]
    assert qat["details"]["skipped_by"] == "planner"
    assert sink.events[-1][1]["technique"] == "ptq_int8"


def test_no_technique_starts_that_its_estimate_says_cannot_finish_in_the_time_budget(engine):
    make_spec, techniques = engine
    techniques["ptq_int8"] = with_estimate(FakeTechnique("ptq_int8"), 1.0)
    techniques["hybrid"] = with_estimate(FakeTechnique("hybrid"), 500.0)
    spec = make_spec(["hybrid", "ptq_int8"])
    spec.time_budget_s = 60.0  # plan "all": the budget holds there too
    sink = ListSink()

    orchestrator.run_experiment(spec, sink)

    runs = sink.runs()
    assert runs["ptq_int8"]["status"] == "completed"
    assert runs["hybrid"]["status"] == "skipped"
    assert "estimate (500 s at this run's pace) does not fit" in runs["hybrid"]["error"] and "60 s time budget" in runs["hybrid"]["error"]


def test_a_bad_option_fails_its_run_at_once_and_the_others_run(engine):
    make_spec, techniques = engine
    techniques["qat"] = FakeTechnique("qat")
    techniques["ptq_int8"] = FakeTechnique("ptq_int8")
    spec = make_spec(["qat", "ptq_int8"])
    spec.config = {"techniques": {"qat": {"keep_fraction": 0.5}}}
    sink = ListSink()

    assert orchestrator.run_experiment(spec, sink) == "completed"

    runs = sink.runs()
    assert runs["qat"]["status"] == "failed" and "qat has no option keep_fraction" in runs["qat"]["error"]
    assert runs["ptq_int8"]["status"] == "completed"


def test_budget_plan_fine_tunes_a_large_dataset_on_a_stated_subset(engine, monkeypatch):
    make_spec, techniques = engine
    seen = {}

    class Recording(FakeTechnique):
        def optimize(self, model, config, dataset, progress):
            seen[self.name] = len(dataset.x_train)
            return super().optimize(model, config, dataset, progress)

    techniques["hybrid"] = Recording("hybrid")
    techniques["ptq_int8"] = Recording("ptq_int8", size=900)
    monkeypatch.setattr(orchestrator, "MIN_TRAIN_SAMPLES", 10)
    monkeypatch.setattr(orchestrator, "EPOCH_SAMPLE_MACS", 5000)  # 50 samples at the fake's 100 MACs
    spec = make_spec(["ptq_int8", "hybrid"])
    spec.plan = "budget"
    sink = ListSink()

    orchestrator.run_experiment(spec, sink)

    assert seen["hybrid"] == 50
    assert sink.runs()["hybrid"]["details"]["training_subset"].startswith("50 of ")
    assert "training_subset" not in sink.runs()["ptq_int8"]["details"]
    spec.plan = "all"
    orchestrator.run_experiment(spec, ListSink())
    assert seen["hybrid"] > 50  # plan "all" trains on everything, as before
