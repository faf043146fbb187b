"""Masked losses and metrics: a row whose label is missing for a task adds nothing to that task.

A task's targets are ``(B, C)`` one-hot / multi-hot rows; a missing label is a row of ``-1.0``
(:data:`tlkit.multitask.data.MISSING`). :class:`MaskedCrossentropy` gives such rows zero loss and
exactly zero gradient (they are selected out with ``where``, not multiplied by a mask), and averages
over the labelled rows of the batch; a batch without any labelled row for a task contributes 0.
:class:`MaskedAccuracy` counts labelled rows only. Both are registered, so a saved multi-task model
reloads compiled.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from tlkit.model import HeadConfig


def _mask(y_true: Any) -> Any:
    """(B,) bool: the rows that hold a label (their first entry is not negative)."""
    return y_true[:, 0] >= 0


@keras.saving.register_keras_serializable(package="tlkit")
class MaskedCrossentropy(keras.losses.Loss):
    """Categorical (``multi_label=False``) or binary cross-entropy on probabilities, over labelled rows.

    Input: ``y_true`` (B, C) targets, ``-1`` rows where missing; ``y_pred`` (B, C) probabilities.
    Output: the mean cross-entropy of the labelled rows, times ``weight`` (the task's loss weight).
    Binary cross-entropy is averaged over the C classes, as Keras's ``BinaryCrossentropy`` does.
    """

    def __init__(self, multi_label: bool = False, label_smoothing: float = 0.0, weight: float = 1.0,
                 name: str | None = None, reduction: str = "sum_over_batch_size", dtype: Any = None) -> None:
        default = "masked_binary_crossentropy" if multi_label else "masked_categorical_crossentropy"
        super().__init__(name=name or default, reduction=reduction, dtype=dtype)
        self.multi_label = bool(multi_label)
        self.label_smoothing = float(label_smoothing)
        self.weight = float(weight)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        y_pred = ops.convert_to_tensor(y_pred)
        y_true = ops.cast(y_true, y_pred.dtype)
        mask = _mask(y_true)
        clean = ops.where(ops.expand_dims(mask, -1), y_true, ops.zeros_like(y_true))
        if self.multi_label:
            per_row = keras.losses.binary_crossentropy(clean, y_pred, label_smoothing=self.label_smoothing)
        else:
            per_row = keras.losses.categorical_crossentropy(clean, y_pred, label_smoothing=self.label_smoothing)
        labelled = ops.maximum(ops.sum(ops.cast(mask, per_row.dtype)), 1.0)
        rows = ops.cast(ops.shape(per_row)[0], per_row.dtype)
        # The default reduction divides the sum by the batch size B; scaling by B / labelled makes
        # the result the mean over labelled rows.
        return ops.where(mask, per_row, ops.zeros_like(per_row)) * (rows / labelled * self.weight)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "multi_label": self.multi_label, "label_smoothing": self.label_smoothing,
                "weight": self.weight}


@keras.saving.register_keras_serializable(package="tlkit")
class MaskedAccuracy(keras.metrics.Metric):
    """Accuracy over labelled rows: arg-max agreement (single-label), or the mean per-label
    agreement at 0.5 (multi-label, as Keras's ``BinaryAccuracy``). Rows of ``-1`` are skipped."""

    def __init__(self, multi_label: bool = False, name: str = "accuracy", dtype: Any = None) -> None:
        super().__init__(name=name, dtype=dtype)
        self.multi_label = bool(multi_label)
        self.correct = self.add_variable(shape=(), initializer="zeros", name="correct")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        y_pred = ops.convert_to_tensor(y_pred)
        y_true = ops.cast(y_true, y_pred.dtype)
        mask = ops.cast(_mask(y_true), "float32")
        if self.multi_label:
            hits = ops.mean(ops.cast(ops.equal(y_pred >= 0.5, y_true >= 0.5), "float32"), axis=-1)
        else:
            hits = ops.cast(ops.equal(ops.argmax(y_pred, axis=-1), ops.argmax(y_true, axis=-1)), "float32")
        self.correct.assign_add(ops.sum(hits * mask))
        self.count.assign_add(ops.sum(mask))

    def result(self) -> Any:
        return ops.divide_no_nan(self.correct, self.count)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "multi_label": self.multi_label}


def task_losses(tasks: Sequence[Any], head: HeadConfig) -> dict[str, MaskedCrossentropy]:
    """``{task: MaskedCrossentropy}`` for tasks with ``name``, ``multi_label``, ``loss_weight``."""
    return {t.name: MaskedCrossentropy(t.multi_label, head.label_smoothing, getattr(t, "loss_weight", 1.0))
            for t in tasks}


def task_metrics(tasks: Sequence[Any]) -> dict[str, list[Any]]:
    """``{task: [MaskedAccuracy]}``: Keras logs them as ``<task>_accuracy``."""
    return {t.name: [MaskedAccuracy(t.multi_label, name="accuracy")] for t in tasks}


def task_scores(targets: dict[str, Any], probabilities: dict[str, Any], tasks: Sequence[Any],
                head: HeadConfig) -> dict[str, float]:
    """What ``model.evaluate`` reports for a multi-task model, from whole-data targets and
    probabilities (e.g. audio clips scored as the mean of their crops): ``<task>_loss`` (masked,
    times the task's ``loss_weight``), ``<task>_accuracy`` (labelled rows only) and their ``loss`` sum."""
    losses = task_losses(tasks, head)
    scores: dict[str, float] = {}
    for task in tasks:
        accuracy = MaskedAccuracy(task.multi_label)
        accuracy.update_state(targets[task.name], probabilities[task.name])
        scores[f"{task.name}_loss"] = float(losses[task.name](targets[task.name], probabilities[task.name]))
        scores[f"{task.name}_accuracy"] = float(accuracy.result())
    return {"loss": float(sum(scores[f"{t.name}_loss"] for t in tasks)), **scores}
