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

Every predictor has ``.labels`` and ``.predict_one(example) -> (C,) float32 probabilities``
for one raw example: (H, W, 3) float pixels 0..255 of any size, or a (samples,) waveform;
``.prepare(example)`` gives the example as the artifact itself sees it. SavedModel and
``.keras`` predictors also have ``.predict_batch(batch) -> (B, C)`` for same-shape
examples (TFLite files take batch 1).

Loading a SavedModel runs its graph, and a graph can hold ops that read or write any file
the process may touch (``ReadFile``, ``WriteFile``) or run Python (``PyFunc``).
:mod:`tlkit.savedmodel_ops` lists such ops from ``saved_model.pb`` without loading
anything (``tlkit inspect DIR``); :func:`tlkit.predict.load_predictor` refuses a flagged
SavedModel unless trusted. See docs/deploy.md.
"""

from __future__ import annotations

import json
import warnings
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
        return np.asarray(self._fn(**{self.input_name: batch})["probabilities"])[0]

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """(B, ...) raw examples of one shape -> (B, C) probabilities, one signature call."""
        if self.input_name == "image":
            tensor = tf.constant(np.clip(np.rint(batch), 0, 255).astype(np.uint8))
        else:
            tensor = tf.constant(np.asarray(batch, np.float32))
        return np.asarray(self._fn(**{self.input_name: tensor})["probabilities"])


@dataclass
class TFLitePredictor:
    """A ``.tflite`` file as a :class:`tlkit.predict.Predictor`.

    ``predict_one`` takes one raw example, (H, W, 3) pixels 0..255 of any size (resized to
    the model's fixed size with the Keras model's bilinear resize) or a (samples,)
    waveform, and returns (C,) float32 probabilities (dequantized when the model has int8
    outputs). With a window contract (``windows``, from ``metadata.json``) a waveform of
    any length is scored as the run scores it: the mean over its fixed-length windows
    (:mod:`tlkit.audio_windows`); without one it is cropped or zero-padded to the fixed length.
    """

    path: str
    labels: list[str]
    num_threads: int = 1
    runtime: str = ""
    windows: ClipWindows | None = None
    _interpreter: Any = field(default=None, repr=False)
    _input: dict[str, Any] = field(default_factory=dict, repr=False)
    _output: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._interpreter, self.runtime = make_interpreter(self.path, self.num_threads)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The fixed input shape including the batch axis, e.g. (1, 224, 224, 3)."""
        return tuple(int(v) for v in self._input["shape"])

    def prepare(self, example: np.ndarray) -> np.ndarray:
        """One raw example fitted to the fixed input size (float32, no batch axis)."""
        return fit_fixed(np.asarray(example, np.float32), self.input_shape[1:])

    def predict_one(self, example: np.ndarray) -> np.ndarray:
        wave = np.asarray(example, np.float32)
        if self.windows is not None and wave.ndim == 1 and len(self.input_shape) == 2:
            if len(wave) == self.windows.clip_samples:  # every window is the clip itself
                return self._invoke(wave)
            return self.windows.score(lambda rows: np.stack([self._invoke(row) for row in rows]), wave)
        return self._invoke(self.prepare(example))

    def _invoke(self, example: np.ndarray) -> np.ndarray:
        """One example already at the fixed input size (no batch axis) -> (C,) float32."""
        x = np.asarray(example, np.float32)[None]
        scale, zero_point = self._input["quantization"]
        dtype = self._input["dtype"]
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            x = np.clip(np.rint(x / scale + zero_point), info.min, info.max)
        self._interpreter.set_tensor(self._input["index"], x.astype(dtype))
        self._interpreter.invoke()
        y = self._interpreter.get_tensor(self._output["index"])[0]
        scale, zero_point = self._output["quantization"]
        if np.issubdtype(y.dtype, np.integer):
            y = (y.astype(np.float32) - zero_point) * scale
        return y.astype(np.float32)


@dataclass
class KerasFilePredictor:
    """An exported ``keras_model.keras`` (loaded with safe_mode=True) as a predictor.

    Audio models with a window contract (``windows``, from ``metadata.json``) score a
    whole waveform of any length as the run does (:mod:`tlkit.audio_windows`).
    """

    path: str
    labels: list[str]
    windows: ClipWindows | None = None
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
        return np.asarray(self._model(x[None], training=False))[0]

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """(B, ...) raw examples of one shape -> (B, C) probabilities, through one compiled function."""
        if self._batch_fn is None:
            self._batch_fn = compiled_predict(self._model)
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
            embedded = session.get_modelmeta().custom_metadata_map.get("labels")
            if not embedded:
                raise
            return cls(str(path), [str(v) for v in json.loads(embedded)])

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
        return np.asarray(self._session.run(None, {self._input.name: x})[0], np.float32)


def onnxruntime_module() -> Any:
    """``onnxruntime``, or an ExportError naming the extra that installs it (an optional dependency)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ExportError(f"running .onnx files needs onnxruntime, which is not installed: {ONNX_EXTRA}") from exc
    return onnxruntime


def compiled_predict(model: Any) -> Any:
    """``model(x, training=False)`` as one ``tf.function``: (B, ...) uint8 or float32 tensor -> (B, C).

    Traced once per input shape class (``reduce_retracing``: a new batch size or image size
    generalises the trace instead of adding one per shape), so many files cost one graph.
    """
    return tf.function(lambda x: model(tf.cast(x, tf.float32), training=False), reduce_retracing=True)


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
    windows = ClipWindows.from_metadata(metadata_beside(p))  # audio exports: how a clip is windowed
    if p.is_dir() and (p / SAVED_MODEL_FILE).is_file() and (p / METADATA_FILE).is_file():
        spec = metadata_beside(p).get("artifacts", {}).get("savedmodel", {}).get("input", {})
        return SavedModelPredictor(str(p), labels_beside(p / SAVED_MODEL_FILE), input_name=spec.get("name", "image"),
                                   windows=windows if spec.get("windows") else None)
    if p.is_file() and p.suffix == ".tflite":
        return TFLitePredictor(str(p), labels_beside(p), windows=windows)
    if p.is_file() and p.suffix == ".onnx":
        return OnnxPredictor.from_file(p)
    if p.is_file() and p.suffix == ".keras" and ((p.parent / METADATA_FILE).is_file() or (p.parent / LABELS_FILE).is_file()):
        return KerasFilePredictor(str(p), labels_beside(p), windows=windows)
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


def make_interpreter(path: str, num_threads: int) -> tuple[Any, str]:
    """A LiteRT interpreter and its runtime's name; TensorFlow's deprecated ``tf.lite.Interpreter`` without it."""
    try:  # optional: LiteRT, the maintained TFLite runtime
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        with warnings.catch_warnings():
            # tf.lite.Interpreter warns it is deprecated; it is the documented fallback here.
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter(model_path=path, num_threads=num_threads), "tf.lite (deprecated)"
    return Interpreter(model_path=path, num_threads=num_threads), "ai_edge_litert"


def fit_fixed(example: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One raw example at a fixed input shape (no batch axis): images resized, audio cropped.

    ``shape`` is (H, W, 3) or (samples,); an image already at (H, W) comes back unchanged.
    """
    if len(shape) == 3:
        if tuple(example.shape[:2]) == tuple(shape[:2]):
            return example
        # The same op and options as keras.layers.Resizing (bilinear, no antialias), so the
        # resize before a TFLite model gives what the Keras model computes inside.
        return tf.image.resize(example[None], shape[:2], method="bilinear").numpy()[0]
    return fit_length(example, shape[0])


def fit_length(waveform: np.ndarray, length: int) -> np.ndarray:
    """The centre ``length`` samples of a (samples,) waveform, zero-padded equally on both
    sides when it is shorter (the single crop of ``tlkit.data.audio.fixed_crops``)."""
    wave = np.asarray(waveform, np.float32).reshape(-1)
    if wave.shape[0] < length:
        left = (length - wave.shape[0]) // 2
        return np.pad(wave, (left, length - wave.shape[0] - left))
    start = (wave.shape[0] - length) // 2
    return wave[start : start + length]
