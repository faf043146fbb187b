"""Predictions from a run directory (and, through :mod:`tlkit.artifacts`, from exported models).

A predictor takes raw input (image pixels 0..255 of any size, or a waveform) and returns
class probabilities; the preprocessing lives inside the model.

:func:`predict_file` is what ``tlkit predict`` runs per file: an image is decoded and
passed whole; an audio file (by suffix, or any file when the model takes a waveform) is
decoded to mono at the model's sample rate and, when the model was trained on fixed
crops, scored as the mean probabilities of several evenly spaced crops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tensorflow as tf

from tlkit.artifacts import load_exported_predictor, metadata_beside
from tlkit.data.audio import clip_samples, fixed_crops, is_audio_file, load_audio
from tlkit.errors import ConfigError, DataError
from tlkit.rundir import RunDir, takes_waveform


class Predictor(Protocol):
    """Anything that maps one raw example to probabilities, with label names."""

    labels: list[str]

    def predict_one(self, example: np.ndarray) -> np.ndarray: ...


@dataclass
class KerasPredictor:
    """Wraps a Keras classifier (e.g. a run's ``model.keras``).

    Audio models also carry their input contract: ``sample_rate`` (Hz), and the crop
    length ``clip_seconds`` and number of crops ``crops`` that :func:`predict_file`
    averages (``None``: score the whole clip at once).
    """

    model: Any
    labels: list[str]
    sample_rate: int | None = None
    clip_seconds: float | None = None
    crops: int = 1

    def predict_one(self, example: np.ndarray) -> np.ndarray:
        return np.asarray(self.model(example[None].astype(np.float32), training=False))[0]


@dataclass(frozen=True)
class AudioInput:
    """How an audio model wants a clip: rate, crop length in samples (``None``: whole clip), crops."""

    sample_rate: int
    clip_samples: int | None = None
    crops: int = 1


def load_image(path: str | Path) -> np.ndarray:
    """A file -> (H, W, 3) float32 pixels 0..255 (grayscale and RGBA become RGB)."""
    try:
        data = tf.io.read_file(str(path))
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except Exception as exc:  # tf raises several OpError kinds
        raise DataError(f"cannot read image {str(path)!r}: {str(exc).splitlines()[0]}") from exc
    return image.numpy().astype(np.float32)


def load_predictor(target: str | Path) -> Predictor:
    """A predictor for a run directory, an exported SavedModel directory, a ``.tflite`` or ``.keras`` file.

    A run's model is loaded by :meth:`tlkit.rundir.RunDir.load_model`; an audio run's
    predictor carries the run's input contract (sample rate, crop length, crops).

    Raises:
        ConfigError: ``target`` is none of these.
    """
    path = Path(target)
    if RunDir.is_run(path):
        run = RunDir(path)
        model = run.load_model(compile=False)
        contract = run.input_contract(model)
        if not contract.is_audio:
            return KerasPredictor(model, run.labels())
        return KerasPredictor(model, run.labels(), sample_rate=contract.sample_rate,
                              clip_seconds=contract.clip_seconds, crops=contract.eval_crops)
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


def audio_input(predictor: Any, target: str | Path | None = None) -> AudioInput | None:
    """The audio contract of ``predictor``, or ``None`` when it takes images.

    Read from the predictor's own ``sample_rate`` / ``clip_seconds`` / ``crops`` attributes
    (run directories), else from ``metadata.json`` beside an exported ``target``
    (``sample_rate``), with a TFLite model's fixed input length as its crop.

    Raises:
        ConfigError: the model takes a waveform but its sample rate cannot be found.
    """
    rate = getattr(predictor, "sample_rate", None)
    metadata = metadata_beside(target) if target is not None else {}
    model = getattr(predictor, "model", None)
    takes_audio = (
        rate is not None
        or getattr(predictor, "input_name", None) == "waveform"
        or metadata.get("modality") == "audio"
        or (model is not None and takes_waveform(model))
        or len(getattr(predictor, "input_shape", ()) or ()) == 2
    )
    if not takes_audio:
        return None
    rate = rate or metadata.get("sample_rate")
    if not rate:
        raise ConfigError(
            f"the model {str(target) if target else ''!r} takes a waveform but its sample rate is unknown "
            "(no sample_rate in run.json or metadata.json); re-run or re-export it with this tlkit"
        )
    fixed = getattr(predictor, "input_shape", None)
    if fixed and len(fixed) == 2:  # TFLite: (1, samples), one fixed-length crop per call
        return AudioInput(int(rate), int(fixed[1]), max(1, int(getattr(predictor, "crops", 1) or 1)))
    seconds = getattr(predictor, "clip_seconds", None)
    if not seconds:
        return AudioInput(int(rate))
    return AudioInput(int(rate), clip_samples(float(seconds), int(rate)), max(1, int(getattr(predictor, "crops", 1))))


def predict_file(
    predictor: Any, path: str | Path, *, target: str | Path | None = None, crops: int | None = None
) -> np.ndarray:
    """Probabilities ``(C,)`` for one image or audio file.

    Audio (an audio suffix, or any file when the model takes a waveform): decoded to mono
    at the model's rate; with a crop length, the mean over ``crops`` (default: the run's
    ``eval_crops``) evenly spaced crops, as the run's test metrics were computed.

    Raises:
        DataError: the file cannot be decoded, or it is audio and the model takes images.
    """
    contract = audio_input(predictor, target)
    if contract is None:
        if is_audio_file(path):
            raise DataError(f"{str(path)!r} is an audio file, but the model takes images")
        return np.asarray(predictor.predict_one(load_image(path)), np.float32)
    waveform = load_audio(path, contract.sample_rate)
    if contract.clip_samples is None:
        return np.asarray(predictor.predict_one(waveform), np.float32)
    count = crops or contract.crops
    rows = fixed_crops(waveform, contract.clip_samples, count)
    return np.mean([np.asarray(predictor.predict_one(row), np.float32) for row in rows], axis=0)
