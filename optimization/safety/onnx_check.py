"""Check an uploaded ONNX model statically: the web process runs this at upload, with the
onnx package only (no onnxruntime session, nothing executed).

Refused: a file onnx cannot parse or its checker rejects; tensors whose data lives in
external files, unless the model came in a zip holding those files beside it (the data would
otherwise be read from paths the file names, outside the upload); operator
domains onnxruntime does not ship (custom ops would need a library we will not load); and
default-domain opsets outside what the installed onnx knows.
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath

import onnx
from onnx import external_data_helper

from optimization.base import InvalidInputError, UnsafeModelError

# The operator domains onnxruntime's CPU build implements.
RUNTIME_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc",
                   "ai.onnx.preview.training"}
MIN_OPSET = 7


def check_onnx_file(path: Path, label: str, external_files: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """The checks above on the file at `path`. `external_files`: the files beside it (paths
    relative to its folder) that its external-data tensors may name; empty for a lone file."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError, among others
        raise InvalidInputError(f"{label} is not a readable ONNX model ({type(exc).__name__})") from None
    _check_external_data(model, label, external_files)
    custom = sorted({node.domain for node in all_nodes(model.graph)} - RUNTIME_DOMAINS)
    if custom:
        raise InvalidInputError(
            f"{label} uses operators from custom domain(s) {', '.join(custom)}, which onnxruntime does not "
            "ship; export with standard ONNX operators only")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    newest = onnx.defs.onnx_opset_version()
    if opset is None or not MIN_OPSET <= opset <= newest:
        raise InvalidInputError(f"{label} declares ONNX opset {opset}; opsets {MIN_OPSET} to {newest} are supported")
    try:
        # by path where the weights are external: the checker then opens the files beside it
        onnx.checker.check_model(str(path) if external_files else model)
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise InvalidInputError(f"{label} is not a valid ONNX model: {first_line[:300]}") from None
    return model


def onnx_archive_layout(names: list[str], label: str) -> tuple[str, frozenset[str]]:
    """(the one .onnx in a zip of a model and its external data, the other files of its folder
    and below, relative to it) from the archive's file names (already checked to stay inside)."""
    names = [name for name in names if not name.startswith("__MACOSX/")]
    models = [name for name in names if name.lower().endswith(".onnx")]
    if len(models) != 1:
        raise InvalidInputError(f"{label} must hold exactly one .onnx model, with its external data file(s) "
                                f"beside it; it holds {len(models)}")
    folder = PurePosixPath(models[0]).parent
    beside = frozenset(str(PurePosixPath(name).relative_to(folder)) for name in names
                       if name != models[0] and PurePosixPath(name).is_relative_to(folder))
    return models[0], beside


def _check_external_data(model: onnx.ModelProto, label: str, external_files: frozenset[str]) -> None:
    # onnx's own walk over every tensor, subgraphs and attributes included (no public name).
    external = [t for t in external_data_helper._get_all_tensors(model)
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if external and not external_files:
        raise UnsafeModelError(
            f"{label} keeps {len(external)} tensor(s) in external data files "
            f"({', '.join(t.name for t in external[:3])}); upload a .zip holding the .onnx and its data "
            "file(s) (e.g. model.onnx and model.onnx.data), or export it as one file "
            "(torch.onnx.export(..., external_data=False))")
    for tensor in external:
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        path = PurePosixPath(location)
        if (not location or "\\" in location or ":" in location or path.is_absolute() or ".." in path.parts
                or str(path) not in external_files):
            raise UnsafeModelError(
                f"{label}: tensor {tensor.name!r} reads its data from {location!r}, which is not one of the "
                "files beside the model in the archive")


def all_nodes(graph):
    """Every node of `graph`, those of its If/Loop/Scan subgraphs included."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from all_nodes(subgraph)
