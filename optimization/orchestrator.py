"""The sequential experiment loop: load → baseline → each technique → recommend.

It talks to the outside only through an `ExperimentSink` (progress, rows, stop flag), so the
same loop runs under the django-q2 worker, in a test with a list-backed sink, or in a script.

Steps:
 1. load the dataset (in the framework's layout) and the model, safely;
 2. export the FP32 baseline to the deploy format, analyse it, evaluate and estimate it;
 3. for each selected technique: optimize → evaluate the deploy file → estimate on the
    target device → check constraints → record the run (a failure fails only that run);
 4. recommend against the goal and constraints;
 5. return the final status: "completed", or "stopped" when the user stopped it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from optimization.base import ExperimentStopped, TechniqueConfig, TechniqueNotApplicable
from optimization.backends import LAYOUTS, RUNTIMES, get_backend
from optimization.datasets import load_dataset
from optimization.evaluator import evaluate
from optimization.recommender import constraints_met, recommend
from optimization.techniques import get_technique

logger = logging.getLogger(__name__)

# Seconds counted for loading, exporting and measuring the baseline, for the overall bar.
BASELINE_ESTIMATE_S = 5.0
ESTIMATE_THREADS = 4


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


class ExperimentSink(Protocol):
    def progress(self, state: dict) -> None: ...
    def analysis(self, analysis: dict) -> None: ...
    def baseline(self, metrics: dict) -> None: ...
    def run_started(self, technique: str) -> None: ...
    def run_finished(self, technique: str, run: dict) -> None: ...
    def recommendation(self, rec: dict) -> None: ...
    def should_stop(self) -> bool: ...
    def completed_runs(self) -> dict[str, dict]: ...


class ProgressTracker:
    """Turns per-technique fractions into overall progress and an ETA.

    Overall progress weights each step by its estimated seconds; the ETA scales the
    estimate of the remaining work by how fast the finished work went against its estimate.
    Overall progress never decreases.
    """

    def __init__(self, sink: ExperimentSink, steps: list[tuple[str, float]]):
        self.sink = sink
        self.steps = steps
        self.total = sum(seconds for _, seconds in steps) or 1.0
        self.started = time.monotonic()
        self.index = 0
        self.done_estimate = 0.0
        self.overall = 0.0

    def begin(self, index: int) -> None:
        self.index = index
        self.done_estimate = sum(seconds for _, seconds in self.steps[:index])

    def __call__(self, fraction: float, message: str = "", metrics: dict | None = None) -> None:
        if self.sink.should_stop():
            raise ExperimentStopped("stopped by the user")
        fraction = min(max(float(fraction), 0.0), 1.0)
        name, seconds = self.steps[self.index]
        estimated_done = self.done_estimate + fraction * seconds
        self.overall = max(self.overall, estimated_done / self.total)
        elapsed = time.monotonic() - self.started
        pace = elapsed / estimated_done if estimated_done > 0 else 1.0
        eta = max(0.0, (self.total - estimated_done) * pace)
        self.sink.progress(
            {
                "status": "running",
                "technique": name,
                "technique_index": self.index,  # 0 is the baseline, techniques count from 1
                "technique_count": len(self.steps) - 1,
                "technique_progress": fraction,
                "overall_progress": self.overall,
                "eta_seconds": round(eta, 1),
                "message": message,
                "metrics": metrics or {},
            }
        )


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
    if model.source_module is not None:  # a converted model must compute what the upload does
        backend.verify_conversion(model, dataset.x_calib)

    techniques = {name: get_technique(spec.framework, name) for name in todo}
    model_info = {"train_samples": len(dataset.x_train), "calib_samples": len(dataset.x_calib)}

    # Step 2: the FP32 baseline in the same deploy format, so ratios compare like for like.
    tracker = ProgressTracker(sink, [("baseline", BASELINE_ESTIMATE_S)])
    tracker(0.0, "exporting the FP32 baseline")
    baseline_deploy = backend.export_deploy(model, output_dir / f"baseline{backend.deploy_suffix}")
    analysis, baseline_estimates = _analyse_and_estimate(baseline_deploy, spec.framework, spec.target_device)
    sink.analysis(analysis)
    # layers: kernels in the deploy file; per-step and conversion costs grow with their count
    model_info.update(params=analysis.get("params"), macs=analysis.get("macs"),
                      layers=len(analysis.get("layers") or []) or None)
    tracker(0.5, "measuring the baseline")
    baseline = evaluate(backend, baseline_deploy, dataset)
    baseline.update(params=analysis.get("params"), macs=analysis.get("macs"),
                    estimates=baseline_estimates,
                    artifacts={"deploy": baseline_deploy, "native": Path(spec.model_path)})
    sink.baseline(baseline)

    configs = {
        name: TechniqueConfig(output_dir=output_dir,
                              options=config.get("techniques", {}).get(name, {}),
                              seed=int(config.get("seed", 0)))
        for name in todo
    }
    steps = [("baseline", BASELINE_ESTIMATE_S)] + [
        (name, max(1.0, techniques[name].estimate_time(model_info, configs[name]))) for name in todo
    ]
    tracker.steps, tracker.total = steps, sum(s for _, s in steps)
    tracker(1.0, f"baseline: accuracy {baseline['accuracy']:.3f}, {baseline['size_bytes']} bytes")

    # Step 3: the techniques, one after another.
    status = "completed"
    for index, name in enumerate(todo, start=1):
        tracker.begin(index)
        sink.run_started(name)
        run = _run_technique(techniques[name], model, configs[name], dataset, tracker, backend,
                             baseline, spec)
        sink.run_finished(name, run)
        finished[name] = run
        if run["status"] == "stopped":
            status = "stopped"
            break

    # Step 4: the recommendation over every finished run, earlier attempts included.
    runs = [{"technique": name, **finished[name]} for name in spec.techniques if name in finished]
    if status == "completed":
        sink.recommendation(recommend(baseline, runs, spec.goal, spec.constraints))
    return status


def _run_technique(technique, model, config, dataset, tracker, backend, baseline, spec) -> dict:
    started = time.monotonic()
    run: dict = {"status": "completed", "error": None, "details": {}, "artifacts": {}, "constraints_met": {}}
    try:
        tracker(0.0, f"{technique.name}: starting")
        if not model.trainable and not technique.post_training:
            raise TechniqueNotApplicable(
                f"{technique.name} fine-tunes the model: " + (model.not_trainable_reason or
                f"it needs a trainable upload (.pt2, .pt or .pth), not .{model.source_format}"))
        result = technique.optimize(model, config, dataset, tracker)
        tracker(1.0, f"{technique.name}: measuring the result")
        deploy = Path(result.artifacts["deploy"])
        metrics = evaluate(backend, deploy, dataset, baseline_deploy=baseline["artifacts"]["deploy"])
        analysis, estimates = _analyse_and_estimate(deploy, spec.framework, spec.target_device,
                                                    result.details.get("precision"))
        run.update(
            metrics,
            **_compare(metrics, baseline),
            params=result.params if result.params is not None else analysis.get("params"),
            macs=result.macs if result.macs is not None else analysis.get("macs"),
            estimates=estimates,
            details={**result.details, "analysis": analysis},
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


def _shape(value) -> tuple[int, ...] | None:
    return tuple(int(v) for v in value) if value else None
