"""The sequential experiment loop: load → baseline → each technique → recommend.

It talks to the outside only through an `ExperimentSink` (progress, rows, stop flag), so the
same loop runs under the django-q2 worker, in a test with a list-backed sink, or in a script.

Steps:
 1. load the dataset (in the framework's layout) and the model, safely;
 2. export the FP32 baseline to the deploy format, analyse it, evaluate and estimate it;
 3. for each selected technique: optimize → evaluate the deploy file → estimate on the
    target device → check constraints → record the run (a failure fails only that run);
    options are checked against the catalog first: a bad option fails that run at once;
 4. recommend against the goal and constraints;
 5. return the final status: "completed", or "stopped" when the user stopped it.

The planner (step 3): with plan "budget" the techniques run cheapest first (by their
estimate_time), and a technique is skipped, as a `skipped` row saying why, when
 - even at its best (catalog `at_best`: the smallest size and latency its options allow, e.g.
   INT8 at best 4x smaller, a 50% channel cut at best 4x, QAT at best equal to ptq_int8) it
   cannot meet a size, latency or energy constraint, or
 - a finished run already meets every constraint and the technique's best case would not be
   strictly better on the goal (size, device latency or energy; accuracy at best 100%;
   balanced: the product of its best size and latency factors with no accuracy loss).
With a `time_budget_s` (either plan), no technique starts whose estimate, scaled by this run's
pace so far (wall time over estimate of the techniques already run), exceeds the time left; so
the experiment ends within the budget plus at most one technique's error against its estimate.
Plan "budget" also scales fine-tuning to the model and the data: an epoch sees at most
max(MIN_TRAIN_SAMPLES, EPOCH_SAMPLE_MACS / MACs) training samples (a fixed random subset, so
a large dataset or a large model costs about a minute an epoch on the 2-core dev machine),
stated in each run's details as `training_subset`.
Plan "all" runs every technique in the order given, on all the training data.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from optimization import catalog
from optimization.base import ExperimentStopped, TechniqueConfig, TechniqueNotApplicable
from optimization.backends import LAYOUTS, RUNTIMES, get_backend
from optimization.datasets import load_dataset
from optimization.evaluator import evaluate
from optimization.recommender import constraints_met, recommend
from optimization.techniques import get_technique

logger = logging.getLogger(__name__)

# Seconds counted for exporting, analysing and measuring the baseline, and for evaluating,
# analysing and estimating each technique's file, for the overall bar and the ETA.
BASELINE_ESTIMATE_S = 5.0
MEASURE_ESTIMATE_S = 1.5
ETA_PRIOR_SHARE = 0.25
ESTIMATE_THREADS = 4
# Plan "budget": training samples x forward MACs one epoch may cost (about a minute of
# fine-tuning at the PyTorch cost model's 8e-11 s per MAC, forward and backward), never fewer
# samples than MIN_TRAIN_SAMPLES. The digits demo (1,437 samples x 2.6 M MACs) is far below.
EPOCH_SAMPLE_MACS = 2.5e11
MIN_TRAIN_SAMPLES = 1000


@dataclass
class ExperimentSpec:
    experiment_id: int
    framework: str
    model_path: Path
    dataset_path: Path
    dataset_name: str
    target_device: str
    goal: str
    constraints: dict
    techniques: list[str]
    output_dir: Path
    config: dict = field(default_factory=dict)
    plan: str = "all"  # catalog.PLANS
    time_budget_s: float | None = None


class ExperimentSink(Protocol):
    def progress(self, state: dict) -> None: ...
    def analysis(self, analysis: dict) -> None: ...
    def baseline(self, metrics: dict) -> None: ...
    def run_started(self, technique: str) -> None: ...
    def run_finished(self, technique: str, run: dict) -> None: ...
    def recommendation(self, rec: dict) -> None: ...
    def should_stop(self) -> bool: ...
    def completed_runs(self) -> dict[str, dict]: ...


class RecordingSink:
    """An ExperimentSink that keeps everything in memory: for scripts (bench/), tests and any
    caller without a database. `runs` holds each finished run by technique."""

    def __init__(self, completed: dict[str, dict] | None = None):
        self.runs: dict[str, dict] = {}
        self.order: list[str] = []  # techniques in the order they were started
        self.baseline_metrics: dict = {}
        self.analysis_result: dict = {}
        self.recommended: dict | None = None
        self.last_progress: dict = {}
        self._completed = dict(completed or {})

    def progress(self, state: dict) -> None:
        self.last_progress = state

    def analysis(self, analysis: dict) -> None:
        self.analysis_result = analysis

    def baseline(self, metrics: dict) -> None:
        self.baseline_metrics = metrics

    def run_started(self, technique: str) -> None:
        self.order.append(technique)

    def run_finished(self, technique: str, run: dict) -> None:
        self.runs[technique] = run

    def recommendation(self, rec: dict) -> None:
        self.recommended = rec

    def should_stop(self) -> bool:
        return False

    def completed_runs(self) -> dict[str, dict]:
        return self._completed


class ProgressTracker:
    """Overall progress and an ETA from a plan known before the first message.

    The plan is the baseline and every technique, each with its estimated seconds (a
    technique's own estimate plus MEASURE_ESTIMATE_S for evaluating its file). Overall
    progress is the share of the planned work done: the finished steps plus the running
    step's fraction of its estimate. A step that ends early (failed, skipped) gives back the
    estimate it did not use, so the bar never moves backwards and never waits for work that
    will not happen.

    The ETA scales the remaining estimate by the pace so far, (elapsed + P) / (done + P): it
    starts at the plan (pace 1) and follows the measured pace as work gets done; P, a
    quarter of the plan, keeps one step that ran fast or slow against its estimate from
    throwing off the whole ETA.
    """

    def __init__(self, sink: ExperimentSink, steps: list[tuple[str, float, float]],
                 started: float | None = None):
        self.sink = sink
        self.started = time.monotonic() if started is None else started
        self.steps = [(name, float(work), float(measure)) for name, work, measure in steps]
        self.total = sum(work + measure for _, work, measure in self.steps) or 1.0
        self.prior = ETA_PRIOR_SHARE * self.total
        self.done = 0.0  # estimated seconds of the steps before the current one
        self.index = 0
        self.fraction = 0.0  # of the current step's own work (the technique's progress)
        self.overall = 0.0

    def planned_steps(self) -> list[dict]:
        return [{"technique": name, "estimate_s": round(work + measure, 1)} for name, work, measure in self.steps]

    def _step_done(self) -> float:
        """Estimated seconds of the current step behind us; measuring follows a finished
        optimize, so a fraction of 1 is the work part only."""
        return self.fraction * self.steps[self.index][1]

    def begin(self, index: int) -> None:
        """The step `index` starts; the one before is over, done in full when its own work
        reached 1 (it was then measured), otherwise only as far as it got."""
        _, work, measure = self.steps[self.index]
        if self.fraction >= 1.0:
            self.done += work + measure
        else:
            self.done += self.fraction * work
            self.total -= (1 - self.fraction) * work + measure
        self.index, self.fraction = index, 0.0

    def __call__(self, fraction: float, message: str = "", metrics: dict | None = None) -> None:
        if self.sink.should_stop():
            raise ExperimentStopped("stopped by the user")
        self.fraction = min(max(float(fraction), 0.0), 1.0)
        self._send(message, metrics or {})

    def finish(self, message: str) -> None:
        """Every step is over: the bar is full, nothing remains."""
        self.overall, self.fraction = 1.0, 1.0
        self._send(message, {}, eta=0.0)

    def _send(self, message: str, metrics: dict, eta: float | None = None) -> None:
        done = self.done + self._step_done()
        self.overall = max(self.overall, min(done / self.total, 1.0))
        if eta is None:
            pace = (time.monotonic() - self.started + self.prior) / (done + self.prior)
            eta = max(0.0, (self.total - done) * pace)
        name = self.steps[self.index][0]
        self.sink.progress({
            "status": "running",
            "technique": name,
            "technique_index": self.index,  # 0 is the baseline, techniques count from 1
            "technique_count": len(self.steps) - 1,
            "technique_progress": self.fraction,
            "overall_progress": self.overall,
            "eta_seconds": round(eta, 1),
            "message": message,
            "metrics": metrics,
            "steps": self.planned_steps(),
        })


def _analyse_and_estimate(deploy_path: Path, framework: str, device: str,
                         precision: str | None = None) -> tuple[dict, dict]:
    """(analysis, estimates) of one deploy file, parsed once for both. What cannot be
    worked out is shown as such, never invented."""
    from optimization.analyzer import analyze
    from optimization.estimator import estimate
    from optimization.graph import load_model_graph

    try:
        graph = load_model_graph(Path(deploy_path))
    except Exception as exc:
        logger.exception("cannot read the graph of %s", deploy_path)
        return {"error": f"analysis failed: {exc}"}, {"device": device, "error": f"no estimate: {exc}"}
    try:
        analysis = analyze(graph)
    except Exception as exc:
        logger.exception("analysis failed for %s", deploy_path)
        analysis = {"error": f"analysis failed: {exc}"}
    try:
        estimates = estimate(graph, device, runtime=RUNTIMES[framework], precision=precision,
                             threads=ESTIMATE_THREADS)
    except Exception as exc:
        logger.exception("estimate failed for %s", deploy_path)
        estimates = {"device": device, "error": f"no estimate: {exc}"}
    return analysis, estimates


def _compare(run_metrics: dict, baseline: dict) -> dict:
    """Drop and size ratio against the baseline; the speedup is the evaluator's, paired with
    the baseline timed beside the candidate (a baseline timed minutes earlier on a busy host
    moved by a third between experiments)."""
    return {
        "accuracy_drop": round((baseline["accuracy"] - run_metrics["accuracy"]) * 100, 3),
        "compression_ratio": round(baseline["size_bytes"] / run_metrics["size_bytes"], 3),
    }


def run_experiment(spec: ExperimentSpec, sink: ExperimentSink) -> str:
    """Runs the experiment; returns "completed" or "stopped". Errors that sink the whole
    experiment (unreadable model or dataset, mismatched shapes) propagate to the caller."""
    try:
        return _run(spec, sink)
    except ExperimentStopped:
        return "stopped"


def _run(spec: ExperimentSpec, sink: ExperimentSink) -> str:
    started = time.monotonic()  # the time budget counts from here
    backend = get_backend(spec.framework)
    config = spec.config or {}
    output_dir = Path(spec.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    finished = dict(sink.completed_runs())
    todo = [name for name in spec.techniques if name not in finished]

    # Step 1: model and data.
    dataset = load_dataset(Path(spec.dataset_path), spec.dataset_name, LAYOUTS[spec.framework],
                           config.get("preprocessing"))
    model = backend.load(Path(spec.model_path), input_shape=_shape(config.get("input_shape")),
                         architecture=config.get("architecture"), num_classes=dataset.num_classes)
    if tuple(model.input_shape) != tuple(dataset.input_shape):
        raise ValueError(
            f"the model expects inputs of shape {list(model.input_shape)} but the dataset "
            f"'{spec.dataset_name}' gives {list(dataset.input_shape)}; pick a matching dataset or "
            f"set preprocessing (resize, channels) in the experiment's config")

    techniques = {name: get_technique(spec.framework, name) for name in todo}
    model_info = {"train_samples": len(dataset.x_train), "calib_samples": len(dataset.x_calib)}

    # Step 2: the FP32 baseline in the same deploy format, so ratios compare like for like.
    # The techniques' ETAs need its MACs and layer count, so the export and the analysis come
    # before the first message, which then carries the whole plan.
    plan_started = time.monotonic()  # the ETA's clock: loading the model and data is behind us
    baseline_deploy = backend.export_deploy(model, output_dir / f"baseline{backend.deploy_suffix}")
    analysis, baseline_estimates = _analyse_and_estimate(baseline_deploy, spec.framework, spec.target_device)
    sink.analysis(analysis)
    # layers: kernels in the deploy file; per-step and conversion costs grow with their count
    model_info.update(params=analysis.get("params"), macs=analysis.get("macs"),
                      layers=len(analysis.get("layers") or []) or None)
    training_subset = None
    if spec.plan == "budget":
        dataset, training_subset = _training_subset(dataset, analysis.get("macs"), int(config.get("seed", 0)))
        model_info["train_samples"] = len(dataset.x_train)
    configs = {
        name: TechniqueConfig(output_dir=output_dir,
                              options=config.get("techniques", {}).get(name, {}),
                              seed=int(config.get("seed", 0)))
        for name in todo
    }
    # A bad option fails its run at once, the same way in both frameworks.
    options, estimates = {}, {}
    for name in list(todo):
        try:
            options[name] = techniques[name].options(configs[name])
            estimates[name] = max(1.0, techniques[name].estimate_time(model_info, configs[name]))
        except catalog.OptionError as exc:
            todo.remove(name)
            sink.run_started(name)
            finished[name] = {"status": "failed", "error": f"bad option: {exc}", "details": {},
                              "artifacts": {}, "constraints_met": {}}
            sink.run_finished(name, finished[name])
    if spec.plan == "budget":
        todo.sort(key=lambda name: estimates[name])
    tracker = ProgressTracker(sink, [("baseline", BASELINE_ESTIMATE_S, 0.0)] + [
        (name, estimates[name], MEASURE_ESTIMATE_S) for name in todo], started=plan_started)
    tracker(0.5, "measuring the FP32 baseline")
    baseline = evaluate(backend, baseline_deploy, dataset)
    baseline.update(params=analysis.get("params"), macs=analysis.get("macs"),
                    estimates=baseline_estimates,
                    artifacts={"deploy": baseline_deploy, "native": Path(spec.model_path)})
    sink.baseline(baseline)
    tracker(1.0, f"baseline: accuracy {baseline['accuracy']:.3f}, {baseline['size_bytes']} bytes")

    # Step 3: the techniques, one after another.
    status = "completed"
    spent, estimated = 0.0, 0.0  # of the techniques run so far: the pace of this machine
    for index, name in enumerate(todo, start=1):
        tracker.begin(index)
        sink.run_started(name)
        pace = spent / estimated if estimated else 1.0
        reason = _over_budget(estimates[name] * pace, spec.time_budget_s, time.monotonic() - started)
        if reason is None and spec.plan == "budget":
            reason = cannot_win(name, options[name], baseline, finished, spec.goal, spec.constraints)
        if reason is not None:
            run = {"status": "skipped", "error": reason, "artifacts": {}, "constraints_met": {},
                   "details": {"skipped_by": "planner", "estimated_s": round(estimates[name], 1)}}
        else:
            run = _run_technique(techniques[name], model, configs[name], dataset, tracker, backend,
                                 baseline, spec)
            run["details"]["estimated_s"] = round(estimates[name], 1)
            if training_subset and catalog.TECHNIQUE_SPECS[name].fine_tunes:
                run["details"]["training_subset"] = training_subset
            spent, estimated = spent + run["details"]["wall_time_s"], estimated + estimates[name]
        sink.run_finished(name, run)
        finished[name] = run
        if run["status"] == "stopped":
            status = "stopped"
            break

    # Step 4: the recommendation over every finished run, earlier attempts included.
    runs = [{"technique": name, **finished[name]} for name in spec.techniques if name in finished]
    if status == "completed":
        tracker.finish("every technique measured; ranking the results")
        sink.recommendation(recommend(baseline, runs, spec.goal, spec.constraints))
    return status


def _run_technique(technique, model, config, dataset, tracker, backend, baseline, spec) -> dict:
    started = time.monotonic()
    run: dict = {"status": "completed", "error": None, "details": {}, "artifacts": {}, "constraints_met": {}}
    try:
        tracker(0.0, f"{technique.name}: starting")
        if not model.trainable and not technique.post_training:
            raise TechniqueNotApplicable(
                f"{technique.name} fine-tunes the model, which needs a trainable upload "
                f"(.pt2, .pt or .pth), not .{model.source_format}")
        result = technique.optimize(model, config, dataset, tracker)
        tracker(1.0, f"{technique.name}: measuring the result")
        deploy = Path(result.artifacts["deploy"])
        metrics = evaluate(backend, deploy, dataset, baseline_deploy=baseline["artifacts"]["deploy"])
        analysis, estimates = _analyse_and_estimate(deploy, spec.framework, spec.target_device,
                                                    result.precision)
        run.update(
            metrics,
            **_compare(metrics, baseline),
            params=result.params if result.params is not None else analysis.get("params"),
            macs=result.macs if result.macs is not None else analysis.get("macs"),
            estimates=estimates,
            details={**result.details, **result.vocabulary(), "analysis": analysis},
            artifacts=dict(result.artifacts),
        )
        # Inside the try: a check that cannot be made fails this run, never the experiment.
        run["constraints_met"] = constraints_met(run, spec.constraints)
    except ExperimentStopped:
        run.update(status="stopped", error="stopped by the user")
    except TechniqueNotApplicable as exc:
        run.update(status="skipped", error=str(exc))
    except Exception as exc:  # one failing technique does not sink the experiment
        logger.exception("technique %s failed", technique.name)
        run.update(status="failed", error=f"{type(exc).__name__}: {exc}")
    run["details"]["wall_time_s"] = round(time.monotonic() - started, 2)
    return run


# ----------------------------------------------------------------------------- the planner

def _training_subset(dataset, macs, seed: int):
    """(dataset, what was done) with at most the samples an epoch may cost under plan "budget"."""
    total = len(dataset.x_train)
    cap = max(MIN_TRAIN_SAMPLES, int(EPOCH_SAMPLE_MACS / macs)) if macs else total
    if total <= cap:
        return dataset, None
    chosen = np.sort(np.random.default_rng(seed).choice(total, cap, replace=False))
    subset = dataclasses.replace(dataset, x_train=dataset.x_train[chosen], y_train=dataset.y_train[chosen])
    return subset, (f"{cap} of {total} training samples (a fixed random subset): under plan budget an epoch "
                    f"costs at most {EPOCH_SAMPLE_MACS:.2g} sample-MACs at {macs:.3g} MACs a sample")


def _over_budget(estimate: float, budget: float | None, elapsed: float) -> str | None:
    if budget is None:
        return None
    left = budget - elapsed
    if estimate <= left:
        return None
    return (f"not started: its estimate ({estimate:.0f} s at this run's pace) does not fit the "
            f"{max(left, 0):.0f} s left of the {budget:g} s time budget")


def _goal_values(size: float | None, latency: float | None, energy: float | None) -> dict:
    return {"min_size": size, "min_latency": latency, "min_energy": energy}


GOAL_UNITS = {"min_size": ("size", "bytes"), "min_latency": ("estimated latency", "ms"),
              "min_energy": ("estimated energy", "mJ")}
CONSTRAINT_GOAL = {"max_size_mb": ("min_size", 2**20), "max_latency_ms": ("min_latency", 1.0),
                   "max_energy_mj": ("min_energy", 1.0)}


def _amount(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if unit == "bytes" else f"{value:.3g} {unit}"


def cannot_win(name: str, options: dict, baseline: dict, runs: dict[str, dict], goal: str,
               constraints: dict) -> str | None:
    """Why technique `name` cannot beat the finished `runs` on the goal within the constraints,
    even at its best (see the module docstring); None when it might."""
    best_case = catalog.technique_spec(name).at_best(options)
    base_estimates = baseline.get("estimates") or {}
    reference = runs.get(best_case.same_graph_as or "")
    if reference and reference.get("status") == "completed":
        ref_estimates = reference.get("estimates") or {}
        bound = _goal_values(reference.get("size_bytes"), ref_estimates.get("latency_ms"),
                             ref_estimates.get("energy_mj"))
    else:
        bound = _goal_values(*(None if value is None else value * factor for value, factor in (
            (baseline.get("size_bytes"), best_case.size),
            (base_estimates.get("latency_ms"), best_case.latency),
            (base_estimates.get("energy_mj"), best_case.latency))))

    for constraint, limit in (constraints or {}).items():
        if constraint in CONSTRAINT_GOAL and limit is not None:
            goal_key, scale = CONSTRAINT_GOAL[constraint]
            value = bound[goal_key]
            if value is not None and value / scale > float(limit):
                words = catalog.CONSTRAINTS[constraint]
                return (f"cannot meet {constraint}: {best_case.why}, so its {words.label} is at best "
                        f"{value / scale:.3g} {words.unit}, over the {float(limit):g} {words.unit} limit")

    passing = {technique: run for technique, run in runs.items()
               if run.get("status") == "completed" and all(constraints_met(run, constraints).values())}
    if not passing:
        return None
    if goal in GOAL_UNITS:
        values = {technique: _goal_values(run.get("size_bytes"), (run.get("estimates") or {}).get("latency_ms"),
                                          (run.get("estimates") or {}).get("energy_mj"))[goal]
                  for technique, run in passing.items()}
        values = {technique: v for technique, v in values.items() if v is not None}
        if bound[goal] is None or not values:
            return None
        leader = min(values, key=values.get)
        if bound[goal] < values[leader]:
            return None
        label, unit = GOAL_UNITS[goal]
        return (f"cannot beat {leader} on {label}: {best_case.why}, so at best {_amount(bound[goal], unit)}, "
                f"and {leader} already has {_amount(values[leader], unit)} within every constraint")
    if goal == "max_accuracy":
        leader = max(passing, key=lambda t: passing[t].get("accuracy") or 0.0)
        if (passing[leader].get("accuracy") or 0.0) < 1.0:
            return None
        return f"cannot beat {leader} on accuracy: {leader} already reaches 100% within every constraint"
    # balanced: ranks by size x latency x (1 + accuracy drop); at best no accuracy is lost
    if bound["min_size"] is None or bound["min_latency"] is None:
        return None
    merits = {}
    for technique, run in passing.items():
        latency = (run.get("estimates") or {}).get("latency_ms")
        if run.get("size_bytes") and latency:
            merits[technique] = run["size_bytes"] * latency * (1 + max(float(run.get("accuracy_drop") or 0), 0.0))
    if not merits:
        return None
    leader = min(merits, key=merits.get)
    if bound["min_size"] * bound["min_latency"] < merits[leader]:
        return None
    return (f"cannot beat {leader} on balance: {best_case.why}, so at best size x latency "
            f"{bound['min_size'] * bound['min_latency']:.4g} with no accuracy lost, and {leader} already "
            f"scores {merits[leader]:.4g} (size x latency x (1 + drop)) within every constraint")


def _shape(value) -> tuple[int, ...] | None:
    return tuple(int(v) for v in value) if value else None
