"""What the JSON API and the pages both do: create, upload, start, stop, delete.

Errors are ServiceError(message, status, field): the API turns them into {"error": ...},
the pages into form errors. Nothing here imports torch or tensorflow: uploads are checked
by extension, size, magic bytes and the engine's static (stdlib / h5py) checks.
"""
from __future__ import annotations

import hashlib
import math
import tempfile
import uuid
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Sum

from optimization import catalog
from optimization.base import TECHNIQUES, InvalidInputError, UnsafeModelError
from optimization.catalog import DATASET_SUFFIXES, IMAGE_SUFFIXES, MODEL_SUFFIXES
from optimization.safety.archives import check_zip_archive, safe_extract_zip
from optimization.safety.images import check_zipped_images
from optimization.safety.savedmodel_check import check_saved_model_ops
from optimization.zoo.layouts import check_architecture_name

from . import storage
from .models import Experiment, ExperimentProgress, InvalidTransition, ModelFile

UPLOAD_KINDS = ("model", "dataset")
FRAMEWORK_LABELS = {"pytorch": "PyTorch", "tensorflow": "TensorFlow"}
MAGIC = {
    "zip": b"PK\x03\x04",
    "hdf5": b"\x89HDF\r\n\x1a\n",
}
# What each suffix must contain. ONNX is a protobuf ModelProto whose first field is
# ir_version (field 1, varint): byte 0x08.
EXPECTED_CONTENT = {
    ".pt2": ("zip",),
    ".pt": ("zip",),
    ".pth": ("zip", "pickle"),
    ".onnx": ("onnx",),
    ".keras": ("zip",),
    ".h5": ("hdf5",),
    ".zip": ("zip",),
    ".npz": ("zip",),
}
CONTENT_WORDS = {"zip": "a zip archive", "hdf5": "an HDF5 file", "pickle": "a pickle", "onnx": "an ONNX model"}
CHUNK = 1024 * 1024


class ServiceError(Exception):
    def __init__(self, message: str, status: int = 400, field: str | None = None):
        super().__init__(message)
        self.message, self.status, self.field = message, status, field


@contextmanager
def storage_failures_as_service_errors():
    """Storage's write and removal errors (full: 507, read-only or denied: 503) reach the
    API and the pages as ServiceError, with storage's path-free message."""
    try:
        yield
    except storage.StorageWriteError as exc:
        raise ServiceError(exc.message, exc.status) from None


def visible_experiments(user, *, staff_sees_all: bool = False):
    """The experiments `user` may see: the one place that scopes by owner. The API, the
    pages, the downloads and the WebSocket look experiments up only through it, so another
    user's experiment is "not found" everywhere. Only the admin passes `staff_sees_all`."""
    experiments = Experiment.objects.select_related("progress", "owner")
    if user is None or not user.is_authenticated:
        return experiments.none()
    if staff_sees_all and user.is_staff:
        return experiments
    return experiments.filter(owner=user)


def max_upload_bytes() -> int:
    return settings.EDGEOPT_MAX_UPLOAD_MB * 1024 * 1024


def max_dataset_bytes() -> int:
    return settings.EDGEOPT_MAX_DATASET_MB * 2**20


# -- uploads -------------------------------------------------------------------------------


@dataclass
class CheckedUpload:
    """An upload that passed every check, waiting in storage's temp folder to be placed."""

    kind: str
    suffix: str
    temp_path: Path
    size_bytes: int
    sha256: str
    options: dict = field(default_factory=dict)  # input_shape / architecture for the config

    def discard(self) -> None:
        self.temp_path.unlink(missing_ok=True)


def allowed_suffixes(framework: str, kind: str) -> tuple[str, ...]:
    return MODEL_SUFFIXES[framework] if kind == "model" else DATASET_SUFFIXES


def check_upload(framework: str, uploaded, kind: str = "model", input_shape: str = "",
                 architecture: str = "", experiment_config: dict | None = None) -> CheckedUpload:
    """Copy the upload into storage's temp folder and check it; raise ServiceError (400 or
    413) and keep nothing when it is refused. `experiment_config` is what the experiment
    already knows (its input_shape), which the file must agree with."""
    kind = kind or "model"
    if kind not in UPLOAD_KINDS:
        raise ServiceError(f"kind must be 'model' or 'dataset', not {kind!r}", field="kind")
    suffix = Path(uploaded.name or "").suffix.lower()
    allowed = allowed_suffixes(framework, kind)
    what = f"a {FRAMEWORK_LABELS[framework]} model" if kind == "model" else "a dataset"
    if suffix not in allowed:
        raise ServiceError(f"{what} must be one of {', '.join(allowed)}; got {uploaded.name!r}", field="file")
    if uploaded.size > max_upload_bytes():
        raise ServiceError(
            f"the file is {uploaded.size / 2**20:.1f} MB; uploads are limited to "
            f"{settings.EDGEOPT_MAX_UPLOAD_MB} MB", status=413, field="file")
    options = _model_options(suffix, input_shape, architecture) if kind == "model" else {}
    known_shape = options.get("input_shape") or (experiment_config or {}).get("input_shape")

    digest = hashlib.sha256()

    def hashed_chunks():
        for chunk in uploaded.chunks(CHUNK):
            digest.update(chunk)
            yield chunk

    with storage_failures_as_service_errors():
        temp_path = storage.temp_dir() / f"upload-{uuid.uuid4().hex}{suffix}"
        size = storage.atomic_write(temp_path, hashed_chunks(), action="save the upload")
    try:
        if size == 0:
            raise ServiceError(f"{uploaded.name!r} is empty", field="file")
        _check_content(temp_path, suffix, kind, framework, uploaded.name, options, known_shape)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return CheckedUpload(kind, suffix, temp_path, size, digest.hexdigest(), options)


# 64 MiB of float32 per sample: larger shapes are typos, or a way to exhaust the worker's memory.
MAX_SAMPLE_ELEMENTS = 2**24


def parse_input_shape(text) -> list[int]:
    """"1,8,8" or [1, 8, 8] -> [1, 8, 8]: one sample's shape, without the batch."""
    parts = text if isinstance(text, list) else [p for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        shape = [int(p) for p in parts]
    except (TypeError, ValueError):
        shape = []
    if not 1 <= len(shape) <= 4 or any(n < 1 or n > 100_000 for n in shape):
        raise ServiceError(
            f"input_shape must be 1 to 4 positive integers like 1,28,28 (one sample, no batch); got {text!r}",
            field="input_shape")
    if math.prod(shape) > MAX_SAMPLE_ELEMENTS:
        raise ServiceError(
            f"input_shape {shape} is {math.prod(shape):,} values per sample; at most {MAX_SAMPLE_ELEMENTS:,} "
            "(e.g. 3,2048,2048) are accepted: the engine builds batches of that shape", field="input_shape")
    return shape


def _model_options(suffix: str, input_shape: str, architecture: str) -> dict:
    options = {}
    if input_shape:
        options["input_shape"] = parse_input_shape(input_shape)
    if architecture:
        try:
            check_architecture_name(architecture)
        except InvalidInputError as exc:
            raise ServiceError(str(exc), field="architecture") from None
        options["architecture"] = architecture
    if suffix == ".pth" and "architecture" not in options:
        raise ServiceError(
            "a .pth file holds only weights (a state_dict): name its architecture in the "
            "'architecture' field, or upload a torch.export .pt2 or TorchScript .pt instead",
            field="architecture")
    return options


def _sniff(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(8)
    for name, magic in MAGIC.items():
        if head.startswith(magic):
            return name
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if head[:1] == b"\x08":
        return "onnx"
    return "unknown"


def _check_content(path: Path, suffix: str, kind: str, framework: str, original_name: str,
                   options: dict, known_shape: list[int] | None) -> None:
    label = repr(original_name)
    expected = EXPECTED_CONTENT[suffix]
    if _sniff(path) not in expected:
        words = " or ".join(CONTENT_WORDS[c] for c in expected)
        raise ServiceError(f"{original_name!r} is not a valid {suffix} file: it should be {words}", field="file")
    if "zip" in expected and _sniff(path) == "zip":
        _check_zip_layout(path, suffix, kind, framework, original_name)
    try:
        if suffix == ".npz":
            from optimization.safety.npz_check import check_samples_fit, read_npz_headers

            headers = read_npz_headers(path, original_name, max_dataset_bytes())
            if known_shape:
                check_samples_fit(headers, known_shape, framework, original_name)
        elif suffix == ".onnx":
            from optimization.safety.onnx_check import check_onnx_file

            check_onnx_file(path, original_name)
        elif suffix in (".pt", ".pt2", ".pth"):
            from optimization.safety.pickle_scan import check_torch_archive

            check_torch_archive(path)
            _check_torch_file(path, suffix, label, options, known_shape)
        elif suffix in (".keras", ".h5"):
            from optimization.safety.keras_check import check_keras_file

            check_keras_file(path)
        elif suffix == ".zip" and kind == "model" and framework == "tensorflow":
            from optimization.safety.savedmodel_check import inspect_savedmodel_zip

            options.update(inspect_savedmodel_zip(path))  # e.g. post_training_only: why
    except (UnsafeModelError, InvalidInputError) as exc:
        raise ServiceError(str(exc).replace(path.name, original_name), field="file") from None


def _check_torch_file(path: Path, suffix: str, label: str, options: dict, known_shape) -> None:
    """A .pt must be TorchScript, which does not record its input shape; a .pt2 a torch.export
    archive; a .pth a state_dict of the architecture it names. All read without torch."""
    from optimization.safety.torch_files import state_dict_shapes, torch_file_kind
    from optimization.zoo.layouts import match_state_dict

    kind = torch_file_kind(path)
    if suffix == ".pt":
        if kind == "exported":
            raise InvalidInputError(f"{label} is a torch.export archive, not TorchScript: name it .pt2")
        if kind == "saved":
            raise InvalidInputError(
                f"{label} was written by torch.save, not torch.jit.save: upload a state_dict as .pth with "
                "its architecture, or save the model with torch.jit.save (.pt) or torch.export (.pt2)")
        if kind != "torchscript":
            raise InvalidInputError(f"{label} is not a TorchScript archive: save the model with torch.jit.save")
        if not known_shape:
            raise ServiceError(
                f"{label} is TorchScript, which does not record its input shape: give input_shape, one "
                "sample without the batch, e.g. 1,28,28 (or upload a torch.export .pt2, which records it)",
                field="input_shape")
    elif suffix == ".pt2" and kind in ("torchscript", "saved"):  # unknown layouts are the loader's call
        raise InvalidInputError(f"{label} is not a torch.export archive: save the model with torch.export.save "
                                "(a TorchScript file is a .pt, a state_dict a .pth)")
    elif suffix == ".pth":
        dims = match_state_dict(state_dict_shapes(path, label), options["architecture"], label)
        if known_shape and "in_channels" in dims and known_shape[0] != dims["in_channels"]:
            raise ServiceError(
                f"input_shape {list(known_shape)} starts with {known_shape[0]} channels but the weights in "
                f"{label} take {dims['in_channels']}: give input_shape as channels first, e.g. "
                f"{dims['in_channels']},32,32", field="input_shape")


def _check_zip_layout(path: Path, suffix: str, kind: str, framework: str, original_name: str) -> None:
    """Entries stay inside the archive, and the archive holds what its kind needs: a dataset
    class folders of images, a TensorFlow model a SavedModel, a PyTorch model one ONNX file
    whose external data are files beside it in the archive. The engine extracts with its own
    safe extractor; this refuses the obvious early."""
    try:
        members = check_zip_archive(path, repr(original_name))
    except (zipfile.BadZipFile, UnsafeModelError, InvalidInputError) as exc:
        message = str(exc) if not isinstance(exc, zipfile.BadZipFile) else f"{original_name!r} is not a readable zip archive"
        raise ServiceError(message, field="file") from None
    files = {PurePosixPath(m.filename) for m in members if not m.is_dir()}
    if suffix == ".zip" and kind == "dataset":
        images = [m.filename for m in members
                  if not m.is_dir() and PurePosixPath(m.filename).suffix.lower() in IMAGE_SUFFIXES]
        if len({PurePosixPath(name).parent.name for name in images}) < 2:
            raise ServiceError(
                f"{original_name!r} must be a zip of class folders of images (ImageFolder): "
                "at least two folders with .png/.jpg files", field="file")
        try:
            check_zipped_images(path, images, repr(original_name), max_dataset_bytes())
        except InvalidInputError as exc:
            raise ServiceError(str(exc), field="file") from None
    if suffix == ".zip" and kind == "model" and framework == "pytorch":
        _check_onnx_archive(path, [m.filename for m in members if not m.is_dir()], original_name)
    elif suffix == ".zip" and kind == "model":
        graphs = [m for m in members if PurePosixPath(m.filename).name == "saved_model.pb"]
        if not graphs:
            raise ServiceError(f"{original_name!r} is not a SavedModel: it has no saved_model.pb", field="file")
        try:
            with zipfile.ZipFile(path) as archive:
                for graph in graphs:
                    check_saved_model_ops(archive.read(graph), repr(original_name))
        except (UnsafeModelError, InvalidInputError) as exc:
            raise ServiceError(str(exc), field="file") from None


def _check_onnx_archive(path: Path, names: list[str], original_name: str) -> None:
    """The ONNX file of the archive passes the .onnx upload checks, its external data read
    only from files beside it in the archive. onnx's checker opens those files, so the archive
    is unpacked (by the safe extractor, under the archive limits just checked) to a temporary
    folder first."""
    from optimization.safety.onnx_check import check_onnx_file, onnx_archive_layout

    label = repr(original_name)
    try:
        model_name, beside = onnx_archive_layout(names, label)
        with tempfile.TemporaryDirectory(dir=storage.temp_dir()) as folder:
            safe_extract_zip(path, Path(folder))
            check_onnx_file(Path(folder) / model_name, f"{label} ({model_name})", beside)
    except (UnsafeModelError, InvalidInputError) as exc:
        raise ServiceError(str(exc), field="file") from None


def place_upload(experiment: Experiment, checked: CheckedUpload) -> ModelFile:
    """Move a checked upload into storage and record it; the previous file of the same
    role is replaced only now, so a refused upload never loses the one before."""
    if experiment.is_active:
        checked.discard()
        raise ServiceError(f"the experiment is {experiment.status}; stop it before uploading", status=409)
    stem = storage.upload_stem(experiment.pk, experiment.name)
    if checked.kind == "model":
        final = storage.custom_model_path(experiment.framework, stem, checked.suffix)
        roles = (ModelFile.Role.UPLOAD, ModelFile.Role.PRETRAINED)
    else:
        final = storage.custom_dataset_path(experiment.framework, stem, checked.suffix)
        roles = (ModelFile.Role.DATASET,)
    relative = storage.relative(final)
    with transaction.atomic(), storage_failures_as_service_errors():
        previous = list(experiment.files.filter(role__in=roles))
        try:
            storage.move_into_place(checked.temp_path, final, action="save the upload")
        except storage.StorageWriteError:
            checked.discard()
            raise
        try:
            stored = _record_placed_upload(experiment, checked, relative, previous)
        except BaseException:
            # The rows roll back: the file just placed must not stay in storage unrecorded.
            if relative not in {old.path for old in previous}:
                storage.remove_file(relative)
            raise
    return stored


def _record_placed_upload(experiment: Experiment, checked: CheckedUpload, relative: str,
                          previous: list[ModelFile]) -> ModelFile:
    for stored in previous:
        if stored.path == relative:
            stored.delete()
        else:
            stored.delete_with_file()
    stored = ModelFile.objects.create(
        experiment=experiment,
        role=ModelFile.Role.UPLOAD if checked.kind == "model" else ModelFile.Role.DATASET,
        kind=ModelFile.Kind.SOURCE, format=checked.suffix.lstrip("."), path=relative,
        size_bytes=checked.size_bytes, sha256=checked.sha256,
    )
    if checked.kind == "model":
        experiment.config = {**experiment.config, **checked.options}
        experiment.save(update_fields=["config"])
        experiment.attach_model()
    else:
        experiment.dataset = "custom"
        experiment.save(update_fields=["dataset"])
    return stored


def upload(experiment: Experiment, uploaded, kind: str = "model", input_shape: str = "",
           architecture: str = "") -> ModelFile:
    if experiment.is_active:
        raise ServiceError(f"the experiment is {experiment.status}; stop it before uploading", status=409)
    check_storage_quota(experiment.owner, uploaded.size, replacing=_replaced_by(experiment, kind))
    checked = check_upload(experiment.framework, uploaded, kind, input_shape, architecture, experiment.config)
    return place_upload(experiment, checked)


# -- lifecycle -----------------------------------------------------------------------------


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@transaction.atomic
def create_experiment(data: dict, *, owner) -> Experiment:
    """`data` is the cleaned data of forms.ExperimentForm (pretrained_path resolved there)."""
    experiment = Experiment.objects.create(
        owner=owner,
        name=data["name"],
        framework=data["framework"],
        target_device=data["target_device"],
        dataset=data["dataset"],
        goal=data.get("goal") or "balanced",
        constraints=data.get("constraints") or {},
        techniques=data.get("techniques") or list(TECHNIQUES),
        config=data.get("config") or {},
        plan=data.get("plan") or catalog.API_DEFAULT_PLAN,
        time_budget_s=data.get("time_budget_s"),
    )
    ExperimentProgress.objects.create(
        experiment=experiment, status=experiment.status, technique_count=len(experiment.techniques)
    )
    if pretrained := data.get("pretrained_path"):
        ModelFile.objects.create(
            experiment=experiment, role=ModelFile.Role.PRETRAINED, kind=ModelFile.Kind.SOURCE,
            format=pretrained.suffix.lstrip("."), path=storage.relative(pretrained),
            size_bytes=pretrained.stat().st_size, sha256=sha256_of(pretrained),
        )
        experiment.attach_model()
    return experiment


def start_experiment(experiment: Experiment) -> None:
    if experiment.source_model() is None:
        raise ServiceError("upload a model (or create the experiment with a pretrained_model) first", 409)
    if experiment.dataset == "custom" and experiment.dataset_file() is None:
        raise ServiceError("the dataset is 'custom': upload it (kind=dataset) before starting", 409)
    with transaction.atomic():
        check_active_quota(experiment)
        try:
            experiment.enqueue()
        except InvalidTransition as exc:
            raise ServiceError(str(exc), 409) from None


def stop_experiment(experiment: Experiment) -> str:
    try:
        return experiment.request_stop()
    except InvalidTransition as exc:
        raise ServiceError(str(exc), 409) from None


def delete_experiment(experiment: Experiment) -> None:
    """Remove the experiment's stored files, then its rows: the API's DELETE and the admin's
    delete both come here. Each file's row goes only once the file is gone, so when storage
    refuses a removal (503, or 507) the experiment and the rows of the files still there
    are kept: nothing is left in storage without a row, and no row outlives its file."""
    if experiment.is_active:
        raise ServiceError(f"the experiment is {experiment.status}; stop it before deleting it", 409)
    with storage_failures_as_service_errors():
        for stored in experiment.files.all():
            stored.delete_with_file()
        storage.remove_tree(storage.optimized_dir(experiment.pk))
    experiment.delete()


def create_and_start(data: dict, model_file=None, dataset_file=None, *, owner) -> Experiment:
    """The setup page in one step: check the uploads, then create, place and start
    together so a refused file leaves no half-made experiment behind."""
    check_storage_quota(owner, sum(f.size for f in (model_file, dataset_file) if f))
    checked = []
    try:
        if model_file:
            checked.append(check_upload(data["framework"], model_file, "model",
                                        data.get("input_shape", ""), data.get("architecture", ""), data.get("config")))
        if dataset_file:
            checked.append(check_upload(data["framework"], dataset_file, "dataset", experiment_config=data.get("config")))
        with transaction.atomic():
            experiment = create_experiment(data, owner=owner)
            for upload_ in checked:
                place_upload(experiment, upload_)
            start_experiment(experiment)
    finally:
        for upload_ in checked:
            upload_.discard()
    return experiment


# -- quotas --------------------------------------------------------------------------------


def check_active_quota(experiment: Experiment) -> None:
    """429 when the owner already has EDGEOPT_MAX_ACTIVE_PER_USER experiments queued or
    running. Call inside the transaction that queues: the owner's row is locked first, so
    two starts at once cannot both pass the count."""
    owner = get_user_model().objects.select_for_update().get(pk=experiment.owner_id)
    limit = settings.EDGEOPT_MAX_ACTIVE_PER_USER
    active = owner.experiments.filter(status__in=Experiment.ACTIVE).exclude(pk=experiment.pk).count()
    if active >= limit:
        raise ServiceError(
            f"you already have {active} experiment(s) queued or running, the most one user may have "
            f"({limit}); wait for one to finish or stop one, then start this again", 429)


def storage_used_bytes(owner, exclude=()) -> int:
    """Bytes of the stored files of `owner`'s experiments: uploads, datasets, results.
    Pretrained models are shared by everyone and count for no one."""
    files = ModelFile.objects.filter(experiment__owner=owner).exclude(role=ModelFile.Role.PRETRAINED)
    return files.exclude(pk__in=[f.pk for f in exclude]).aggregate(total=Sum("size_bytes"))["total"] or 0


def _replaced_by(experiment: Experiment, kind: str) -> list[ModelFile]:
    """The stored files an upload of `kind` replaces: their bytes are freed by it."""
    roles = (ModelFile.Role.UPLOAD,) if kind != "dataset" else (ModelFile.Role.DATASET,)
    return list(experiment.files.filter(role__in=roles))


def check_storage_quota(owner, incoming_bytes: int, replacing=()) -> None:
    """413 when `incoming_bytes` more would take `owner` over EDGEOPT_MAX_STORAGE_MB_PER_USER.
    Checked at upload; the results a run writes count once written, so a user near the limit
    is stopped at the next upload, not in the middle of a run."""
    limit = settings.EDGEOPT_MAX_STORAGE_MB_PER_USER * 2**20
    used = storage_used_bytes(owner, exclude=replacing)
    if used + incoming_bytes > limit:
        raise ServiceError(
            f"this upload ({incoming_bytes / 2**20:.1f} MB) would take your stored files to "
            f"{(used + incoming_bytes) / 2**20:.1f} MB, over your {settings.EDGEOPT_MAX_STORAGE_MB_PER_USER} MB; "
            "delete experiments you no longer need, then upload again", 413, field="file")


def resume_experiment(experiment: Experiment) -> None:
    """Run what a stopped or failed experiment did not finish; finished runs are kept."""
    with transaction.atomic():
        check_active_quota(experiment)
        try:
            experiment.enqueue(resume=True)
        except InvalidTransition as exc:
            raise ServiceError(str(exc), 409) from None


def clone_experiment(experiment: Experiment) -> Experiment:
    """A new experiment with the same settings and its own copy of the model and dataset
    files (a pretrained model is shared, as it is never deleted), ready to start."""
    if experiment.source_model() is None:
        raise ServiceError("the experiment has no model to run again", 409)
    sources = list(experiment.files.filter(role__in=(ModelFile.Role.UPLOAD, ModelFile.Role.PRETRAINED,
                                                     ModelFile.Role.DATASET)))
    check_storage_quota(experiment.owner, sum(f.size_bytes for f in sources if f.role != ModelFile.Role.PRETRAINED))
    with transaction.atomic(), storage_failures_as_service_errors():
        clone = Experiment.objects.create(
            owner=experiment.owner, name=experiment.name, framework=experiment.framework, target_device=experiment.target_device,
            dataset=experiment.dataset, goal=experiment.goal, constraints=experiment.constraints,
            techniques=experiment.techniques, config=experiment.config, plan=experiment.plan,
            time_budget_s=experiment.time_budget_s)
        ExperimentProgress.objects.create(experiment=clone, status=clone.status,
                                          technique_count=len(clone.techniques))
        copied = []
        try:
            for stored in sources:
                path = stored.path
                if stored.role != ModelFile.Role.PRETRAINED:
                    stem = storage.upload_stem(clone.pk, clone.name)
                    final = (storage.custom_model_path(clone.framework, stem, f".{stored.format}")
                             if stored.role == ModelFile.Role.UPLOAD
                             else storage.custom_dataset_path(clone.framework, stem, f".{stored.format}"))
                    with open(stored.absolute_path(), "rb") as source:
                        storage.atomic_write(final, iter(lambda: source.read(CHUNK), b""), action="copy the model")
                    path = storage.relative(final)
                    copied.append(path)
                ModelFile.objects.create(experiment=clone, role=stored.role, kind=stored.kind, format=stored.format,
                                         path=path, size_bytes=stored.size_bytes, sha256=stored.sha256)
        except BaseException:
            for path in copied:  # the rows roll back: no copy may stay in storage unrecorded
                storage.remove_file(path)
            raise
        clone.attach_model()
    return clone
