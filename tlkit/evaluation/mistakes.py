"""Right and wrong decisions per example, and ``misclassified.csv`` (most confident mistakes first)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.fileio import atomic_write_text


@dataclass
class Outcome:
    """Per example: right or wrong, the class to explain, and the model's confidence in its decision."""

    correct: np.ndarray  # (N,) bool
    explained: np.ndarray  # (N,) int
    confidence: np.ndarray  # (N,) float


def outcomes(truth: np.ndarray, probs: np.ndarray, decided: np.ndarray, multi_label: bool) -> Outcome:
    """The :class:`Outcome` of (N, C) decisions against (N, C) 0/1 truth, given (N, C) probabilities."""
    probs = np.asarray(probs, np.float64)
    if not multi_label:
        predicted = decided.argmax(1)
        correct = predicted == truth.argmax(1)
        return Outcome(correct, predicted, probs[np.arange(len(probs)), predicted])
    # Multi-label: confidence in a decision is p for a "yes", 1 - p for a "no". A wrong row is
    # explained by its most confident wrong decision; a right row by its top label.
    decision_confidence = np.where(decided > 0, probs, 1 - probs)
    wrong = decided != truth
    worst = np.where(wrong, decision_confidence, -1.0)
    correct = ~wrong.any(1)
    explained = np.where(correct, probs.argmax(1), worst.argmax(1))
    confidence = np.where(correct, probs.max(1), worst.max(1))
    return Outcome(correct, explained, confidence)


def write_misclassified(
    path: Path, truth: np.ndarray, probs: np.ndarray, decided: np.ndarray, names: Sequence[str],
    row_paths: Sequence[str], multi_label: bool, outcome: Outcome,
) -> list[dict[str, Any]]:
    """Writes ``misclassified.csv`` (most confident mistakes first); returns its rows.

    Columns: ``path``, ``true_label``, ``predicted_label`` (``|``-joined), ``confidence``, and
    ``worst_label`` (multi-label) or ``true_label_probability`` (single-label).
    """
    rows = misclassified_rows(truth, probs, decided, names, row_paths, multi_label, outcome)
    columns = ["path", "true_label", "predicted_label", "confidence"]
    columns.append("worst_label" if multi_label else "true_label_probability")
    write_rows(path, rows, columns)
    return rows


def misclassified_rows(
    truth: np.ndarray, probs: np.ndarray, decided: np.ndarray, names: Sequence[str],
    row_paths: Sequence[str], multi_label: bool, outcome: Outcome,
) -> list[dict[str, Any]]:
    """The rows of :func:`write_misclassified`, most confident mistakes first."""
    rows = []
    for i in np.flatnonzero(~outcome.correct):
        true_labels = "|".join(names[j] for j in np.flatnonzero(truth[i]))
        predicted = "|".join(names[j] for j in np.flatnonzero(decided[i]))
        row: dict[str, Any] = {"path": row_paths[i], "true_label": true_labels, "predicted_label": predicted,
                               "confidence": float(outcome.confidence[i])}
        if multi_label:
            row["worst_label"] = names[int(outcome.explained[i])]
        else:
            row["true_label_probability"] = float(probs[i, int(truth[i].argmax())])
        rows.append(row)
    rows.sort(key=lambda r: -r["confidence"])
    return rows


def write_rows(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """A CSV of ``rows`` with ``columns`` (a row without a column leaves it empty; floats with 6 decimals)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buffer.getvalue())
