"""The HTMX pages: setup, monitor, results. Thin: the work is in services, the state in
the models; the monitor's live part is one partial that the WebSocket re-renders. Every
page needs a login, and shows only the user's own experiments (another's is a 404)."""
from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from . import services
from .forms import SetupForm
from .models import Experiment, ExperimentProgress, OptimizationRun, Recommendation

PROGRESS_PARTIAL = "experiments/partials/progress.html"
CHART_WIDTH, CHART_HEIGHT, CHART_MARGIN = 560, 280, 48


def _get_experiment_for_user(request, experiment_id: int) -> Experiment:
    """The pages' 404; the API answers the same lookup with a JSON 404."""
    return get_object_or_404(services.visible_experiments(request.user), pk=experiment_id)


def progress_context(experiment: Experiment) -> dict:
    """What the progress partial shows: overall state plus one bar per technique."""
    progress = ExperimentProgress.objects.filter(experiment=experiment).first()
    runs = {run.technique: run for run in experiment.runs.all()}
    rows = []
    for name in experiment.techniques:
        run = runs.get(name)
        status = run.status if run else OptimizationRun.Status.PENDING
        if run and run.status in OptimizationRun.FINISHED:
            fraction = 1.0
        elif run and progress and progress.technique == name:
            fraction = progress.technique_progress
        else:
            fraction = 0.0
        rows.append({"name": name, "status": status, "percent": round(fraction * 100), "run": run})
    return {
        "experiment": experiment,
        "progress": progress,
        "overall_percent": round((progress.overall_progress if progress else 0.0) * 100),
        "technique_rows": rows,
    }


def render_progress(experiment: Experiment) -> str:
    return render_to_string(PROGRESS_PARTIAL, progress_context(experiment))


@login_required
@require_http_methods(["GET", "POST"])
def setup(request):
    if request.method == "POST":
        form = SetupForm(request.POST, request.FILES)
        if form.is_valid():
            data = form.cleaned_data
            try:
                experiment = services.create_and_start(data, data.get("model_file"), data.get("dataset_file"),
                                                      owner=request.user)
            except services.ServiceError as exc:
                form.add_error(exc.field if exc.field in form.fields else None, exc.message)
            else:
                return redirect("experiments:monitor", experiment_id=experiment.pk)
    else:
        form = SetupForm()
    experiments = services.visible_experiments(request.user)[:50]
    return render(request, "experiments/setup.html", {"form": form, "experiments": experiments},
                  status=400 if form.errors else 200)


@login_required
@require_GET
def monitor(request, experiment_id: int):
    experiment = _get_experiment_for_user(request, experiment_id)
    return render(request, "experiments/monitor.html", progress_context(experiment))


@login_required
@require_POST
def stop(request, experiment_id: int):
    experiment = _get_experiment_for_user(request, experiment_id)
    try:
        services.stop_experiment(experiment)
    except services.ServiceError:
        pass  # already finished: the re-rendered panel shows that
    experiment.refresh_from_db()
    if request.htmx:
        return HttpResponse(render_progress(experiment))
    return redirect("experiments:monitor", experiment_id=experiment.pk)


def _constraint_checks(experiment: Experiment, run: OptimizationRun) -> list[dict]:
    return [{"name": name, "limit": limit, "met": run.constraints_met.get(name)}
            for name, limit in experiment.constraints.items()]


def accuracy_size_chart(baseline: dict, runs: list[OptimizationRun]) -> dict | None:
    """Points for an accuracy-against-size plot, the Pareto front marked: a result is on it
    when no other is at least as small and as accurate, and better in one of the two."""
    points = [{"label": "baseline", "size": baseline.get("size_bytes"), "accuracy": baseline.get("accuracy")}]
    points += [{"label": run.technique, "size": run.size_bytes, "accuracy": run.accuracy}
               for run in runs if run.status == OptimizationRun.Status.COMPLETED]
    points = [p for p in points if p["size"] and p["accuracy"] is not None]
    if len(points) < 2:
        return None

    def dominates(a, b):
        return a["size"] <= b["size"] and a["accuracy"] >= b["accuracy"] and (a["size"], a["accuracy"]) != (
            b["size"], b["accuracy"])

    largest = max(p["size"] for p in points)
    low, high = min(p["accuracy"] for p in points), max(p["accuracy"] for p in points)
    span = (high - low) or 0.01
    inner_w, inner_h = CHART_WIDTH - 2 * CHART_MARGIN, CHART_HEIGHT - 2 * CHART_MARGIN
    for p in points:
        p["front"] = not any(dominates(q, p) for q in points)
        p["x"] = round(CHART_MARGIN + p["size"] / largest * inner_w, 1)
        p["y"] = round(CHART_HEIGHT - CHART_MARGIN - (p["accuracy"] - low) / span * inner_h, 1)
        right_half = p["x"] > CHART_WIDTH / 2  # labels point inwards so they stay inside the plot
        p["label_x"], p["anchor"] = (p["x"] - 8, "end") if right_half else (p["x"] + 8, "start")
    front = sorted((p for p in points if p["front"]), key=lambda p: p["size"])
    return {
        "points": points,
        "front": " ".join(f"{p['x']},{p['y']}" for p in front),
        "width": CHART_WIDTH, "height": CHART_HEIGHT, "margin": CHART_MARGIN,
        "bottom": CHART_HEIGHT - CHART_MARGIN, "right": CHART_WIDTH - CHART_MARGIN,
        "largest": largest, "low": low, "high": high,
    }


@login_required
@require_GET
def results(request, experiment_id: int):
    experiment = _get_experiment_for_user(request, experiment_id)
    runs = list(experiment.runs.order_by("id"))
    rows = [{"run": run, "constraints": _constraint_checks(experiment, run), "artifacts": run.artifact_files()}
            for run in runs]
    return render(request, "experiments/results.html", {
        "experiment": experiment,
        "baseline": experiment.baseline or {},
        "rows": rows,
        "chart": accuracy_size_chart(experiment.baseline or {}, runs),
        "recommendation": Recommendation.objects.filter(experiment=experiment).first(),
        "has_baseline_deploy": experiment.files.filter(role="baseline", kind="deploy").exists(),
    })
