"""Labels and decisions: targets as 0/1 indicator matrices, the task, thresholds, decided classes.

Decisions: single-label models predict the arg-max class. A binary model with a threshold
``T`` predicts the positive class when ``p(positive) >= T``; a multi-label model predicts
every label with ``p >= T`` (default 0.5; one threshold, or one per label).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tlkit.errors import ConfigError, DataError

#: Clipping bound of probabilities before a logarithm.
EPS = 1e-12


def task_of(num_classes: int, multi_label: bool) -> str:
    """``"multilabel"``, ``"binary"`` (two softmax classes) or ``"multiclass"``."""
    if multi_label:
        return "multilabel"
    return "binary" if num_classes == 2 else "multiclass"


def indicator(y_true: Any, num_classes: int, multi_label: bool) -> np.ndarray:
    """(N,) class indices or (N, C) one-hot / multi-hot -> (N, C) float64 0/1.

    Raises:
        DataError: indices out of range, or a shape that is neither.
    """
    y = np.asarray(y_true)
    if y.ndim == 1 and not multi_label:
        labels = y.astype(int)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"class indices must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")
        return np.eye(num_classes, dtype=np.float64)[labels]
    if y.ndim == 1 and multi_label and num_classes == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[1] != num_classes:
        raise DataError(f"labels have shape {y.shape}; expected (N,) indices or (N, {num_classes}) indicators")
    return (y > 0.5).astype(np.float64)


def positive_index(positive: int | str | None, names: Sequence[str]) -> int:
    """The index of a binary model's positive class (an index or a name; default 1)."""
    if positive is None:
        return 1
    if isinstance(positive, (int, np.integer)):
        if not 0 <= int(positive) < len(names):
            raise ConfigError(f"positive class index {positive} is out of range for classes {list(names)}")
        return int(positive)
    if positive not in names:
        raise ConfigError(f"positive class {positive!r} is not one of the classes {list(names)}")
    return list(names).index(positive)


def per_class(threshold: float | Sequence[float], index: int, count: int) -> float:
    """Class ``index``'s threshold from one threshold or ``count`` of them."""
    values = np.asarray(threshold, np.float64).reshape(-1)
    if values.size == 1:
        return float(values[0])
    if values.size != count:
        raise ConfigError(f"got {values.size} thresholds for {count} classes; give one, or one per class")
    return float(values[index])


def describe_threshold(threshold: float | Sequence[float] | None, default: float) -> str:
    """``"0.5"``, or ``"the per-class thresholds"``, for the report's decision rule."""
    if threshold is None:
        return f"{default:g}"
    values = np.asarray(threshold, np.float64).reshape(-1)
    return f"{values[0]:g}" if values.size == 1 else "the per-class thresholds"


def decide(probs: np.ndarray, task: str, threshold: Any, pos: int | None) -> np.ndarray:
    """(N, C) 0/1 decisions: arg-max, the binary threshold rule, or per-label thresholds."""
    n, c = probs.shape
    if task == "multilabel":
        limits = np.array([per_class(0.5 if threshold is None else threshold, i, c) for i in range(c)])
        return (probs >= limits[None, :]).astype(np.float64)
    if task == "binary" and threshold is not None:
        positive = probs[:, pos] >= per_class(threshold, 0, 1)
        predicted = np.where(positive, pos, 1 - pos)
    else:
        predicted = probs.argmax(1)
    return np.eye(c, dtype=np.float64)[predicted] if n else np.zeros((0, c))
