"""Running TFLite files: the predictor, the interpreter, and inputs fitted to a fixed size.

Part of the reading side of exports (:mod:`tlkit.artifacts` re-exports every name here).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tensorflow as tf

from tlkit.audio_windows import ClipWindows
from tlkit.errors import ExportError
from tlkit.task_outputs import TaskLayout


@dataclass
class TFLitePredictor:
    """A ``.tflite`` file as a :class:`tlkit.predict.Predictor`.

    ``predict_one`` takes one raw example, (H, W, 3) pixels 0..255 of any size (resized to
    the model's fixed size with the Keras model's bilinear resize) or a (samples,)
    waveform, and returns (C,) float32 probabilities (dequantized when the model has int8
    outputs). With a window contract (``windows``, from ``metadata.json``) a waveform of
    any length is scored as the run scores it: the mean over its fixed-length windows
    (:mod:`tlkit.audio_windows`); without one it is cropped or zero-padded to the fixed length.

    A multi-task file (``tasks``) is run through its signature runner, each task's output
    read by its signature output name (``output_names``: task -> name, as ``metadata.json``
    records it; default ``output_<i>`` for the i-th task), since the interpreter's tensor
    order need not follow the tasks.
    """

    path: str
    labels: list[str]
    num_threads: int = 1
    runtime: str = ""
    windows: ClipWindows | None = None
    tasks: TaskLayout | None = None
    output_names: dict[str, str] | None = None
    _interpreter: Any = field(default=None, repr=False)
    _input: dict[str, Any] = field(default_factory=dict, repr=False)
    _output: dict[str, Any] = field(default_factory=dict, repr=False)
    _runner: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._interpreter, self.runtime = make_interpreter(self.path, self.num_threads)
        if self.tasks is not None:
            self._runner = self._interpreter.get_signature_runner()
            key, self._input = next(iter(self._runner.get_input_details().items()))
            self._input = {**self._input, "key": key}
            self._output = self._runner.get_output_details()
            names = self.output_names or {t: f"output_{i}" for i, t in enumerate(self.tasks.names)}
            missing = sorted(set(names.values()) - set(self._output))
            if missing or set(names) != set(self.tasks.names):
                raise ExportError(
                    f"TFLite file {self.path!r} has outputs {sorted(self._output)}, not the outputs {names} of "
                    f"tasks {self.tasks.names} that its metadata.json names; re-export it with tlkit"
                )
            self.output_names = dict(names)
            return
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
        if self._runner is not None:
            assert self.tasks is not None and self.output_names is not None
            outputs = self._runner(**{self._input["key"]: x.astype(dtype)})
            return self.tasks.join({t: _dequantized(outputs[name][0], self._output[name])
                                    for t, name in self.output_names.items()})
        self._interpreter.set_tensor(self._input["index"], x.astype(dtype))
        self._interpreter.invoke()
        return _dequantized(self._interpreter.get_tensor(self._output["index"])[0], self._output)


def _dequantized(y: np.ndarray, details: dict[str, Any]) -> np.ndarray:
    """A TFLite output as float32: int8 / uint8 outputs mapped back with their scale and zero point."""
    if np.issubdtype(y.dtype, np.integer):
        scale, zero_point = details["quantization"]
        y = (y.astype(np.float32) - zero_point) * scale
    return y.astype(np.float32)


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
