"""Progress that tells the truth: the plan comes first, the bar follows estimated work, the
ETA follows the pace. Fakes for the rules, one recorded run of the demo model for the truth."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from optimization import orchestrator
from optimization.base import TECHNIQUES, TechniqueNotApplicable
from tests.engine.test_orchestrator import FakeTechnique, ListSink, engine  # noqa: F401  (fixture)

FINE_TUNING = ("prune_unstructured", "prune_structured", "distillation", "qat", "hybrid")


class TimedSink(ListSink):
    """A list sink that notes when each progress message arrived, on `clock`."""

    clock = staticmethod(time.monotonic)

    def progress(self, state):
        super().progress({**state, "at": self.clock()})

    def messages(self) -> list[dict]:
        return [event[1] for event in self.events if event[0] == "progress"]


def test_the_first_message_carries_the_whole_plan_with_each_steps_estimate(engine):
    make_spec, techniques = engine
    techniques["ptq_int8"] = FakeTechnique("ptq_int8")
    techniques["qat"] = FakeTechnique("qat", steps=10)
    sink = TimedSink()

    orchestrator.run_experiment(make_spec(["ptq_int8", "qat"]), sink)

    first = sink.messages()[0]
    assert [step["technique"] for step in first["steps"]] == ["baseline", "ptq_int8", "qat"]
    assert all(step["estimate_s"] > 0 for step in first["steps"])
    assert first["technique"] == "baseline" and first["technique_count"] == 2
    assert first["eta_seconds"] > 0


def test_a_step_that_ends_early_moves_the_bar_forward_never_back(engine):
    make_spec, techniques = engine
    techniques["ptq_int4"] = FakeTechnique("ptq_int4", steps=0, error=TechniqueNotApplicable("no INT4 kernels"))
    techniques["qat"] = FakeTechnique("qat", steps=10)
    sink = TimedSink()

    orchestrator.run_experiment(make_spec(["ptq_int4", "qat"]), sink)

    messages = sink.messages()
    overall = [message["overall_progress"] for message in messages]
    assert overall == sorted(overall)
    assert overall[-1] == 1.0 and messages[-1]["eta_seconds"] == 0.0
    baseline, _, qat = (step["estimate_s"] for step in messages[0]["steps"])
    qat_start = next(m for m in messages if m["technique"] == "qat")
    # the skipped step gives its estimate back: the baseline's share of what is really done
    assert qat_start["overall_progress"] == pytest.approx(baseline / (baseline + qat), abs=0.01)


@pytest.mark.slow
def test_a_recorded_demo_run_plans_seven_techniques_and_its_eta_holds_within_2x(demo_storage, tmp_path,
                                                                              monkeypatch):
    """The whole demo experiment (PyTorch digits_cnn, every technique, one epoch of each
    fine-tune to keep the suite short), recorded at engine level: the ETA is judged against
    when the run really ended. Both the orchestrator's pace and the record run on this process's
    CPU time: the estimates are a quiet box's seconds of one thread's work, and other processes
    slowing this one down midway (a busy CI box) would judge the load, not the ETA."""
    monkeypatch.setattr(orchestrator, "time", SimpleNamespace(monotonic=time.process_time))
    monkeypatch.setattr(TimedSink, "clock", staticmethod(time.process_time))
    spec = orchestrator.ExperimentSpec(
        experiment_id=1, framework="pytorch",
        model_path=demo_storage / "models" / "pretrained" / "pytorch" / "digits_cnn.pt2",
        dataset_path=demo_storage / "dataset" / "preset" / "digits", dataset_name="digits",
        target_device="rpi4", goal="balanced", constraints={}, techniques=list(TECHNIQUES),
        output_dir=tmp_path / "out", config={"techniques": {name: {"epochs": 1} for name in FINE_TUNING}})
    sink = TimedSink()

    assert orchestrator.run_experiment(spec, sink) == "completed"

    messages = sink.messages()
    began, ended = messages[0]["at"], messages[-1]["at"]
    assert [step["technique"] for step in messages[0]["steps"]] == ["baseline", *TECHNIQUES]
    overall = [m["overall_progress"] for m in messages]
    assert overall == sorted(overall), "the bar never moves back"
    after_baseline = next(m for m in messages if m["technique"] == "baseline" and m["technique_progress"] == 1.0)
    assert after_baseline["overall_progress"] < 0.2
    at_ten_percent = next(m for m in messages if m["at"] - began >= 0.1 * (ended - began))
    truth = ended - at_ten_percent["at"]
    # ETA against the truth while at least a tenth of the run remains (later, a second's
    # noise is a large ratio of what is left)
    ratios = [(round((m["at"] - began) / (ended - began), 2), round(m["eta_seconds"] / (ended - m["at"]), 2))
              for m in messages if ended - m["at"] >= 0.1 * (ended - began)]
    print(f"run {ended - began:.1f} s; ETA/truth at 10%: {at_ten_percent['eta_seconds'] / truth:.2f}; "
          f"first {ratios[0][1]:.2f}; lowest {min(ratios, key=lambda r: r[1])}, highest "
          f"{max(ratios, key=lambda r: r[1])} (elapsed share, ratio); after baseline "
          f"{after_baseline['overall_progress']:.3f}")
    assert truth / 2 <= at_ten_percent["eta_seconds"] <= truth * 2
