"""Predictions from a run directory (and, through :mod:`tlkit.artifacts`, from exported models).

A predictor takes raw input (image pixels 0..255 of any size, or a waveform) and returns
class probabilities; the preprocessing lives inside the model.

:func:`predict_files` is what ``tlkit predict`` runs: every file becomes the rows the model
scores (an image, decoded whole; an audio file, by suffix or any file when the model takes
a waveform, decoded to mono at the model's rate and, when the model was trained on fixed
crops, cut into ``max(eval_crops, ceil(seconds / clip_seconds))`` evenly spaced crops whose
mean probabilities are the file's, so a long clip is heard whole: :mod:`tlkit.audio_windows`).
Rows of the same shape go through the model together, in batches, through a compiled
function (``predictor.predict_batch`` where the predictor has one). A file that cannot be
read, holds NaN or infinite samples, or for which the model returns anything but finite
numbers gets a :class:`FilePrediction` with the reason in ``error`` and no probabilities;
the other files are still scored. :func:`predict_file` is the one-file form that raises.

A multi-task model (a run or export with ``tasks``, see :mod:`tlkit.task_outputs`) gives one
vector per file, its tasks' probabilities concatenated in task order; ``FilePrediction.to_dict``
and :func:`tlkit.task_outputs.prediction_table` give one set of top classes per task.

Loading a SavedModel runs its TensorFlow graph; :func:`load_predictor` refuses one whose
graph reads or writes files or calls Python (see :func:`tlkit.savedmodel_ops.unsafe_ops`)
unless ``trust=True``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tensorflow as tf

from tlkit.artifacts import (
    SAVED_MODEL_FILE,
    compiled_predict,
    join_outputs,
    load_exported_predictor,
    metadata_beside,
)
from tlkit.audio_windows import window_count
from tlkit.data.audio import clip_samples, fixed_crops, is_audio_file, load_audio
from tlkit.data.images import decode_rgb
from tlkit.errors import ConfigError, DataError, TlkitError
from tlkit.model_info import takes_waveform
from tlkit.rundir import RunDir
from tlkit.savedmodel_ops import unsafe_ops
from tlkit.task_outputs import TaskLayout, run_layout, top_per_task
from tlkit.text import first_line

#: What a model call can raise on one input (TensorFlow ops, Keras shape checks, TFLite).
_MODEL_ERRORS = (tf.errors.OpError, ValueError, RuntimeError, TlkitError)


class Predictor(Protocol):
    """Anything that maps one raw example to probabilities, with label names.

    A predictor may also have ``predict_batch(batch (B, ...)) -> (B, C)`` for a stack of
    same-shape examples; :func:`predict_files` uses it when present.
    """

    labels: list[str]

    def predict_one(self, example: np.ndarray) -> np.ndarray: ...


@dataclass
class KerasPredictor:
    """Wraps a Keras classifier (e.g. a run's ``model.keras``).

    Audio models also carry their input contract: ``sample_rate`` (Hz), and the crop
    length ``clip_seconds`` and number of crops ``crops`` that :func:`predict_file`
    averages (``None``: score the whole clip at once). A multi-task model has ``tasks``; its
    probabilities are the tasks' concatenated in task order (``labels``: ``task:class``).
    """

    model: Any
    labels: list[str]
    sample_rate: int | None = None
    clip_seconds: float | None = None
    crops: int = 1
    tasks: TaskLayout | None = None
    _batch_fn: Any = field(default=None, repr=False, compare=False)

    def predict_one(self, example: np.ndarray) -> np.ndarray:
        return np.asarray(join_outputs(self.model(example[None].astype(np.float32), training=False), self.tasks))[0]

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """(B, ...) raw examples of one shape -> (B, C), through one compiled function."""
        if self._batch_fn is None:
            self._batch_fn = compiled_predict(self.model, self.tasks)
        return np.asarray(self._batch_fn(tf.constant(np.asarray(batch))))  # uint8 pixels or float32 audio


@dataclass(frozen=True)
class AudioInput:
    """How an audio model wants a clip: rate, crop length in samples (``None``: whole clip), crops.

    A clip is cut into ``max(crops, ceil(samples / clip_samples))`` evenly spaced crops
    (:mod:`tlkit.audio_windows`); ``inside``: the model cuts them itself (an exported
    model whose window contract is in its ``metadata.json``), so it takes the whole clip.
    """

    sample_rate: int
    clip_samples: int | None = None
    crops: int = 1
    inside: bool = False


@dataclass
class FilePrediction:
    """One file's result: ``probabilities`` (C,) float32, or ``error`` saying why there are none."""

    file: str
    probabilities: np.ndarray | None = None
    error: str | None = None
    seconds: float | None = None
    windows: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def scored(self) -> str:
        """How much audio was scored, e.g. ``"36.0 s in 12 windows"`` ("" for images)."""
        if self.seconds is None:
            return ""
        return f"{self.seconds:.1f} s in {self.windows} window{'s' if self.windows != 1 else ''}"

    def to_dict(self, labels: list[str], k: int = 3, tasks: TaskLayout | None = None) -> dict[str, Any]:
        """``{"file", "top": [[label, p], ...] or None, "error": None or the reason}`` (JSON-ready);
        audio adds ``seconds`` (the clip's length) and ``windows`` (how many were scored).
        With ``tasks`` (a multi-task model), ``"tasks": {task: [[class, p], ...]}`` replaces ``"top"``."""
        extra = {} if self.seconds is None else {"seconds": self.seconds, "windows": self.windows}
        if tasks is not None:
            per_task = None if self.probabilities is None else {
                task: [list(pair) for pair in top] for task, top in top_per_task(self.probabilities, tasks, k).items()}
            return {"file": self.file, "tasks": per_task, "error": self.error, **extra}
        top = None if self.probabilities is None else [list(pair) for pair in top_k(self.probabilities, labels, k)]
        return {"file": self.file, "top": top, "error": self.error, **extra}


def load_image(path: str | Path) -> np.ndarray:
    """A file -> (H, W, 3) float32 pixels 0..255 (grayscale and RGBA become RGB)."""
    return _decode(path).astype(np.float32)


def _decode(path: str | Path) -> np.ndarray:
    """A file -> (H, W, 3) uint8 pixels, decoded as training decodes (``tlkit.data.decode_rgb``:
    WebP through Pillow). Batches stay uint8 until the model's input casts them (4x less copying)."""
    try:
        image = decode_rgb(tf.io.read_file(str(path)))
    except Exception as exc:  # tf raises several OpError kinds
        raise DataError(f"cannot read image {str(path)!r}: {str(exc).splitlines()[0]}") from exc
    return image.numpy()


def load_predictor(target: str | Path, *, trust: bool = False) -> Predictor:
    """A predictor for a run directory, an exported SavedModel directory, a ``.tflite`` or ``.keras`` file.

    A run's model is loaded by :meth:`tlkit.rundir.RunDir.load_model`; an audio run's
    predictor carries the run's input contract (sample rate, crop length, crops).

    A SavedModel's graph runs when it is loaded and called, and a graph can read and write
    files. Unless ``trust`` is true, a SavedModel with any op that
    :func:`tlkit.savedmodel_ops.unsafe_ops` flags is refused before it is loaded.

    Raises:
        ConfigError: ``target`` is none of these, or a SavedModel with flagged ops and
            ``trust`` is false.
    """
    path = Path(target)
    if RunDir.is_run(path):
        run = RunDir(path)
        model = run.load_model(compile=False)
        contract = run.input_contract(model)
        task_labels = run.task_labels()
        tasks = run_layout(task_labels, model, run.status()) if task_labels else None
        labels = tasks.flat_labels if tasks is not None else run.labels()
        if not contract.is_audio:
            return KerasPredictor(model, labels, tasks=tasks)
        return KerasPredictor(model, labels, sample_rate=contract.sample_rate,
                              clip_seconds=contract.clip_seconds, crops=contract.eval_crops, tasks=tasks)
    if not trust and path.is_dir() and (path / SAVED_MODEL_FILE).is_file():
        flagged = unsafe_ops(path)
        if flagged:
            listed = "; ".join(f"{op}: {why}" for op, why in sorted(flagged.items()))
            raise ConfigError(
                f"SavedModel {str(path)!r} has ops that reach outside the model ({listed}); loading it runs them. "
                f"Inspect it with `tlkit inspect {path}`, and pass --trust (trust=True) only if you trust "
                "whoever made it"
            )
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
    windows = getattr(predictor, "windows", None)  # an exported audio model's own window contract
    if windows is not None:
        return AudioInput(windows.sample_rate, windows.clip_samples, windows.crops, inside=True)
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


def file_inputs(path: str | Path, contract: AudioInput | None, crops: int | None = None) -> np.ndarray:
    """The rows the model scores for one file: ``(1, H, W, 3)`` pixels, or ``(n, samples)`` audio.

    Audio is decoded at ``contract.sample_rate``; with a crop length,
    ``max(crops, ceil(samples / clip_samples))`` evenly spaced crops (``crops`` defaults to
    ``contract.crops``), so a long clip is heard whole; else (or when the model cuts its
    own windows and ``crops`` is not given) the whole clip as one row.

    Raises:
        DataError: the file cannot be decoded, it is audio and the model takes images, or
            it holds NaN or infinite samples (training skips such files too).
    """
    return file_rows(path, contract, crops)[0]


def file_rows(
    path: str | Path, contract: AudioInput | None, crops: int | None = None
) -> tuple[np.ndarray, float | None, int | None]:
    """:func:`file_inputs` with, for audio, the clip's seconds and the number of windows scored."""
    if contract is None:
        if is_audio_file(path):
            raise DataError(f"{str(path)!r} is an audio file, but the model takes images")
        return _decode(path)[None], None, None
    waveform = load_audio(path, contract.sample_rate)
    if not np.isfinite(waveform).all():
        raise DataError(f"audio file {str(path)!r} holds NaN or infinite samples; re-encode it (training skips it too)")
    seconds = len(waveform) / contract.sample_rate
    if contract.clip_samples is None:
        return waveform[None], seconds, 1
    count = window_count(len(waveform), contract.clip_samples, crops or contract.crops)
    if contract.inside and crops is None:
        return waveform[None], seconds, count
    return fixed_crops(waveform, contract.clip_samples, count), seconds, count


def predict_files(
    predictor: Any,
    files: Sequence[str | Path],
    *,
    target: str | Path | None = None,
    crops: int | None = None,
    batch_size: int = 32,
) -> list[FilePrediction]:
    """One :class:`FilePrediction` per file, in order; a bad file never stops the others.

    Files are read ``batch_size`` at a time (so memory stays bounded) and their rows (see
    :func:`file_inputs`) go through the model in same-shape batches of up to
    ``batch_size``; an audio file's probabilities are the mean over its crops.

    Raises:
        ConfigError: the model takes a waveform but its sample rate is unknown.
    """
    contract = audio_input(predictor, target)
    results: list[FilePrediction] = []
    for start in range(0, len(files), max(1, batch_size)):
        chunk = [str(f) for f in files[start : start + max(1, batch_size)]]
        rows: list[np.ndarray | str] = []
        scored: list[tuple[float | None, int | None]] = []
        for file in chunk:
            try:
                row, seconds, windows = file_rows(file, contract, crops)
                rows.append(row)
                scored.append((seconds, windows))
            except TlkitError as exc:
                rows.append(str(exc))
                scored.append((None, None))
        outputs = _score([r for r in rows if not isinstance(r, str)], predictor, batch_size)
        for file, row, (seconds, windows) in zip(chunk, rows, scored):
            result = FilePrediction(file, error=row) if isinstance(row, str) else _combine(file, next(outputs))
            if result.ok:
                result.seconds, result.windows = seconds, windows
            results.append(result)
    return results


def predict_examples(
    predictor: Any, examples: Sequence[np.ndarray], *, names: Sequence[str] | None = None, batch_size: int = 32
) -> list[FilePrediction]:
    """:func:`predict_files` for examples decoded elsewhere (e.g. DICOM pixels): one raw example
    each, (H, W, 3) pixels 0..255 or a (samples,) waveform; ``names`` label the results
    (default ``#0``, ``#1``, ...). Same-shape examples are scored together, in batches."""
    keys = list(names) if names is not None else [f"#{i}" for i in range(len(examples))]
    outputs = _score([np.asarray(x, np.float32)[None] for x in examples], predictor, batch_size)
    return [_combine(key, next(outputs)) for key in keys]


def predict_file(
    predictor: Any, path: str | Path, *, target: str | Path | None = None, crops: int | None = None
) -> np.ndarray:
    """Probabilities ``(C,)`` for one image or audio file (see :func:`predict_files`).

    Raises:
        DataError: the file cannot be decoded, it is audio and the model takes images, it
            holds NaN or infinite samples, or the model's output for it is not finite.
    """
    result = predict_files(predictor, [path], target=target, crops=crops)[0]
    if result.probabilities is None:
        raise DataError(result.error)
    return result.probabilities


def _score(inputs: list[np.ndarray], predictor: Any, batch_size: int) -> Any:
    """Yields, per input of (n, ...) rows, its (n, C) outputs or the error message of the model call."""
    flat = [(i, row) for i, rows in enumerate(inputs) for row in rows]
    outputs: list[np.ndarray | str | None] = [None] * len(flat)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for j, (_, row) in enumerate(flat):
        groups.setdefault((row.shape, row.dtype.str), []).append(j)
    step = max(1, batch_size) if hasattr(predictor, "predict_batch") else 1
    for members in groups.values():
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            for j, value in zip(chunk, _call([flat[j][1] for j in chunk], predictor)):
                outputs[j] = value
    by_input: list[list[Any]] = [[] for _ in inputs]
    for (i, _), value in zip(flat, outputs):
        by_input[i].append(value)
    yield from by_input


def _call(rows: list[np.ndarray], predictor: Any) -> list[np.ndarray | str]:
    """The model on same-shape ``rows``: one (C,) array or an error message per row.

    A batch that fails is retried row by row, so one input the model rejects costs only itself.
    """
    try:
        if len(rows) == 1 and not hasattr(predictor, "predict_batch"):
            return [np.asarray(predictor.predict_one(rows[0]), np.float32)]
        values = np.asarray(predictor.predict_batch(np.stack(rows)), np.float32)
        if values.ndim != 2 or values.shape[0] != len(rows):
            raise ValueError(f"the model returned shape {values.shape} for a batch of {len(rows)}")
        return list(values)
    except _MODEL_ERRORS as exc:
        if len(rows) > 1:
            return [value for row in rows for value in _call([row], predictor)]
        return [f"the model failed on this file: {type(exc).__name__}: {first_line(exc)}"]


def _combine(file: str, outputs: list[np.ndarray | str]) -> FilePrediction:
    """A file's prediction from its rows' outputs: their mean, or the first error; non-finite is an error."""
    for value in outputs:
        if isinstance(value, str):
            return FilePrediction(file, error=value)
    probabilities = np.mean(np.stack(outputs), axis=0).astype(np.float32)
    if not np.isfinite(probabilities).all():
        return FilePrediction(
            file, error="the model returned NaN or infinite probabilities for this file (a broken model or input)"
        )
    return FilePrediction(file, probabilities)
