"""Parity: a written artifact, reloaded as a user would, against the run's Keras model.

Each artifact gets what a user of it would give it: whole raw held-out examples (an image
of any size, a whole clip). Images are compared with the Keras model on the input the
artifact really sees (``predictor.prepare``, e.g. resized for TFLite). Clips are compared
with the run's own clip-level scoring, the mean over the windows of
:class:`tlkit.audio_windows.ClipWindows` computed by :func:`tlkit.data.audio.predict_clips`
(what ``tlkit predict RUN`` and the run's evaluation do), so an artifact that hears the
clip differently from the run fails here instead of in the field.

A multi-task artifact is compared task by task (:func:`tlkit.export.multitask.task_parity`):
its top-1 agreement is the lowest of its tasks', so it passes only if every task does, and
``FormatResult.tasks`` holds each task's figures.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.artifacts import METADATA_FILE, compiled_predict, join_outputs
from tlkit.errors import ExportError
from tlkit.export.formats import ExportFormat
from tlkit.export.multitask import task_parity
from tlkit.export.report import FormatResult
from tlkit.export.source import ExportSource
from tlkit.fileio import write_json


def verify(
    fmt: ExportFormat,
    directory: Path,
    source: ExportSource,
    examples: list[np.ndarray],
    references: dict[str, list[np.ndarray]],
    threshold: float,
    info: dict[str, Any],
) -> tuple[FormatResult, str]:
    """Reloads ``directory / fmt.file``, runs it on the parity examples, compares with the Keras model.

    Args:
        examples: raw held-out examples (any size; whole clips for audio).
        references: reference probabilities already computed, by the digest of the inputs
            the artifact saw (shared between formats that see the same inputs).
        threshold: the top-1 agreement the artifact must reach.
        info: the format's metadata entry (written beside the artifact for the reload).

    Returns:
        The :class:`FormatResult` and the runtime the predictor reports ("" when none).

    Raises:
        ExportError: the reloaded artifact has other labels, or returns another shape or
            non-finite probabilities.
    """
    # Labels and the window contract come from the files beside the artifact, as a user's would.
    write_json(directory / METADATA_FILE, {**source.contract_metadata(), "artifacts": {fmt.name: info}})
    path = directory / fmt.file
    predictor = fmt.reload(fmt, path, source)
    if list(predictor.labels) != source.labels:
        raise ExportError(f"reloaded labels {predictor.labels} differ from the run's {source.labels}")
    want = np.stack(_references(source, predictor, examples, references))
    predictor.predict_one(examples[0])  # warm-up, not timed
    got, times = [], []
    for example in examples:
        start = time.perf_counter()
        got.append(np.asarray(predictor.predict_one(example), np.float32))
        times.append(time.perf_counter() - start)
    have = np.stack(got)
    if have.shape != want.shape:
        raise ExportError(f"the reloaded {fmt.name} model returns shape {have.shape[1:]}, expected {want.shape[1:]}")
    if not np.all(np.isfinite(have)):
        raise ExportError(f"the reloaded {fmt.name} model returns NaN or infinite probabilities")
    runtime = str(getattr(predictor, "runtime", "") or "")
    tasks = source.tasks
    per_task = task_parity(want, have, tasks) if tasks is not None else None
    if tasks is None or per_task is None:
        agreement = float(np.mean(have.argmax(1) == want.argmax(1)))
        flips = disagreement_note(want, have)
    else:  # every task must agree: the artifact's agreement is its weakest task's
        agreement = min(v["top1_agreement"] for v in per_task.values())
        wanted, had = tasks.split(want), tasks.split(have)
        flips = "; ".join(f"{t}: {note}" for t in per_task if (note := disagreement_note(wanted[t], had[t])))
        flips = "top-1 agreement per task " + ", ".join(
            f"{t} {v['top1_agreement']:.3f}" for t, v in per_task.items()) + (f"; {flips}" if flips else "")
    parts = (f"runtime {runtime}" if runtime else "", _correction_note(info), flips)
    return FormatResult(
        format=fmt.name, path=fmt.file, size_bytes=fmt.size(path),
        max_abs_diff=float(np.max(np.abs(have - want))), top1_agreement=agreement,
        latency_ms=float(np.median(times) * 1000.0), min_agreement=threshold, samples=len(examples),
        passed=agreement >= threshold, notes="; ".join(part for part in parts if part), tasks=per_task,
    ), runtime


def disagreement_note(want: np.ndarray, have: np.ndarray) -> str:
    """Where the artifact picks another class: how far the Keras model's top-1 led its runner-up there.

    Examples on which the Keras model is itself torn between two classes flip under any
    small perturbation; a disagreement on a clear lead points at the artifact instead.
    ``want`` and ``have`` are (N, C) probabilities; "" when they agree everywhere.
    """
    if want.shape[1] < 2:
        return ""
    flipped = np.flatnonzero(have.argmax(1) != want.argmax(1))
    if not flipped.size:
        return ""
    top2 = np.sort(want, axis=1)[:, -2:]
    lead = top2[:, 1] - top2[:, 0]
    shown = ", ".join(f"{v:.3f}" for v in np.sort(lead[flipped])[:10])
    more = f" (+{flipped.size - 10} more)" if flipped.size > 10 else ""
    return (
        f"{flipped.size} disagreement(s) where the Keras top-1 probability led the runner-up by {shown}{more} "
        f"(median lead over all {len(lead)} examples {float(np.median(lead)):.3f})"
    )


def _references(source: ExportSource, predictor: Any, examples: list[np.ndarray],
                references: dict[str, list[np.ndarray]]) -> list[np.ndarray]:
    """What the run gives for each example: clip-level scores (audio) or the Keras model on the
    input the artifact sees (images)."""
    windows = source.windows
    if windows is not None:
        key = "clips:" + _digest(examples)
        if key not in references:
            predict = compiled_predict(source.model, source.tasks)
            references[key] = [windows.score(lambda rows: predict(np.asarray(rows, np.float32)), x) for x in examples]
        return references[key]
    prepare = getattr(predictor, "prepare", None) or (lambda x: x)
    seen = [np.asarray(prepare(x), np.float32) for x in examples]
    key = _digest(seen)
    if key not in references:
        references[key] = [keras_probabilities(source.model, x, source.tasks) for x in seen]
    return references[key]


def keras_probabilities(model: Any, example: np.ndarray, tasks: Any = None) -> np.ndarray:
    """(C,) probabilities of the Keras model for one example (no batch axis); a multi-task
    model's tasks joined in ``tasks`` order (a :class:`tlkit.task_outputs.TaskLayout`)."""
    outputs = model(np.asarray(example, np.float32)[None], training=False)
    return np.asarray(join_outputs(outputs, tasks), np.float32)[0]


def _correction_note(info: dict[str, Any]) -> str:
    correction = info.get("bias_correction")
    if isinstance(correction, dict):
        return f"bias correction: {correction['layers']} layers, {correction['examples']} examples"
    if correction and correction != "off":
        return f"bias correction {correction}"
    return ""


def _digest(arrays: list[np.ndarray]) -> str:
    """Identifies a list of inputs by content, so formats that see the same inputs share a reference."""
    h = hashlib.sha1()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()
