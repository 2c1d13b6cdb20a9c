"""The HTMX pages: setup, the experiments list, monitor, results. Thin: the work is in
services, the state in the models, the wording in presenters; the monitor's live part is one
partial that the WebSocket re-renders. Every page needs a login, and shows only the user's
own experiments (another's is a 404)."""
from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.template.loader import render_to_string
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from optimization import catalog

from . import presenters, services, storage
from .forms import SetupForm
from .models import FRAMEWORK_CHOICES, Experiment, ExperimentProgress, ModelFile, OptimizationRun, Recommendation

PROGRESS_PARTIAL = "experiments/partials/progress.html"
# optimization.demo's names (importing that module would load the engine's backends here)
DEMO_MODEL, DEMO_DATASET = "digits_cnn", "digits"


def _get_experiment_for_user(request, experiment_id: int) -> Experiment:
    """The pages' 404; the API answers the same lookup with a JSON 404."""
    return get_object_or_404(services.visible_experiments(request.user), pk=experiment_id)


def progress_context(experiment: Experiment, live: bool = False) -> dict:
    """What the progress partial shows: overall state, one bar per technique with its
    planned estimate, and the finished results for the live chart. `live`: rendered for the
    socket, so the parts outside the panel travel as out-of-band swaps."""
    progress = ExperimentProgress.objects.filter(experiment=experiment).first()
    runs = {run.technique: run for run in experiment.runs.all()}
    estimates = {step["technique"]: step.get("estimate_s") for step in (progress.steps if progress else [])}
    running = experiment.is_active and progress is not None and progress.status == Experiment.Status.RUNNING
    rows = []
    for name in experiment.techniques:
        run = runs.get(name)
        status = run.status if run else OptimizationRun.Status.PENDING
        current = running and progress.technique == name and status == OptimizationRun.Status.RUNNING
        if run and run.status in OptimizationRun.FINISHED:
            fraction = 1.0
        elif current:
            fraction = progress.technique_progress
        else:
            fraction = 0.0
        if status == OptimizationRun.Status.PENDING and experiment.is_finished:
            status = "not run"  # the experiment ended before it: it will never run
        rows.append({"name": name, "status": status, "percent": round(fraction * 100), "run": run,
                     "current": current, "estimate_s": estimates.get(name),
                     # a silent phase (exporting, converting, measuring): show activity, not a stuck bar
                     "busy": current and fraction in (0.0, 1.0)})
    baseline_current = running and progress.technique == "baseline"
    step = None
    if running and progress.technique:
        step = {"number": progress.technique_index + 1, "count": progress.technique_count + 1,
                "name": progress.technique, "percent": round(progress.technique_progress * 100)}
    live_points = presenters.chart_data(
        experiment.baseline or {}, [run.to_dict() for run in runs.values()], experiment.constraints, None)
    return {
        "experiment": experiment,
        "progress": progress,
        "overall_percent": round((progress.overall_progress if progress else 0.0) * 100),
        "technique_rows": rows,
        "baseline_current": baseline_current,
        "baseline_estimate_s": estimates.get("baseline"),
        "step": step,
        "waiting": experiment.is_active and not step,
        "live": live,
        "live_points": live_points["points"] if live_points else [],
        "show_message": bool(progress and progress.message and progress.message != experiment.error),
    }


def render_progress(experiment: Experiment) -> str:
    return render_to_string(PROGRESS_PARTIAL, progress_context(experiment, live=True))


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
        form = SetupForm(initial=_setup_defaults(request.user))
    pretrained = [{"framework": framework, "label": label, "names": list(storage.pretrained_models(framework))}
                  for framework, label in FRAMEWORK_CHOICES]
    framework = form["framework"].value() or FRAMEWORK_CHOICES[0][0]
    chosen = form["techniques"].value() or []
    return render(request, "experiments/setup.html", {
        "form": form, "pretrained": pretrained,
        # one line of what each technique does and what it costs, from the catalog
        "techniques": catalog.as_dict(framework if framework in catalog.FRAMEWORKS else None)["techniques"],
        "chosen_techniques": chosen if isinstance(chosen, list) else [chosen],
        "error_count": sum(len(errors) for errors in form.errors.values()),
    }, status=400 if form.errors else 200)


def _setup_defaults(user) -> dict:
    """A new user starts from the demo: its model and dataset are ready to run."""
    if services.visible_experiments(user).exists() or DEMO_MODEL not in storage.pretrained_models("pytorch"):
        return {}
    return {"framework": "pytorch", "pretrained_model": DEMO_MODEL, "dataset": DEMO_DATASET,
            "name": "digits demo"}


def _best_result(experiment: Experiment) -> dict | None:
    recommendation = getattr(experiment, "recommendation", None)
    if recommendation is None or not recommendation.technique:
        return None
    run = next((r for r in experiment.runs.all() if r.technique == recommendation.technique), None)
    return {"technique": recommendation.technique, "satisfied": recommendation.satisfied, "run": run}


@login_required
@require_GET
def experiment_list(request):
    experiments = list(services.visible_experiments(request.user)
                       .select_related("recommendation").prefetch_related("runs", "files")[:200])
    sources = (ModelFile.Role.UPLOAD, ModelFile.Role.PRETRAINED)
    rows = [{"experiment": e, "model": next((f for f in e.files.all() if f.role in sources), None),
             "best": _best_result(e), "resumable": e.status in Experiment.RESUMABLE} for e in experiments]
    return render(request, "experiments/list.html", {"rows": rows})


@login_required
@require_GET
def monitor(request, experiment_id: int):
    experiment = _get_experiment_for_user(request, experiment_id)
    return render(request, "experiments/monitor.html", progress_context(experiment))


@login_required
@require_POST
def stop(request, experiment_id: int):
    """Stop from the page: a plain form post (works without JavaScript) or htmx."""
    experiment = _get_experiment_for_user(request, experiment_id)
    try:
        services.stop_experiment(experiment)
    except services.ServiceError:
        pass  # already finished: the re-rendered panel shows that
    experiment.refresh_from_db()
    if request.htmx:
        return HttpResponse(render_progress(experiment))
    return redirect("experiments:monitor", experiment_id=experiment.pk)


@login_required
@require_POST
def rerun(request, experiment_id: int):
    """A new experiment with the same settings and files, started at once."""
    experiment = _get_experiment_for_user(request, experiment_id)
    try:
        clone = services.clone_experiment(experiment)
        services.start_experiment(clone)
    except services.ServiceError as exc:
        messages.error(request, f"Could not run #{experiment.pk} again: {exc.message}")
        return redirect("experiments:list")
    return redirect("experiments:monitor", experiment_id=clone.pk)


@login_required
@require_POST
def resume(request, experiment_id: int):
    """Run the techniques a stopped or failed experiment did not finish; the rest are kept."""
    experiment = _get_experiment_for_user(request, experiment_id)
    try:
        services.resume_experiment(experiment)
    except services.ServiceError as exc:
        messages.error(request, f"Could not resume #{experiment.pk}: {exc.message}")
        return redirect("experiments:list")
    return redirect("experiments:monitor", experiment_id=experiment.pk)


def _constraint_checks(experiment: Experiment, run: OptimizationRun) -> list[dict]:
    return [{"name": name, "limit": limit, "met": run.constraints_met.get(name)}
            for name, limit in experiment.constraints.items()]


def _result_row(experiment: Experiment, run: OptimizationRun, baseline: dict, files: dict) -> dict:
    data = run.to_dict()
    sentences, other_details = presenters.describe_details(run.details)
    samples = presenters.accuracy_samples(data) or presenters.accuracy_samples(baseline)
    downloads = [{"kind": kind, "label": presenters.download_label(kind, stored.format, run.details),
                  "size": stored.size_bytes} for kind, stored in sorted(files.items())]
    return {
        "run": run,
        "constraints": _constraint_checks(experiment, run),
        "downloads": downloads,
        "sentences": sentences,
        "other_details": other_details,
        "accuracy_n": samples,
        "accuracy_ci": presenters.accuracy_interval(data, samples),
        "speedup_range": presenters.speedup_range(data),
        "latency_range": presenters.latency_range(data),
        "within_noise": presenters.speedup_within_noise(data, baseline),
        "precision": presenters.precision_word(run.details),
    }


def _layers(analysis: dict | None) -> list[dict]:
    return list((analysis or {}).get("layers") or [])


@login_required
@require_GET
def results(request, experiment_id: int):
    experiment = _get_experiment_for_user(request, experiment_id)
    baseline = experiment.baseline or {}
    runs = list(experiment.runs.order_by("id"))
    files: dict[str, dict] = {}
    for stored in experiment.files.filter(role="optimized"):
        files.setdefault(stored.technique, {})[stored.kind] = stored
    rows = [_result_row(experiment, run, baseline, files.get(run.technique, {})) for run in runs]
    completed = [row for row in rows if row["run"].status == OptimizationRun.Status.COMPLETED]
    by_name = {row["run"].technique: row for row in completed}
    recommendation = Recommendation.objects.filter(experiment=experiment).first()
    ran = {run.technique for run in runs}
    # Per-layer view and comparison: chosen in plain GET forms, so they work without JavaScript.
    layers_of = request.GET.get("layers") or (recommendation.technique if recommendation else "") or \
        next(iter(by_name), "")
    compare = [name for name in request.GET.getlist("compare") if name in by_name][:2]
    if len(compare) < 2:
        compare = list(by_name)[:2]
    baseline_samples = presenters.accuracy_samples(baseline)
    return render(request, "experiments/results.html", {
        "experiment": experiment,
        "baseline": baseline,
        "baseline_range": presenters.latency_range(baseline),
        "baseline_ci": presenters.accuracy_interval(baseline, baseline_samples),
        "baseline_n": baseline_samples,
        "rows": rows,
        "not_run": [name for name in experiment.techniques if name not in ran],
        "chart": presenters.chart_data(baseline, [run.to_dict() for run in runs], experiment.constraints,
                                       recommendation.technique if recommendation else None),
        "recommendation": recommendation,
        "reasoning": presenters.reasoning_parts(recommendation.reasoning) if recommendation else [],
        "has_baseline_deploy": experiment.files.filter(role="baseline", kind="deploy").exists(),
        "completed_names": list(by_name),
        "layers_of": layers_of if layers_of in by_name else "",
        "baseline_layers": _layers(experiment.analysis),
        "run_layers": _layers((by_name[layers_of]["run"].details or {}).get("analysis")) if layers_of in by_name else [],
        "compare": [by_name[name] for name in compare] if len(compare) == 2 else [],
        "resumable": experiment.status in Experiment.RESUMABLE,
    })
