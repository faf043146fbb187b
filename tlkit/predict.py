"""Predictions from a run directory (and, through :mod:`tlkit.export`, from exported models).

A predictor takes raw input (image pixels 0..255 of any size, or a waveform) and returns
class probabilities; the preprocessing lives inside the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tlkit.errors import ConfigError, DataError


class Predictor(Protocol):
    """Anything that maps one raw example to probabilities, with label names."""

    labels: list[str]

    def predict_one(self, example: np.ndarray) -> np.ndarray: ...


@dataclass
class KerasPredictor:
    """Wraps a Keras classifier (e.g. a run's ``model.keras``)."""

    model: Any
    labels: list[str]

    def predict_one(self, example: np.ndarray) -> np.ndarray:
        return np.asarray(self.model(example[None].astype(np.float32), training=False))[0]


def load_image(path: str | Path) -> np.ndarray:
    """A file -> (H, W, 3) float32 pixels 0..255 (grayscale and RGBA become RGB)."""
    import tensorflow as tf

    try:
        data = tf.io.read_file(str(path))
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except Exception as exc:  # tf raises several OpError kinds
        raise DataError(f"cannot read image {str(path)!r}: {str(exc).splitlines()[0]}") from exc
    return image.numpy().astype(np.float32)


def load_predictor(target: str | Path) -> Predictor:
    """A predictor for a run directory, an exported SavedModel directory or a ``.tflite`` file."""
    path = Path(target)
    if (path / "model.keras").is_file():
        from tlkit.run import load_run_model

        model, labels = load_run_model(path)
        return KerasPredictor(model, labels)
    try:
        from tlkit.export import load_exported_predictor
    except ImportError:
        load_exported_predictor = None  # type: ignore[assignment]
    if load_exported_predictor is not None:
        predictor = load_exported_predictor(path)
        if predictor is not None:
            return predictor
    raise ConfigError(
        f"{str(path)!r} is not a run directory (with model.keras), an exported SavedModel or a .tflite file"
    )


def top_k(probabilities: np.ndarray, labels: list[str], k: int = 3) -> list[tuple[str, float]]:
    """The ``k`` most probable labels with their probabilities, best first."""
    order = np.argsort(-probabilities)[:k]
    return [(labels[i], float(probabilities[i])) for i in order]
