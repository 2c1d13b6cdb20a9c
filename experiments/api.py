"""The JSON API of /work/shared/API.md: thin views over services, output from to_dict().

Every view goes through `api_view`: a session or an API token (401 otherwise), Django's
CSRF check for session requests that change something, and `_get_experiment_for_user`,
which looks experiments up through `services.visible_experiments` (another user's is a 404).
"""
from __future__ import annotations

import json
import math
from functools import wraps

from django import forms
from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.http import FileResponse, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from optimization import catalog
from optimization.base import TECHNIQUES

from . import auth, services, storage
from .forms import ExperimentForm, UploadForm
from .models import Experiment, ModelFile, Recommendation


def error(message: str, status: int = 400) -> JsonResponse:
    return JsonResponse({"error": message}, status=status)


def form_error(form) -> JsonResponse:
    messages = [f"{name}: {' '.join(errors)}" if name != "__all__" else " ".join(errors)
                for name, errors in form.errors.items()]
    return error("; ".join(messages))


def api_view(*methods: str):
    """JSON 405 for other methods; 401 without a session or a valid token; 403 for a
    session request that changes something without the CSRF token; ServiceError -> its
    status. Exempt from the CSRF middleware only because token requests skip the check:
    it is made here for session requests instead."""

    def decorator(view):
        @csrf_exempt
        @wraps(view)
        def wrapper(request, *args, **kwargs):
            if request.method not in methods:
                response = error(f"{request.method} is not allowed here; use {' or '.join(methods)}", 405)
                response["Allow"] = ", ".join(methods)
                return response
            try:
                request.user, by_token = auth.api_user(request)
            except auth.NotAuthenticated as exc:
                response = error(str(exc), 401)
                response["WWW-Authenticate"] = "Bearer"
                return response
            try:  # the CSRF check is the first to parse a form
                if not by_token and (reason := auth.csrf_failure(request)):
                    return error(f"CSRF check failed ({reason}): a page sends the CSRF token in the X-CSRFToken "
                                 "header; a script sends `Authorization: Bearer <token>` instead of a session", 403)
                return view(request, *args, **kwargs)
            except services.ServiceError as exc:
                return error(exc.message, exc.status)
            except FORM_LIMIT_ERRORS as exc:  # here, not only in handler400: with DEBUG on that is a debug page
                return bad_request(request, exc)

        return wrapper

    return decorator


class BadJSON(ValueError):
    """The body is not JSON this API takes; the message says why."""


def _refuse_constant(name: str):
    raise BadJSON(f"{name} is not a number JSON allows; send a finite number or leave the field out")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadJSON(f"{text} is too large to be a number here; send a finite number")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise BadJSON(f"a number of {len(text)} digits is too large here; send at most {MAX_INT_DIGITS} digits")
    return int(text)


def _refuse_duplicate_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    if duplicates := sorted({key for key in keys if keys.count(key) > 1}):
        raise BadJSON(f"the field(s) {', '.join(duplicates)} appear more than once; send each field once")
    return dict(pairs)


MAX_INT_DIGITS = 30


def parse_json_object(request, allowed_fields) -> dict:
    """The request's body as a JSON object whose keys are all in `allowed_fields`.

    Refuses (as ServiceError) what json.loads would let through or crash on: a Content-Type
    other than JSON (415), NaN/Infinity and numbers that overflow to infinity, nesting deep
    enough to exhaust the parser's recursion, and unknown fields, which a typo would
    otherwise silently drop, duplicate keys (which one would count?) and integers long enough
    to make int() itself refuse."""
    content_type = request.content_type or ""
    if request.body and content_type != "application/json":
        raise services.ServiceError(
            f"the body must be JSON sent as Content-Type: application/json, not {content_type or 'no type'}", 415)
    try:
        body = json.loads(request.body or b"{}", parse_constant=_refuse_constant, parse_float=_finite_float,
                          parse_int=_bounded_int, object_pairs_hook=_refuse_duplicate_keys)
    except BadJSON as exc:
        raise services.ServiceError(str(exc)) from None
    except RecursionError:
        raise services.ServiceError("the JSON body is nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise services.ServiceError(f"the body must be JSON: {exc}") from None
    if not isinstance(body, dict):
        raise services.ServiceError("the body must be a JSON object")
    if unknown := sorted(set(body) - set(allowed_fields)):
        raise services.ServiceError(
            f"unknown field(s) {', '.join(unknown)}; the allowed fields are {', '.join(sorted(allowed_fields))}")
    return body


def _check_json_types(body: dict, fields) -> None:
    """Forms coerce what a page posts (all strings); a script's JSON must already have the
    right type, so `"name": 7` or `"techniques": "qat"` is a 400, not a silent conversion."""
    for name, value in body.items():
        field = fields[name]
        if value is None or isinstance(field, forms.JSONField):  # checked by its own validator
            continue
        if isinstance(field, forms.MultipleChoiceField):
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise services.ServiceError(f"{name} must be a list of names, e.g. [\"ptq_int8\", \"qat\"]")
        elif isinstance(field, (forms.CharField, forms.ChoiceField)) and not isinstance(value, str):
            raise services.ServiceError(f"{name} must be a string, not {type(value).__name__}")
        elif isinstance(field, forms.FloatField) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise services.ServiceError(f"{name} must be a number, not {type(value).__name__}")


def _get_experiment_for_user(request, experiment_id: int) -> Experiment:
    """The one lookup every endpoint uses: 404 for an unknown id and for another user's
    experiment alike, so the answer does not tell that it exists."""
    experiment = services.visible_experiments(request.user).filter(pk=experiment_id).first()
    if experiment is None:
        raise services.ServiceError(f"experiment {experiment_id} does not exist", 404)
    return experiment


FORM_LIMIT_ERRORS = (TooManyFieldsSent, TooManyFilesSent, RequestDataTooBig)


def bad_request(request, exception=None):
    """handler400: JSON under /api/, Django's page elsewhere. Django raises the form limit
    errors wherever the body is first parsed (the CSRF check or the view)."""
    if not request.path.startswith("/api/"):
        from django.views.defaults import bad_request as bad_request_page

        return bad_request_page(request, exception)
    if isinstance(exception, TooManyFieldsSent):
        return error(f"the form has more than {settings.DATA_UPLOAD_MAX_NUMBER_FIELDS} fields; an upload sends "
                     "file and, at most, kind, input_shape and architecture")
    if isinstance(exception, TooManyFilesSent):
        return error(f"the form has more than {settings.DATA_UPLOAD_MAX_NUMBER_FILES} files; send one file "
                     "per upload")
    if isinstance(exception, RequestDataTooBig):
        return error(f"the form fields are larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes; send the "
                     "model or dataset as the file field", 413)
    return error("the request could not be read; send JSON (application/json) or, for an upload, "
                 "multipart/form-data")


def not_found(request, exception=None):
    """handler404: JSON under /api/, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return error(f"{request.path} does not exist", 404)
    from django.views.defaults import page_not_found

    return page_not_found(request, exception)


@api_view("GET")
def catalog_view(request):
    """What the form is built from: techniques and their typed options, constraints, goals,
    devices, plans, file suffixes and the result vocabulary (`?framework=` flattens options)."""
    try:
        return JsonResponse(catalog.as_dict(request.GET.get("framework") or None))
    except catalog.OptionError as exc:
        return error(str(exc))


@api_view("GET")
def experiment_list(request):
    experiments = services.visible_experiments(request.user)
    return JsonResponse({"experiments": [experiment.to_dict() for experiment in experiments]})


@api_view("POST")
def experiment_create(request):
    body = parse_json_object(request, ExperimentForm.base_fields)
    _check_json_types(body, ExperimentForm.base_fields)
    form = ExperimentForm(data=body)
    if not form.is_valid():
        return form_error(form)
    experiment = services.create_experiment(form.cleaned_data, owner=request.user)
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
    if request.content_type != "multipart/form-data":
        return error("uploads must be multipart/form-data, as `curl -F file=@model.pt2` sends them", 415)
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


DOWNLOAD_FORMATS = ("", "deploy", "native")


@api_view("GET")
def experiment_download(request, experiment_id: int, technique: str):
    """The deploy artifact of a technique; ?format=native for the framework's own file.
    `baseline` serves the original model (?format=deploy: its FP32 deploy export)."""
    experiment = _get_experiment_for_user(request, experiment_id)
    # Validated against the known names before any path is built from it.
    if technique != "baseline" and technique not in TECHNIQUES:
        return error(f"unknown technique {technique!r}; use baseline or one of {', '.join(TECHNIQUES)}", 404)
    wanted = request.GET.get("format", "")
    if wanted not in DOWNLOAD_FORMATS:
        return error(f"unknown format {wanted!r}; use format=native for the framework's own file, "
                     "format=deploy (or none) for the deploy file", 400)
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


@api_view("GET")
def experiment_bundle(request, experiment_id: int, technique: str):
    """A zip to deploy and re-measure one result on the board (see experiments/bundle.py)."""
    from .bundle import BundleError, build_bundle

    experiment = _get_experiment_for_user(request, experiment_id)
    try:
        bundle, filename = build_bundle(experiment, technique)
    except BundleError as exc:
        return error(exc.message, exc.status)
    return FileResponse(bundle, as_attachment=True, filename=filename, content_type="application/zip")
