"""What a SavedModel's graph runs, read from ``saved_model.pb`` without loading it.

Loading a SavedModel runs its TensorFlow graph, and a graph can read and write any file the
process may touch (``ReadFile``, ``WriteFile``), call Python (``PyFunc``) or talk to other
machines. :func:`inspect_saved_model` walks every MetaGraph's top-level graph and function
library and flags such ops; :func:`unsafe_ops` is the ``{op: reason}`` that ``tlkit
predict`` refuses unless trusted, and ``tlkit inspect DIR`` prints. The checkpoint ops every
SavedModel's own saver holds (``SaveV2``, ``RestoreV2``) are flagged only outside the saver.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

from tlkit.artifacts import SAVED_MODEL_FILE
from tlkit.errors import ExportError

#: Ops that read files (or memory-map them), by their TensorFlow names.
_READS_FILES = frozenset({
    "ReadFile", "MatchingFiles", "MatchingFilesDataset", "ExperimentalMatchingFilesDataset", "ImmutableConst",
    "TFRecordDataset", "TFRecordDatasetV2", "TextLineDataset", "FixedLengthRecordDataset",
    "FixedLengthRecordDatasetV2", "CSVDataset", "CSVDatasetV2", "ExperimentalCSVDataset", "LMDBDataset",
    "ExperimentalLMDBDataset", "SqlDataset", "ExperimentalSqlDataset", "LoadDataset", "SnapshotDatasetReader",
    "SnapshotNestedDatasetReader", "SnapshotChunkDataset", "ListSnapshotChunksDataset", "WholeFileReader",
    "WholeFileReaderV2", "TextLineReader", "TextLineReaderV2", "TFRecordReader", "TFRecordReaderV2",
    "FixedLengthRecordReader", "FixedLengthRecordReaderV2", "LMDBReader", "RecordInput",
    "InitializeTableFromTextFile", "InitializeTableFromTextFileV2", "LoadAndRemapMatrix", "GenerateVocabRemapping",
})
#: Ops that write files (checkpoint writers, dataset writers, summary and debug writers).
_WRITES_FILES = frozenset({
    "WriteFile", "DatasetToTFRecord", "ExperimentalDatasetToTFRecord", "SaveDataset", "SaveDatasetV2",
    "SnapshotDataset", "SnapshotDatasetV2", "DistributedSave", "CacheDataset", "CacheDatasetV2",
    "CreateSummaryFileWriter", "CreateSummaryDbWriter", "DebugIdentity", "DebugIdentityV2", "DebugIdentityV3",
    "DebugNanCount", "DebugNumericSummary", "CalibrationStatisticsSaver", "FileSystemSetConfiguration",
})
#: Checkpoint ops: normal in the saver's own functions (every SavedModel has them), flagged anywhere else.
_CHECKPOINT_OPS = frozenset({
    "Save", "SaveV2", "SaveSlices", "MergeV2Checkpoints", "Restore", "RestoreV2", "RestoreSlice", "DTensorRestoreV2",
})
#: Ops that run Python code of the process that loads the model, or talk to other machines.
_RUNS_CODE = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})
_NETWORK = frozenset({
    "RpcClient", "RpcCall", "RpcServer", "RpcServerStart", "RpcServerRegister", "DataServiceDataset",
    "DataServiceDatasetV2", "DataServiceDatasetV3", "DataServiceDatasetV4", "RegisterDataset", "RegisterDatasetV2",
})
_GRAPH = "(graph)"
"""Where a top-level graph node (outside every function) is reported."""


@dataclass
class SavedModelOps:
    """The ops in a SavedModel's graphs, read from ``saved_model.pb`` without loading it.

    Attributes:
        path: the SavedModel directory.
        ops: op type -> number of nodes (top-level graph and every library function; calls
            of library functions are followed, not counted as ops).
        where: op type -> names of the functions holding it (``"(graph)"``: top level).
        unsafe: op type -> why it is flagged (see :func:`unsafe_ops`).
        saver_functions: the saver's own functions (their checkpoint ops are not flagged).
    """

    path: str
    ops: dict[str, int] = field(default_factory=dict)
    where: dict[str, list[str]] = field(default_factory=dict)
    unsafe: dict[str, str] = field(default_factory=dict)
    saver_functions: list[str] = field(default_factory=list)


def _read_saved_model(path: Path) -> Any:
    pb = path / SAVED_MODEL_FILE if path.is_dir() else path
    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString(pb.read_bytes())
    except (OSError, ValueError) as exc:  # protobuf's DecodeError is a ValueError
        raise ExportError(f"{str(pb)!r} is not a readable SavedModel ({exc}); pass a SavedModel directory") from exc
    return proto


def _called(node: Any) -> list[str]:
    """Names of the library functions a NodeDef calls through its attributes (``f``, ``body``, branches...)."""
    names = []
    for value in node.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        names.extend(f.name for f in value.list.func)
    return names


def inspect_saved_model(path: str | Path) -> SavedModelOps:
    """Every op a SavedModel's graphs hold, and the ones that reach outside the model.

    Reads ``saved_model.pb`` (the SavedModel protocol buffer) and walks each MetaGraph's
    top-level ``graph_def`` nodes and its function library; nothing is loaded or run.

    A node is flagged (``unsafe``) when its op reads or writes files, runs Python
    (``PyFunc``, ``EagerPyFunc``), talks to the network (RPC, tf.data service), prints to a
    file (``PrintV2`` with a ``file://`` stream), is a checkpoint op (``SaveV2``,
    ``RestoreV2``, ...) outside the saver's own functions, or is not registered in this
    TensorFlow (a custom op from a shared library, which could do anything). The saver's
    functions are the ones its ``saver_def`` names (``__inference__traced_save_*`` and
    ``__inference__traced_restore_*`` in a TF2 SavedModel; the ``save/`` scope in TF1),
    plus what they call.

    Raises:
        ExportError: ``path`` holds no readable ``saved_model.pb``.
    """
    root = Path(path)
    report = SavedModelOps(str(root))
    for meta in _read_saved_model(root).meta_graphs:
        library = {f.signature.name: f for f in meta.graph_def.library.function}
        saver = _saver_functions(meta, library)
        restore = meta.saver_def.restore_op_name
        saver_scope = restore.split("/")[0] + "/" if "/" in restore else None  # TF1: "save/restore_all"
        report.saver_functions.extend(sorted(saver - set(report.saver_functions)))
        units = [(_GRAPH, node) for node in meta.graph_def.node]
        units += [(name, node) for name, fn in library.items() for node in fn.node_def]
        for where, node in units:
            if node.op in library:  # a direct call of a library function, not an op
                continue
            report.ops[node.op] = report.ops.get(node.op, 0) + 1
            places = report.where.setdefault(node.op, [])
            if where not in places:
                places.append(where)
            in_saver = where in saver or (where == _GRAPH and bool(saver_scope) and node.name.startswith(saver_scope))
            reason = _why_unsafe(node, in_saver, op_def_registry.get(node.op) is not None)
            if reason and node.op not in report.unsafe:
                report.unsafe[node.op] = reason
    return report


def _saver_functions(meta: Any, library: dict[str, Any]) -> set[str]:
    """The saver's functions: those its save/restore nodes call, and everything they call."""
    saver = meta.saver_def
    heads = {saver.save_tensor_name.split(":")[0], saver.restore_op_name.split(":")[0]} - {""}
    todo = [name for node in meta.graph_def.node if node.name in heads for name in _called(node)]
    found: set[str] = set()
    while todo:
        name = todo.pop()
        if name in found or name not in library:
            continue
        found.add(name)
        for node in library[name].node_def:
            todo.extend(_called(node))
            if node.op in library:
                todo.append(node.op)
    return found


def _why_unsafe(node: Any, in_saver: bool, registered: bool) -> str | None:
    """Why ``node`` reaches outside the model, or ``None``."""
    op = node.op
    if not registered:
        return "not an op of this TensorFlow (a custom op from a shared library can do anything)"
    if op in _RUNS_CODE:
        return "runs Python code in the process that loads the model"
    if op in _NETWORK:
        return "talks to other machines (RPC / tf.data service)"
    if op in _READS_FILES:
        return "reads files"
    if op in _WRITES_FILES:
        return "writes files"
    if op in _CHECKPOINT_OPS and not in_saver:
        return "reads or writes checkpoint files outside the SavedModel's own saver"
    if op == "PrintV2" and "output_stream" in node.attr:
        stream = node.attr["output_stream"].s.decode("utf-8", "replace")
        if stream.startswith("file://"):
            return f"prints into a file ({stream})"
    return None


def saved_model_ops(path: str | Path) -> set[str]:
    """The op types in a SavedModel's graphs (see :func:`inspect_saved_model`)."""
    return set(inspect_saved_model(path).ops)


def unsafe_ops(path: str | Path) -> dict[str, str]:
    """The ops of a SavedModel that reach outside the model: ``{op type: why}``; ``{}`` for a
    plain Keras or tlkit export (see :func:`inspect_saved_model` for what is flagged)."""
    return dict(inspect_saved_model(path).unsafe)
