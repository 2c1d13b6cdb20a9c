"""The JSON API of /work/shared/API.md: thin views over services, output from to_dict().

The API is for scripts, so it is CSRF-exempt; token authentication comes with accounts,
and `_get_experiment_for_user` is where the ownership check will go.
"""
from __future__ import annotations

import json
from functools import wraps

from django.http import FileResponse, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from optimization.base import TECHNIQUES

from . import services, storage
from .forms import ExperimentForm, UploadForm
from .models import Experiment, ModelFile, Recommendation


def error(message: str, status: int = 400) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


def form_error(form) -> JsonResponse:
    messages = [f"{name}: {' '.join(errors)}" if name != "__all__" else " ".join(errors)
                for name, errors in form.errors.items()]
    return error("; ".join(messages))


def api_view(*methods: str):
    """CSRF-exempt, JSON 405 for other methods, ServiceError -> its status."""

    def decorator(view):
        @csrf_exempt
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if request.method not in methods:
                response = error(f"{request.method} is not allowed here; use {' or '.join(methods)}", 405)
                response["Allow"] = ", ".join(methods)
                return response
            try:
                return view(request, *args, **kwargs)
            except services.ServiceError as exc:
                return error(exc.message, exc.status)

        return wrapper

    return decorator


def _get_experiment_for_user(request, experiment_id: int) -> Experiment:
    """The one lookup every endpoint uses: 404 for an unknown id (and, with accounts, for
    an experiment that is not the user's)."""
    experiment = services.visible_experiments(request.user).filter(pk=experiment_id).first()
    if experiment is None:
        raise services.ServiceError(f"experiment {experiment_id} does not exist", 404)
    return experiment


def not_found(request, exception=None):
    """handler404: JSON under /api/, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return error(f"{request.path} does not exist", 404)
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


@api_view("GET")
def experiment_list(request):
    experiments = services.visible_experiments(request.user)
    return JsonResponse({"experiments": [experiment.to_dict() for experiment in experiments]})


@api_view("POST")
def experiment_create(request):
    try:
        body = json.loads(request.body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return error(f"the body must be JSON: {exc}")
    if not isinstance(body, dict):
        return error("the body must be a JSON object")
    form = ExperimentForm(data=body)
    if not form.is_valid():
        return form_error(form)
    experiment = services.create_experiment(form.cleaned_data)
    return JsonResponse(experiment.to_dict(), status=201)


@api_view("GET", "DELETE")
def experiment_detail(request, experiment_id: int):
    experiment = _get_experiment_for_user(request, experiment_id)
    if request.method == "DELETE":
        services.delete_experiment(experiment)
        return HttpResponse(status=204)
    return JsonResponse(experiment.to_dict())


@api_view("POST")
def experiment_upload(request, experiment_id: int):
    experiment = _get_experiment_for_user(request, experiment_id)
    # Refuse a too-large body before Django reads it (a little slack for the form fields).
    if int(request.META.get("CONTENT_LENGTH") or 0) > services.max_upload_bytes() + 64 * 1024:
        return error(f"uploads are limited to {services.max_upload_bytes() // 2**20} MB", 413)
    form = UploadForm(request.POST, request.FILES)
    if not form.is_valid():
        return form_error(form)
    data = form.cleaned_data
    services.upload(experiment, data["file"], data["kind"] or "model", data["input_shape"], data["architecture"])
    experiment.refresh_from_db()
    return JsonResponse(experiment.to_dict())


@api_view("POST")
def experiment_start(request, experiment_id: int):
    experiment = _get_experiment_for_user(request, experiment_id)
    services.start_experiment(experiment)
    return JsonResponse({"id": experiment.pk, "status": experiment.status}, status=202)


@api_view("POST")
def experiment_stop(request, experiment_id: int):
    experiment = _get_experiment_for_user(request, experiment_id)
    return JsonResponse({"id": experiment.pk, "status": services.stop_experiment(experiment)}, status=202)


@api_view("GET")
def experiment_results(request, experiment_id: int):
    experiment = _get_experiment_for_user(request, experiment_id)
    recommendation = Recommendation.objects.filter(experiment=experiment).first()
    return JsonResponse({
        "id": experiment.pk,
        "status": experiment.status,
        "error": experiment.error or None,
        "target_device": experiment.target_device,
        "constraints": experiment.constraints,
        "baseline": experiment.baseline,
        "runs": [run.to_dict() for run in experiment.runs.order_by("id")],
        "recommendation": recommendation.to_dict() if recommendation else None,
    })


@api_view("GET")
def experiment_recommendation(request, experiment_id: int):
    experiment = _get_experiment_for_user(request, experiment_id)
    if not experiment.is_finished:
        return error(f"the experiment is {experiment.status}; the recommendation comes when it has finished", 409)
    recommendation = Recommendation.objects.filter(experiment=experiment).first()
    if recommendation is None:
        return error(f"no recommendation: the experiment {experiment.status} before one was made", 404)
    return JsonResponse(recommendation.to_dict())


@api_view("GET")
def experiment_download(request, experiment_id: int, technique: str):
    """The deploy artifact of a technique; ?format=native for the framework's own file.
    `baseline` serves the original model (?format=deploy: its FP32 deploy export)."""
    experiment = _get_experiment_for_user(request, experiment_id)
    # Validated against the known names before any path is built from it.
    if technique != "baseline" and technique not in TECHNIQUES:
        return error(f"unknown technique {technique!r}; use baseline or one of {', '.join(TECHNIQUES)}", 404)
    wanted = request.GET.get("format", "")
    if technique == "baseline":
        stored = (experiment.files.filter(role=ModelFile.Role.BASELINE, kind=ModelFile.Kind.DEPLOY).first()
                  if wanted == "deploy" else experiment.source_model())
    else:
        kind = ModelFile.Kind.NATIVE if wanted == "native" else ModelFile.Kind.DEPLOY
        stored = experiment.files.filter(role=ModelFile.Role.OPTIMIZED, technique=technique, kind=kind).first()
    if stored is None:
        return error(f"experiment {experiment.pk} has no {wanted or 'deploy'} file for {technique}", 404)
    try:
        path = stored.absolute_path()
    except storage.StorageError:
        return error("the stored file is outside the storage folder", 404)
    if not path.is_file():
        return error(f"the {technique} file is missing from storage", 404)
    filename = f"{storage.upload_stem(experiment.pk, experiment.name)}_{technique}.{stored.format}"
    return FileResponse(open(path, "rb"), as_attachment=True, filename=filename)
