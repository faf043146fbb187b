"""Multi-task data: checked, split examples and per-task targets in which a missing label is masked.

Targets of one task are dense float32 ``(N, C_task)`` rows: one-hot (single-label) or multi-hot
(multi-label); a row whose label is missing is filled with ``-1.0``, which the masked losses and
metrics of :mod:`tlkit.multitask.losses` skip.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tlkit.data.batches import Batches
from tlkit.data.images import Example, Splits, check_images, make_batches, stratified_split
from tlkit.data.listing import TaskColumn
from tlkit.errors import DataError
from tlkit.multitask.manifest import list_task_manifest, require_task_classes, with_classes

log = logging.getLogger("tlkit.data")

#: The target value of every entry of a row whose label is missing.
MISSING = -1.0


def load_task_splits(
    manifest: str | Path, tasks: Sequence[TaskColumn], *, val_fraction: float = 0.15, test_fraction: float = 0.15,
    seed: int = 0, check: bool = True,
) -> Splits:
    """Reads a multi-task manifest, decodes every image once (unreadable files skipped and
    reported) and splits stratified on each example's first labelled task.

    Returns:
        :class:`~tlkit.data.images.Splits` with ``tasks`` (their classes filled in) and empty
        ``class_names``.

    Raises:
        DataError: see :func:`tlkit.multitask.manifest.list_task_manifest`; no file decodes; a task
            has too few classes left once unreadable files are skipped.
    """
    listing = list_task_manifest(manifest, tasks)
    examples, skipped = listing.examples, []
    if check:
        examples, skipped = check_images(listing.examples)
        if not examples:
            raise DataError(f"none of the image files listed in {manifest} could be decoded (first: {skipped[:3]})")
        require_task_classes(examples, tasks, f"manifest {str(manifest)!r} (readable files)")
    train, val, test = stratified_split(examples, val_fraction, test_fraction, seed)
    notes = [*listing.notes, *_single_example_notes(examples, tasks)]
    return Splits([], train, val, test, skipped, listing.ignored, [], notes, with_classes(examples, tasks))


def _single_example_notes(examples: Sequence[Example], tasks: Sequence[TaskColumn]) -> list[str]:
    """One note per task naming its classes with a single labelled example (they can only be in one split)."""
    notes = []
    for task in tasks:
        counts = Counter(label for e in examples for label in e.task_labels(task.name))
        single = sorted(name for name, count in counts.items() if count == 1)
        if single:
            notes.append(f"task {task.name!r}: class(es) {single} have a single labelled example: validation and "
                         "test never measure them; add examples")
            log.warning("%s", notes[-1])
    return notes


def task_targets(examples: Sequence[Example], tasks: Sequence[TaskColumn]) -> dict[str, np.ndarray]:
    """``{task: (N, C_task) float32}``: one-/multi-hot rows, ``-1.0`` rows where the label is missing."""
    targets = {}
    for task in tasks:
        index = {name: i for i, name in enumerate(task.classes)}
        rows = np.zeros((len(examples), len(task.classes)), np.float32)
        for row, example in enumerate(examples):
            labels = example.task_labels(task.name)
            if not labels:
                rows[row] = MISSING
            for label in labels:
                rows[row, index[label]] = 1.0
        targets[task.name] = rows
    return targets


def labelled(targets: np.ndarray) -> np.ndarray:
    """The boolean mask of rows of a task's targets that hold a label."""
    return np.asarray(targets)[:, 0] >= 0


def task_batches(
    examples: Sequence[Example], tasks: Sequence[TaskColumn], image_size: tuple[int, int], batch_size: int, *,
    training: bool = False, seed: int = 0, cache: bool | str = True,
) -> Batches:
    """:class:`~tlkit.data.batches.Batches` of ``(pixels uint8 (H, W, 3), {task: targets (C_task,)})``."""
    return make_batches(examples, [], image_size, batch_size, training=training, seed=seed, cache=cache,
                        targets=task_targets(examples, tasks))
