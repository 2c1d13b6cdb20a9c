"""Refuse a SavedModel whose graph touches files or runs Python, before TensorFlow loads it.

A SavedModel is a graph, not code, but graph ops can read and write files (ReadFile,
WriteFile, summary writers, datasets over files) or call back into Python (PyFunc). We parse
`saved_model.pb` as a protobuf and look at every op: the main graphs and every function in
their libraries. Checkpoint ops (SaveV2, RestoreV2, ...) are allowed only inside the save and
restore functions the SavedModel's own `saver_def` points at: that is how variables load.
The Keras metadata (layer configs) gets the same allowlist check as `.keras` uploads.

`check_savedmodel_dir` runs in the worker: the protobuf classes come from tensorflow, imported
inside the functions so that importing this module stays cheap. Two checks run at the upload, in
the web process, with the standard library only (a small protobuf wire reader):
`check_saved_model_ops` walks the few fields that hold op names and refuses every op that is
forbidden wherever it stands (the checkpoint ops, allowed in the saver's own functions, are left
to the worker's check); `inspect_savedmodel_zip` checks the Keras metadata and tells a SavedModel
with Keras metadata (tf_keras `model.save`: every technique) from one without (Keras 3
`model.export()`, `tf.saved_model.save`: an inference graph only, so only the post-training
techniques can run).
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path, PurePosixPath

from optimization.base import InvalidInputError, UnsafeModelError
from optimization.safety.keras_check import MAX_CONFIG_BYTES, check_keras_config

FORBIDDEN_OPS = frozenset({
    # Python callbacks
    "PyFunc", "PyFuncStateless", "EagerPyFunc",
    # files
    "ReadFile", "WriteFile", "MatchingFiles", "MatchingFilesDataset", "ImmutableConst",
    "InitializeTableFromTextFile", "InitializeTableFromTextFileV2", "LoadAndRemapMatrix",
    "WholeFileReader", "WholeFileReaderV2", "TextLineReader", "TextLineReaderV2",
    "FixedLengthRecordReader", "FixedLengthRecordReaderV2", "TFRecordReader",
    "TFRecordReaderV2", "IdentityReader", "IdentityReaderV2", "LMDBReader",
    "TextLineDataset", "TFRecordDataset", "TFRecordDatasetV2", "FixedLengthRecordDataset",
    "FixedLengthRecordDatasetV2", "CSVDataset", "CSVDatasetV2", "ExperimentalCSVDataset",
    "DatasetToTFRecord", "ExperimentalDatasetToTFRecord", "SaveDataset", "SaveDatasetV2",
    "LoadDataset", "SnapshotDataset", "SnapshotDatasetV2", "CacheDatasetV2", "RecordInput",
    # summaries and debugging sinks write files
    "CreateSummaryFileWriter", "CreateSummaryDbWriter", "WriteSummary", "WriteScalarSummary",
    "WriteHistogramSummary", "WriteImageSummary", "WriteAudioSummary", "WriteGraphSummary",
    "WriteRawProtoSummary", "FlushSummaryWriter", "DebugIdentity", "DebugIdentityV2",
    "DebugIdentityV3", "DebugNanCount", "DebugNumericSummary", "DebugNumericSummaryV2",
    "PrintV2",
    # checkpoint ops outside the standard restore (allowed there, see above)
    "Save", "SaveSlices", "SaveV2", "Restore", "RestoreSlice", "RestoreV2",
    "MergeV2Checkpoints", "ShardedFilename", "ShardedFilespec",
})
CHECKPOINT_OPS = frozenset({
    "SaveV2", "RestoreV2", "MergeV2Checkpoints", "ShardedFilename", "ShardedFilespec",
})


def check_savedmodel_dir(directory: Path) -> None:
    """Raise UnsafeModelError when any graph op is forbidden or any Keras layer is unsafe."""
    directory = Path(directory)
    pb_path = directory / "saved_model.pb"
    if not pb_path.is_file():
        raise InvalidInputError(
            "The zip holds no saved_model.pb at its top level (or in one top folder); "
            "zip the folder written by model.save('dir') / tf.saved_model.save."
        )
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    try:
        saved_model.ParseFromString(pb_path.read_bytes())
    except DecodeError as error:
        raise InvalidInputError(f"saved_model.pb is not a valid SavedModel ({error})") from error
    for meta_graph in saved_model.meta_graphs:
        _check_meta_graph(meta_graph)
    _check_keras_metadata(directory / "keras_metadata.pb")


# Field numbers along SavedModel.meta_graphs -> MetaGraphDef.graph_def -> GraphDef.node / .library
# -> FunctionDefLibrary.function -> FunctionDef.node_def -> NodeDef.op (tensorflow/core/protobuf).
_META_GRAPHS, _GRAPH_DEF, _NODE, _LIBRARY, _FUNCTION, _FUNCTION_NODE_DEF, _OP = 2, 2, 1, 2, 1, 3, 2
UPLOAD_FORBIDDEN_OPS = FORBIDDEN_OPS - CHECKPOINT_OPS


def check_saved_model_ops(data: bytes, label: str) -> None:
    """Refuse, from the bytes of saved_model.pb alone, a graph or function that uses an op
    that reads or writes files or runs Python. InvalidInputError when the bytes are not a
    protobuf message."""
    for meta_graph in _fields(data, _META_GRAPHS, label):
        for graph in _fields(meta_graph, _GRAPH_DEF, label):
            for node in _fields(graph, _NODE, label):
                _refuse_at_upload(_op_name(node, label), "the main graph")
            for library in _fields(graph, _LIBRARY, label):
                for function in _fields(library, _FUNCTION, label):
                    for node in _fields(function, _FUNCTION_NODE_DEF, label):
                        _refuse_at_upload(_op_name(node, label), "a function of the graph")


def _refuse_at_upload(op: str, where: str) -> None:
    if op in UPLOAD_FORBIDDEN_OPS or "PyFunc" in op:
        _refuse_if_forbidden(op, where)


def _op_name(node: bytes, label: str) -> str:
    return _last(node, _OP, label, "saved_model.pb").decode("utf-8", "replace")


def _last(message: bytes, number: int, label: str, what: str) -> bytes:
    """The last field numbered `number` (protobuf: a repeated scalar's last value wins)."""
    values = list(_fields(message, number, label, what))
    return bytes(values[-1]) if values else b""


def _fields(message: bytes, wanted: int, label: str, what: str = "saved_model.pb"):
    """The length-delimited fields numbered `wanted` of one protobuf message (wire format), as
    memoryviews; InvalidInputError when `what` (the file the bytes came from) is not one."""
    view, position = memoryview(message), 0
    malformed = InvalidInputError(f"{label}: {what} is truncated or not a valid protobuf message")
    while position < len(view):
        key, position = _varint(view, position, malformed)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, position = _varint(view, position, malformed)
        elif wire_type == 1:
            position += 8
        elif wire_type == 5:
            position += 4
        elif wire_type == 2:
            length, position = _varint(view, position, malformed)
            if position + length > len(view):
                raise malformed
            if number == wanted:
                yield view[position:position + length]
            position += length
        else:
            raise malformed
    if position != len(view):
        raise malformed


def _varint(view: memoryview, position: int, malformed: Exception) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= len(view) or shift > 63:
            raise malformed
        byte = view[position]
        value |= (byte & 0x7F) << shift
        position, shift = position + 1, shift + 7
        if byte < 0x80:
            return value, position


def _check_meta_graph(meta_graph) -> None:
    graph = meta_graph.graph_def
    checkpoint_functions = _standard_checkpoint_functions(meta_graph)
    for node in graph.node:
        _refuse_if_forbidden(node.op, "the main graph")
    for function in graph.library.function:
        name = function.signature.name
        allowed = CHECKPOINT_OPS if name in checkpoint_functions else frozenset()
        for node in function.node_def:
            if node.op not in allowed:
                _refuse_if_forbidden(node.op, f"function {name}")


def _standard_checkpoint_functions(meta_graph) -> set[str]:
    """The functions called by the nodes that `saver_def` names for save and restore."""
    saver = meta_graph.saver_def
    entry_nodes = {saver.save_tensor_name.split(":")[0], saver.restore_op_name.split(":")[0]}
    entry_nodes.discard("")
    names = set()
    for node in meta_graph.graph_def.node:
        if node.name in entry_nodes and "f" in node.attr:
            names.add(node.attr["f"].func.name)
    return names


def _refuse_if_forbidden(op: str, where: str) -> None:
    if op in FORBIDDEN_OPS or "PyFunc" in op:
        raise UnsafeModelError(
            f"Refused: the SavedModel uses the op {op!r} in {where}; it reads or writes files "
            "or runs Python when the model runs. Export a model whose graph only computes "
            "(no tf.io file ops, tf.py_function or summaries) and upload it again."
        )


def _check_keras_metadata(path: Path) -> None:
    if path.is_file():
        check_keras_metadata(path.read_bytes())


NO_KERAS_METADATA = (
    "this SavedModel has no Keras metadata (written by Keras 3 model.export() or "
    "tf.saved_model.save): it holds the inference graph only, with no layers to fine-tune, so "
    "the training techniques (pruning, distillation, QAT, hybrid) are skipped and the "
    "post-training ones (ptq_int8, ptq_int4) run. To run all seven, upload the Keras model "
    "itself (model.save('model.keras'))")


def inspect_savedmodel_zip(path: Path) -> dict:
    """At the upload, without TensorFlow: check the Keras metadata of a zipped SavedModel and
    return what the experiment's config should record: {"post_training_only": why} when it
    has none. The worker checks the graph's ops again when it loads the model."""
    with zipfile.ZipFile(path) as archive:
        names = [PurePosixPath(name) for name in archive.namelist()]
        roots = [name.parent for name in names if name.name == "saved_model.pb"]
        if len(roots) != 1 or len(roots[0].parts) > 1:
            raise InvalidInputError(
                "The zip holds no saved_model.pb at its top level or in one top folder; zip the "
                "folder written by model.save('dir') / model.export('dir').")
        metadata = roots[0] / "keras_metadata.pb"
        if metadata not in names:
            return {"post_training_only": NO_KERAS_METADATA}
        info = archive.getinfo(str(metadata))
        if info.file_size > MAX_CONFIG_BYTES:
            raise InvalidInputError("keras_metadata.pb is implausibly large")
        check_keras_metadata(archive.read(info))
    return {}


def check_keras_metadata(content: bytes) -> None:
    """The allowlist check of every layer spec in a keras_metadata.pb (SavedMetadata)."""
    for identifier, metadata in _saved_metadata_nodes(content):
        if identifier == "_tf_keras_metric":  # compile-time metrics: not loaded (compile=False)
            continue
        try:
            spec = json.loads(metadata)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise InvalidInputError(f"keras_metadata.pb is malformed ({error})") from error
        check_keras_config(spec)


# SavedMetadata { repeated SavedObject nodes = 1; } and in SavedObject the fields
# identifier = 4 and metadata = 5 (strings): tf_keras/protobuf/saved_metadata.proto
SAVED_METADATA_NODES, SAVED_OBJECT_IDENTIFIER, SAVED_OBJECT_METADATA = 1, 4, 5


def _saved_metadata_nodes(content: bytes) -> list[tuple[str, bytes]]:
    where = ("the SavedModel", "keras_metadata.pb")
    return [(_last(node, SAVED_OBJECT_IDENTIFIER, *where).decode("utf-8", "replace"),
             _last(node, SAVED_OBJECT_METADATA, *where))
            for node in _fields(content, SAVED_METADATA_NODES, *where)]
