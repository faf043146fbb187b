"""Exported artifacts, the reading side: their file names, and predictors that run them.

:func:`tlkit.export.export_run` writes a version directory (see :mod:`tlkit.export`); this
module reads one, or a single artifact copied out of one, without the exporter::

    <version>/
        saved_model.pb, variables/   SavedModel; signature ``serving_default``
        keras_model.keras            the Keras model (loads with safe_mode=True after ``import tlkit``)
        model_fp32.tflite ...        TFLite files at a fixed input size (batch 1)
        model.onnx                   ONNX at a fixed image size, any batch (optional extra: tlkit[onnx])
        labels.txt                   class names, one a line, in output order
        metadata.json                labels, modality, sample rate, input contract per artifact
                                     (multi-task: ``tasks``, see :mod:`tlkit.task_outputs`)

Every predictor has ``.labels`` and ``.predict_one(example) -> (C,) float32 probabilities``
for one raw example: (H, W, 3) float pixels 0..255 of any size, or a (samples,) waveform;
``.prepare(example)`` gives the example as the artifact itself sees it. SavedModel and
``.keras`` predictors also have ``.predict_batch(batch) -> (B, C)`` for same-shape
examples (TFLite files take batch 1). A multi-task export's predictors also have ``.tasks``
(a :class:`tlkit.task_outputs.TaskLayout`): their probabilities are the tasks' concatenated in
task order, ``.labels`` the matching ``task:class`` names, and ``tasks.split(p)`` gives
``{task: (C_task,)}``; each artifact's per-task outputs are found by name (the SavedModel's
``<task>_probabilities``; the TFLite / ONNX output names recorded in ``metadata.json``).

Loading a SavedModel runs its graph, and a graph can hold ops that read or write any file
the process may touch (``ReadFile``, ``WriteFile``) or run Python (``PyFunc``).
:mod:`tlkit.savedmodel_ops` lists such ops from ``saved_model.pb`` without loading
anything (``tlkit inspect DIR``); :func:`tlkit.predict.load_predictor` refuses a flagged
SavedModel unless trusted. See docs/deploy.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit.audio_windows import ClipWindows
from tlkit.errors import ExportError
from tlkit.fileio import read_json
from tlkit.registration import register_serializables
from tlkit.task_outputs import TaskLayout

# The TFLite runtime lives in tlkit.tflite_runtime; its names stay importable from here (re-exported).
from tlkit.tflite_runtime import TFLitePredictor as TFLitePredictor
from tlkit.tflite_runtime import fit_fixed as fit_fixed
from tlkit.tflite_runtime import fit_length as fit_length
from tlkit.tflite_runtime import make_interpreter as make_interpreter

# Not "model.keras": tlkit.predict takes a directory holding model.keras for a run directory.
KERAS_FILE = "keras_model.keras"
METADATA_FILE = "metadata.json"
LABELS_FILE = "labels.txt"
REPORT_FILE = "export_report.json"
SAVED_MODEL_FILE = "saved_model.pb"
SIGNATURE = "serving_default"
TFLITE_FP32_FILE = "model_fp32.tflite"
TFLITE_FP16_FILE = "model_fp16.tflite"
TFLITE_DYNAMIC_FILE = "model_dynamic.tflite"
TFLITE_INT8_FILE = "model_int8.tflite"
ONNX_FILE = "model.onnx"
ONNX_EXTRA = "pip install 'tlkit[onnx]'"
"""Installs what the ``onnx`` format needs (tf2onnx, onnx, onnxruntime)."""
MAX_TOP_K = 5
"""The SavedModel signature's ``labels`` / ``scores`` hold the top min(5, C) classes."""


@dataclass
class SavedModelPredictor:
    """An exported SavedModel directory as a :class:`tlkit.predict.Predictor`.

    ``predict_one`` takes one raw example, (H, W, C) pixels 0..255 (any size, C = 1, 3 or
    4; rounded to uint8) or a whole (samples,) waveform of any length, and returns (C,)
    float32 probabilities. Audio exports cut the clip into windows inside the serving
    function (``windows``, read from ``metadata.json``: see :mod:`tlkit.audio_windows`).
    """

    path: str
    labels: list[str]
    input_name: str = "image"
    windows: ClipWindows | None = None
    tasks: TaskLayout | None = None
    _fn: Any = field(default=None, repr=False)
    _loaded: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._loaded = tf.saved_model.load(self.path)
        if SIGNATURE not in self._loaded.signatures:
            raise ExportError(f"SavedModel {self.path!r} has no {SIGNATURE!r} signature; re-export it with tlkit")
        self._fn = self._loaded.signatures[SIGNATURE]

    def prepare(self, example: np.ndarray) -> np.ndarray:
        """The example as the Keras model sees it (identity: any size is accepted)."""
        return example

    def predict_one(self, example: np.ndarray) -> np.ndarray:
        if self.input_name == "image":
            batch = tf.constant(np.clip(np.rint(example), 0, 255).astype(np.uint8)[None])
        else:
            batch = tf.constant(np.asarray(example, np.float32)[None])
        return self._probabilities(self._fn(**{self.input_name: batch}))[0]

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """(B, ...) raw examples of one shape -> (B, C) probabilities, one signature call."""
        if self.input_name == "image":
            tensor = tf.constant(np.clip(np.rint(batch), 0, 255).astype(np.uint8))
        else:
            tensor = tf.constant(np.asarray(batch, np.float32))
        return self._probabilities(self._fn(**{self.input_name: tensor}))

    def _probabilities(self, outputs: dict[str, Any]) -> np.ndarray:
        """(B, C) from the signature's outputs: ``probabilities``, or every ``<task>_probabilities`` joined."""
        if self.tasks is None:
            return np.asarray(outputs["probabilities"])
        return self.tasks.join({t: outputs[f"{t}_probabilities"] for t in self.tasks.names})


@dataclass
class KerasFilePredictor:
    """An exported ``keras_model.keras`` (loaded with safe_mode=True) as a predictor.

    Audio models with a window contract (``windows``, from ``metadata.json``) score a
    whole waveform of any length as the run does (:mod:`tlkit.audio_windows`).
    """

    path: str
    labels: list[str]
    windows: ClipWindows | None = None
    tasks: TaskLayout | None = None
    _model: Any = field(default=None, repr=False)
    _batch_fn: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        register_serializables()
        self._model = keras.saving.load_model(self.path, safe_mode=True, compile=False)

    def prepare(self, example: np.ndarray) -> np.ndarray:
        return example

    def predict_one(self, example: np.ndarray) -> np.ndarray:
        x = np.asarray(example, np.float32)
        if self.windows is not None and x.ndim == 1:
            return self.predict_batch(x[None])[0]
        return np.asarray(join_outputs(self._model(x[None], training=False), self.tasks))[0]

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """(B, ...) raw examples of one shape -> (B, C) probabilities, through one compiled function."""
        if self._batch_fn is None:
            self._batch_fn = compiled_predict(self._model, self.tasks)
        rows = np.asarray(batch, np.float32)
        if self.windows is not None and rows.ndim == 2:
            return np.stack([self.windows.score(lambda w: self._batch_fn(tf.constant(w)), row) for row in rows])
        return np.asarray(self._batch_fn(tf.constant(rows)))


@dataclass
class OnnxPredictor:
    """A ``.onnx`` file (the ``onnx`` export format) run by ONNX Runtime on CPU.

    ``predict_one`` takes one raw example, (H, W, 3) float pixels 0..255 of any size
    (resized to the file's fixed size with the Keras model's bilinear resize, as for
    TFLite), and returns (C,) float32 probabilities; ``predict_batch`` takes (B, ...) of one
    shape. Labels: ``metadata.json`` / ``labels.txt`` beside the file, else the ``labels``
    entry the exporter writes into the ONNX file's own metadata (:meth:`from_file`).
    """

    path: str
    labels: list[str]
    tasks: TaskLayout | None = None
    output_names: dict[str, str] | None = None
    _session: Any = field(default=None, repr=False)
    _input: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._session = onnxruntime_module().InferenceSession(self.path, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0]

    @classmethod
    def from_file(cls, path: str | Path) -> "OnnxPredictor":
        """The file with its labels from beside it, else from its embedded metadata."""
        try:
            return cls(str(path), labels_beside(path))
        except ExportError:
            session = onnxruntime_module().InferenceSession(str(path), providers=["CPUExecutionProvider"])
            props = session.get_modelmeta().custom_metadata_map
            embedded = props.get("labels")
            if not embedded:
                raise
            tasks = json.loads(props["tasks"]) if props.get("tasks") else None  # a multi-task file
            return cls(str(path), [str(v) for v in json.loads(embedded)],
                       tasks=TaskLayout.from_metadata({"tasks": tasks}) if tasks else None,
                       output_names={t: str(e["output"]) for t, e in tasks.items()} if tasks else None)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The fixed input shape without the batch axis, e.g. (224, 224, 3)."""
        return tuple(int(v) for v in self._input.shape[1:])

    def prepare(self, example: np.ndarray) -> np.ndarray:
        return fit_fixed(np.asarray(example, np.float32), self.input_shape)

    def predict_one(self, example: np.ndarray) -> np.ndarray:
        return self.predict_batch(np.asarray(example, np.float32)[None])[0]

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        x = np.stack([self.prepare(example) for example in batch]).astype(np.float32)
        if self.tasks is None:
            return np.asarray(self._session.run(None, {self._input.name: x})[0], np.float32)
        # Multi-task: each task's output by the name metadata.json records (default: the task's name).
        names = self.output_names or {t: t for t in self.tasks.names}
        values = self._session.run(list(names.values()), {self._input.name: x})
        return self.tasks.join(dict(zip(names, values)))


def onnxruntime_module() -> Any:
    """``onnxruntime``, or an ExportError naming the extra that installs it (an optional dependency)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ExportError(f"running .onnx files needs onnxruntime, which is not installed: {ONNX_EXTRA}") from exc
    return onnxruntime


def compiled_predict(model: Any, tasks: TaskLayout | None = None) -> Any:
    """``model(x, training=False)`` as one ``tf.function``: (B, ...) uint8 or float32 tensor -> (B, C).

    Traced once per input shape class (``reduce_retracing``: a new batch size or image size
    generalises the trace instead of adding one per shape), so many files cost one graph.
    A multi-task model's dict of outputs comes back joined in ``tasks`` order (:func:`join_outputs`).
    """
    return tf.function(lambda x: join_outputs(model(tf.cast(x, tf.float32), training=False), tasks),
                       reduce_retracing=True)


def join_outputs(outputs: Any, tasks: TaskLayout | None) -> Any:
    """A model call's result as one (B, C) tensor: a multi-task model's dict ``{task: (B, C_task)}``
    concatenated in ``tasks`` order (all its outputs, by name: never by position, which Keras sorts);
    a single output as it is.

    Raises:
        ExportError: the model returns a dict but no layout says the task order, or lacks a task.
    """
    if not isinstance(outputs, dict):
        return outputs
    if tasks is None:
        raise ExportError(f"the model returns several outputs ({sorted(outputs)}) but no task order is known; "
                          "read it through RunDir (labels.json) or an export's metadata.json")
    missing = [t for t in tasks.names if t not in outputs]
    if missing:
        raise ExportError(f"the model has no output for task(s) {missing}; it returns {sorted(outputs)}")
    return tf.concat([tf.cast(outputs[t], tf.float32) for t in tasks.names], axis=-1)


def load_exported_predictor(
    path: str | Path,
) -> SavedModelPredictor | TFLitePredictor | KerasFilePredictor | OnnxPredictor | None:
    """A predictor for an exported artifact, or ``None`` when ``path`` is not one.

    Recognised: a SavedModel directory with ``saved_model.pb`` and ``metadata.json`` (a
    version directory written by :func:`tlkit.export.export_run`), a ``.tflite`` or ``.onnx`` file, or a
    ``.keras`` file, each with ``metadata.json`` or ``labels.txt`` beside it for the class
    names. See the module docstring for what ``predict_one`` takes and returns.

    Raises:
        ExportError: the artifact is recognised but its labels cannot be found.
    """
    p = Path(path)
    metadata = metadata_beside(p)
    windows = ClipWindows.from_metadata(metadata)  # audio exports: how a clip is windowed
    tasks = TaskLayout.from_metadata(metadata)  # multi-task exports: the tasks and their classes
    if p.is_dir() and (p / SAVED_MODEL_FILE).is_file() and (p / METADATA_FILE).is_file():
        spec = metadata.get("artifacts", {}).get("savedmodel", {}).get("input", {})
        return SavedModelPredictor(str(p), labels_beside(p / SAVED_MODEL_FILE), input_name=spec.get("name", "image"),
                                   windows=windows if spec.get("windows") else None, tasks=tasks)
    if p.is_file() and p.suffix == ".tflite":
        return TFLitePredictor(str(p), labels_beside(p), windows=windows, tasks=tasks,
                               output_names=task_output_names(p))
    if p.is_file() and p.suffix == ".onnx":
        if tasks is not None:
            return OnnxPredictor(str(p), labels_beside(p), tasks=tasks, output_names=task_output_names(p))
        return OnnxPredictor.from_file(p)
    if p.is_file() and p.suffix == ".keras" and ((p.parent / METADATA_FILE).is_file() or (p.parent / LABELS_FILE).is_file()):
        return KerasFilePredictor(str(p), labels_beside(p), windows=windows, tasks=tasks)
    return None


def task_output_names(artifact: str | Path) -> dict[str, str] | None:
    """Task -> output name of a multi-task artifact file, from its entry in the ``metadata.json``
    beside it (``artifacts.<format>.outputs.<task>.name``); ``None`` when not recorded."""
    p = Path(artifact)
    for entry in (metadata_beside(p).get("artifacts") or {}).values():
        if isinstance(entry, dict) and entry.get("path") == p.name and isinstance(entry.get("outputs"), dict):
            names = {t: o.get("name") for t, o in entry["outputs"].items() if isinstance(o, dict)}
            return {t: str(n) for t, n in names.items() if n} or None
    return None


def metadata_beside(target: str | Path) -> dict[str, Any]:
    """``metadata.json`` of an export: inside ``target`` (a directory) or beside it (a file).

    ``{}`` when there is none or it cannot be read (an artifact copied without it).
    """
    path = Path(target)
    meta = (path if path.is_dir() else path.parent) / METADATA_FILE
    try:
        value = read_json(meta, default={})
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def labels_beside(artifact: str | Path) -> list[str]:
    """The class names for an artifact file: ``metadata.json``'s ``labels``, else ``labels.txt``.

    Raises:
        ExportError: neither file beside ``artifact`` names the classes.
    """
    artifact = Path(artifact)
    labels = metadata_beside(artifact.parent).get("labels")
    if isinstance(labels, list) and labels:
        return [str(v) for v in labels]
    labels_path = artifact.parent / LABELS_FILE
    if labels_path.is_file():
        return [line for line in labels_path.read_text(encoding="utf-8").splitlines() if line]
    raise ExportError(
        f"no class names for {str(artifact)!r}: expected {METADATA_FILE} or {LABELS_FILE} beside it "
        "(copy them along with the model file)"
    )
