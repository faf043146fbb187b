"""Per-task baselines of a multi-task run: each task measured against the strongest simple things.

For every task, on the rows labelled for it: the no-transfer baseline (logistic regression on
downsampled pixels or, for audio, log-mel statistics: :func:`tlkit.baselines.no_transfer_baseline`)
and the linear probe of the frozen pretrained backbone (:func:`tlkit.baselines.linear_probe`); image
runs probe the same features the head stage is solved on (one backbone pass for all tasks), audio
runs the mean features of each clip's evaluation crops, as the single-task audio probe does. After training, the model's own accuracy
per task goes beside them, with the NEGATIVE-TRANSFER / FINE-TUNING warnings of
:mod:`tlkit.transfer_report`. ``run.json`` holds ``{"transfer": {"tasks": {task: report}}}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tlkit.baselines import feature_extractor, linear_probe, no_transfer_baseline
from tlkit.data.images import Example, Splits
from tlkit.data.listing import TaskColumn
from tlkit.errors import DataError
from tlkit.feature_cache import FeatureCache
from tlkit.multitask.data import labelled, task_targets
from tlkit.transfer_report import TransferReport, finish_report


def task_examples(examples: Sequence[Example], task: str) -> list[Example]:
    """The examples labelled for ``task``, as single-task examples of that task's labels."""
    return [Example(e.path, e.task_labels(task), e.group) for e in examples if e.task_labels(task)]


def measure_task_baselines(
    model: Any, splits: Splits, features_of: Callable[[Any, Sequence[Example]], np.ndarray],
    cache: FeatureCache | None, *, waveforms: dict[str, np.ndarray] | None = None, sample_rate: int | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> dict[str, TransferReport]:
    """``{task: TransferReport}`` with the baseline and the probe of each task, before training.

    Args:
        model: the multi-task classifier with its pretrained backbone not yet fine-tuned.
        features_of: ``(feature extractor, examples) -> (N, C)`` frozen features, one row per example.
        cache: image runs: the feature cache of this model on the training and validation batches
            (its features serve every task's probe), or ``None`` (then they are computed here).
        waveforms / sample_rate: audio runs: the decoded clips, for the log-mel baseline.
    """
    if not splits.val:
        say("baselines skipped: the run has no validation split to choose their regularisation on")
        return {}
    started = time.monotonic()
    extractor = feature_extractor(model)
    parts = [splits.train, splits.val, splits.test]
    if cache is not None and cache.val_x is not None:
        features = [np.asarray(cache.train_x), np.asarray(cache.val_x)]
    else:
        features = [features_of(extractor, part) for part in parts[:2]]
    features.append(features_of(extractor, parts[2]) if parts[2] else np.zeros((0, 1), np.float32))
    feature_seconds = time.monotonic() - started
    reports: dict[str, TransferReport] = {}
    for task in splits.tasks:
        targets = [task_targets(part, [task])[task.name] for part in parts]
        masks = [labelled(t) if len(t) else np.zeros(0, bool) for t in targets]
        try:
            baseline = no_transfer_baseline(*(task_examples(part, task.name) for part in parts[:2]),
                                            list(task.classes), test=task_examples(parts[2], task.name),
                                            waveforms=waveforms, sample_rate=sample_rate)
            started = time.monotonic()
            has_test = bool(masks[2].any())
            probe = linear_probe(features[0][masks[0]], targets[0][masks[0]], features[1][masks[1]],
                                 targets[1][masks[1]], features[2][masks[2]] if has_test else None,
                                 targets[2][masks[2]] if has_test else None, multi_label=task.multi_label,
                                 name="linear probe (frozen backbone)")
            probe.seconds = time.monotonic() - started + feature_seconds
        except DataError as exc:  # e.g. no labelled validation row, or one class in training
            say(f"task {task.name!r}: baselines skipped ({exc})")
            continue
        say(f"task {task.name!r}: no-transfer baseline val accuracy {baseline.val_accuracy:.3f}, linear probe "
            f"{probe.val_accuracy:.3f}")
        reports[task.name] = TransferReport(baseline, probe)
    return reports


def finish_task_reports(
    reports: dict[str, TransferReport], tasks: Sequence[TaskColumn],
    val: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None,
    test: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None, *, seconds: float,
) -> dict[str, TransferReport]:
    """Adds each task's fine-tuned accuracy on its labelled val / test rows and the warnings.

    ``val`` / ``test``: ``(targets, probabilities)``, each ``{task: (N, C_task)}``."""
    for task in tasks:
        report = reports.get(task.name)
        if report is None:
            continue

        def rows(pair: tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None) -> Any:
            if pair is None:
                return None
            keep = labelled(pair[0][task.name])
            return (pair[0][task.name][keep], np.asarray(pair[1][task.name])[keep]) if keep.any() else None

        finish_report(report, rows(val), rows(test), multi_label=task.multi_label, seconds=seconds)
    return reports
