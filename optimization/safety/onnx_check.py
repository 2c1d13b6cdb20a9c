"""Check an uploaded ONNX model statically: the web process runs this at upload, with the
onnx package only (no onnxruntime session, nothing executed).

Refused: a file onnx cannot parse or its checker rejects; tensors whose data lives in
external files (they would be read from paths the file names, outside the upload); operator
domains onnxruntime does not ship (custom ops would need a library we will not load); and
default-domain opsets outside what the installed onnx knows.
"""
from __future__ import annotations

from pathlib import Path

import onnx
from onnx import external_data_helper

from optimization.base import InvalidInputError, UnsafeModelError

# The operator domains onnxruntime's CPU build implements.
RUNTIME_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc",
                   "ai.onnx.preview.training"}
MIN_OPSET = 7


def check_onnx_file(path: Path, label: str) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises its own DecodeError, among others
        raise InvalidInputError(f"{label} is not a readable ONNX model ({type(exc).__name__})") from None
    # onnx's own walk over every tensor, subgraphs and attributes included (no public name).
    external = [t.name for t in external_data_helper._get_all_tensors(model)
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise UnsafeModelError(
            f"{label} keeps {len(external)} tensor(s) in external data files ({', '.join(external[:3])}); "
            "export it as one file (torch.onnx.export(..., external_data=False), which the dynamo "
            "exporter does not do by default) or re-save it: onnx.save_model(onnx.load(path), path, "
            "save_as_external_data=False)")
    custom = sorted({node.domain for node in _all_nodes(model.graph)} - RUNTIME_DOMAINS)
    if custom:
        raise InvalidInputError(
            f"{label} uses operators from custom domain(s) {', '.join(custom)}, which onnxruntime does not "
            "ship; export with standard ONNX operators only")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    newest = onnx.defs.onnx_opset_version()
    if opset is None or not MIN_OPSET <= opset <= newest:
        raise InvalidInputError(f"{label} declares ONNX opset {opset}; opsets {MIN_OPSET} to {newest} are supported")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid model"
        raise InvalidInputError(f"{label} is not a valid ONNX model: {first_line[:300]}") from None
    return model


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_nodes(subgraph)
