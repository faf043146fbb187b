"""The outputs of a multi-task model, laid out for readers that expect one probability vector.

A multi-task model (issue #19; one functional Keras model whose call returns a dict
``{task: (B, C_task) probabilities}``) has one head per task. Predictors, parity checks and
``tlkit predict`` keep working on one (C,) vector per example: the tasks' probabilities
concatenated in task order. :class:`TaskLayout` records that order, each task's classes and
whether it is multi-label, and splits the vector back into ``{task: (C_task,)}``.

Task order is the order of the run's ``labels.json`` (``RunDir.task_labels()``), never the
position of a model output: Keras flattens dict outputs sorted by key, so ``model.outputs``
and ``model.output_names`` come sorted whatever order the tasks were declared in.
Every export's ``metadata.json`` carries the layout as ``"tasks": {task: {"labels": [...],
"multi_label": bool}}`` (:meth:`TaskLayout.to_metadata`, :meth:`TaskLayout.from_metadata`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tlkit.text import format_table

SEPARATOR = ":"
"""Between task and class in the flat labels (``"accent:scottish"``), as in manifest columns ``task:<name>``."""


@dataclass(frozen=True)
class TaskOutput:
    """One task of a layout: its name, classes (in output order) and whether it is multi-label."""

    name: str
    labels: tuple[str, ...]
    multi_label: bool = False


@dataclass(frozen=True)
class TaskLayout:
    """The tasks of a multi-task model in output order (see the module docstring).

    Attributes:
        heads: one :class:`TaskOutput` per task, in task order.
    """

    heads: tuple[TaskOutput, ...]

    @classmethod
    def from_labels(cls, labels: Mapping[str, Sequence[str]], multi_label: Mapping[str, bool] | None = None
                    ) -> TaskLayout:
        """``{task: [class, ...]}`` (task order kept) and ``{task: multi_label}`` -> a layout."""
        flags = multi_label or {}
        return cls(tuple(TaskOutput(str(t), tuple(str(c) for c in names), bool(flags.get(t, False)))
                         for t, names in labels.items()))

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> TaskLayout | None:
        """The layout in an export's ``metadata.json`` (its ``"tasks"``), or ``None`` (single-task)."""
        tasks = metadata.get("tasks") if isinstance(metadata, Mapping) else None
        if not isinstance(tasks, Mapping) or not tasks:
            return None
        return cls(tuple(TaskOutput(str(t), tuple(str(c) for c in entry.get("labels", ())),
                                  bool(entry.get("multi_label", False))) for t, entry in tasks.items()))

    def to_metadata(self) -> dict[str, dict[str, Any]]:
        """``{task: {"labels": [...], "multi_label": bool}}`` for ``metadata.json``."""
        return {h.name: {"labels": list(h.labels), "multi_label": h.multi_label} for h in self.heads}

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.heads]

    def head(self, name: str) -> TaskOutput:
        for h in self.heads:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def flat_labels(self) -> list[str]:
        """``task:class`` for every output of the concatenated vector, in its order."""
        return [f"{h.name}{SEPARATOR}{c}" for h in self.heads for c in h.labels]

    @property
    def size(self) -> int:
        return sum(len(h.labels) for h in self.heads)

    def slices(self) -> dict[str, slice]:
        """Each task's columns in the concatenated vector."""
        out, start = {}, 0
        for h in self.heads:
            out[h.name] = slice(start, start + len(h.labels))
            start += len(h.labels)
        return out

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """(..., C_total) -> ``{task: (..., C_task)}``."""
        values = np.asarray(flat)
        if values.shape[-1] != self.size:
            raise ValueError(f"expected {self.size} outputs for tasks {self.names}, got shape {values.shape}")
        return {name: values[..., part] for name, part in self.slices().items()}

    def join(self, outputs: Mapping[str, Any]) -> np.ndarray:
        """``{task: (..., C_task)}`` -> (..., C_total) float32, concatenated in task order."""
        missing = [n for n in self.names if n not in outputs]
        if missing:
            raise ValueError(f"the model has no output for task(s) {missing}; it returns {sorted(outputs)}")
        return np.concatenate([np.asarray(outputs[n], np.float32) for n in self.names], axis=-1)


def top_per_task(probabilities: np.ndarray, layout: TaskLayout, k: int = 3) -> dict[str, list[tuple[str, float]]]:
    """``{task: [(class, p), ...]}``, the ``k`` most probable classes of each task, best first."""
    parts = layout.split(probabilities)
    result = {}
    for h in layout.heads:
        p = parts[h.name]
        order = np.argsort(-p)[: min(k, len(h.labels))]
        result[h.name] = [(h.labels[i], float(p[i])) for i in order]
    return result


def run_layout(task_labels: Mapping[str, Sequence[str]], model: Any = None,
               status: Mapping[str, Any] | None = None) -> TaskLayout:
    """The layout of a multi-task run: its ``labels.json`` tasks (``RunDir.task_labels()``), each
    multi-label when the model's ``<task>`` output activation is a sigmoid (else as ``run.json``
    ``"tasks"`` records it; else single-label)."""
    recorded = {str(e.get("name")): bool(e.get("multi_label")) for e in (status or {}).get("tasks") or []
                if isinstance(e, Mapping)}
    flags = {}
    for name in task_labels:
        activation = ""
        if model is not None and name in [layer.name for layer in getattr(model, "layers", [])]:
            activation = getattr(getattr(model.get_layer(name), "activation", None), "__name__", "")
        flags[name] = activation == "sigmoid" if activation in ("sigmoid", "softmax") else recorded.get(name, False)
    return TaskLayout.from_labels(task_labels, flags)


def prediction_table(results: Sequence[Any], tasks: TaskLayout, k: int = 3) -> str:
    """The ``tlkit predict`` table of a multi-task model: per file (a :class:`tlkit.predict.FilePrediction`),
    the top ``k`` classes of each task (columns ``<task> top 1`` ...), or the file's error; audio
    adds what was scored."""
    widths = {h.name: min(k, len(h.labels)) for h in tasks.heads}
    headers = ["file", *(f"{t} top {i + 1}" for t, n in widths.items() for i in range(n))]
    audio = any(r.seconds is not None for r in results)
    rows = []
    for r in results:
        if r.ok:
            assert r.probabilities is not None
            tops = top_per_task(r.probabilities, tasks, k)
            cells = [f"{label} {p:.3f}" for t in widths for label, p in tops[t]]
        else:
            cells = [f"error: {r.error}"] + [""] * (sum(widths.values()) - 1)
        rows.append([r.file, *cells, *((f"scored {r.scored}" if r.scored else "",) if audio else ())])
    return format_table([*headers, *(["scored"] if audio else [])], rows)
