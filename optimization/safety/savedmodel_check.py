"""Refuse a SavedModel whose graph touches files or runs Python, before TensorFlow loads it.

A SavedModel is a graph, not code, but graph ops can read and write files (ReadFile,
WriteFile, summary writers, datasets over files) or call back into Python (PyFunc). We parse
`saved_model.pb` as a protobuf and look at every op: the main graphs and every function in
their libraries. Checkpoint ops (SaveV2, RestoreV2, ...) are allowed only inside the save and
restore functions the SavedModel's own `saver_def` points at: that is how variables load.
The Keras metadata (layer configs) gets the same allowlist check as `.keras` uploads.

The op check runs in the worker: the protobuf classes come from tensorflow, imported inside
the functions so that importing this module stays cheap. `inspect_savedmodel_zip` runs at the
upload with the standard library only: it checks the Keras metadata (read with a small
protobuf wire reader) and tells a SavedModel with Keras metadata (tf_keras `model.save`:
every technique) from one without (Keras 3 `model.export()`, `tf.saved_model.save`: an
inference graph only, so only the post-training techniques can run).
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
    nodes = []
    for number, value in _protobuf_fields(content):
        if number == SAVED_METADATA_NODES and isinstance(value, bytes):
            fields = dict((n, v) for n, v in _protobuf_fields(value) if isinstance(v, bytes))
            identifier = fields.get(SAVED_OBJECT_IDENTIFIER, b"").decode("utf-8", "replace")
            nodes.append((identifier, fields.get(SAVED_OBJECT_METADATA, b"")))
    return nodes


def _protobuf_fields(content: bytes):
    """(field number, int or bytes) of each field of one protobuf message (wire format)."""
    position = 0

    def varint():
        nonlocal position
        value, shift = 0, 0
        while True:
            if position >= len(content) or shift > 63:
                raise InvalidInputError("keras_metadata.pb is not a valid protobuf message")
            byte = content[position]
            position += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while position < len(content):
        key = varint()
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            yield number, varint()
        elif wire_type == 2:
            length = varint()
            if position + length > len(content):
                raise InvalidInputError("keras_metadata.pb is not a valid protobuf message")
            yield number, content[position:position + length]
            position += length
        elif wire_type in (1, 5):
            position += 8 if wire_type == 1 else 4
        else:
            raise InvalidInputError("keras_metadata.pb is not a valid protobuf message")
