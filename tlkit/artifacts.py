"""Exported artifacts, the reading side: their file names, and predictors that run them.

:func:`tlkit.export.export_run` writes a version directory (see :mod:`tlkit.export`); this
module reads one, or a single artifact copied out of one, without the exporter::

    <version>/
        saved_model.pb, variables/   SavedModel; signature ``serving_default``
        keras_model.keras            the Keras model (loads with safe_mode=True after ``import tlkit``)
        model_fp32.tflite ...        TFLite files at a fixed input size (batch 1)
        labels.txt                   class names, one a line, in output order
        metadata.json                labels, modality, sample rate, input contract per artifact

Every predictor has ``.labels`` and ``.predict_one(example) -> (C,) float32 probabilities``
for one raw example: (H, W, 3) float pixels 0..255 of any size, or a (samples,) waveform;
``.prepare(example)`` gives the example as the artifact itself sees it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

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
MAX_TOP_K = 5
"""The SavedModel signature's ``labels`` / ``scores`` hold the top min(5, C) classes."""


@dataclass
class SavedModelPredictor:
    """An exported SavedModel directory as a :class:`tlkit.predict.Predictor`.

    ``predict_one`` takes one raw example, (H, W, 3) pixels 0..255 (any size; rounded to
    uint8) or a (samples,) waveform, and returns (C,) float32 probabilities.
    """

    path: str
    labels: list[str]
    input_name: str = "image"
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


@dataclass
class TFLitePredictor:
    """A ``.tflite`` file as a :class:`tlkit.predict.Predictor`.

    ``predict_one`` takes one raw example, (H, W, 3) pixels 0..255 of any size (resized to
    the model's fixed size with the Keras model's bilinear resize) or a (samples,)
    waveform (cropped or zero-padded to the fixed length), and returns (C,) float32
    probabilities (dequantized when the model has int8 outputs).
    """

    path: str
    labels: list[str]
    num_threads: int = 1
    runtime: str = ""
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
        x = self.prepare(example)[None]
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
    """An exported ``keras_model.keras`` (loaded with safe_mode=True) as a predictor."""

    path: str
    labels: list[str]
    _model: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        register_serializables()
        self._model = keras.saving.load_model(self.path, safe_mode=True, compile=False)

    def prepare(self, example: np.ndarray) -> np.ndarray:
        return example

    def predict_one(self, example: np.ndarray) -> np.ndarray:
        return np.asarray(self._model(np.asarray(example, np.float32)[None], training=False))[0]


def load_exported_predictor(path: str | Path) -> SavedModelPredictor | TFLitePredictor | KerasFilePredictor | None:
    """A predictor for an exported artifact, or ``None`` when ``path`` is not one.

    Recognised: a SavedModel directory with ``saved_model.pb`` and ``metadata.json`` (a
    version directory written by :func:`tlkit.export.export_run`), a ``.tflite`` file, or a
    ``.keras`` file, each with ``metadata.json`` or ``labels.txt`` beside it for the class
    names. See the module docstring for what ``predict_one`` takes and returns.

    Raises:
        ExportError: the artifact is recognised but its labels cannot be found.
    """
    p = Path(path)
    if p.is_dir() and (p / SAVED_MODEL_FILE).is_file() and (p / METADATA_FILE).is_file():
        spec = metadata_beside(p).get("artifacts", {}).get("savedmodel", {}).get("input", {})
        return SavedModelPredictor(str(p), labels_beside(p / SAVED_MODEL_FILE), input_name=spec.get("name", "image"))
    if p.is_file() and p.suffix == ".tflite":
        return TFLitePredictor(str(p), labels_beside(p))
    if p.is_file() and p.suffix == ".keras" and ((p.parent / METADATA_FILE).is_file() or (p.parent / LABELS_FILE).is_file()):
        return KerasFilePredictor(str(p), labels_beside(p))
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
