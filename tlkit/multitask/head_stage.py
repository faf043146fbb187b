"""The head stage of a multi-task run: each task's head solved on cached features, on its labelled rows.

The backbone features of the training and validation images are computed once
(:class:`~tlkit.feature_cache.FeatureCache`, shared by every task and by the linear probes); each
task's head is then fitted to convergence by :func:`tlkit.head_fit.solve_head` on the rows that
hold a label for that task, so a missing label is never guessed. The stage is recorded like one of
:func:`tlkit.fine_tune`'s (final weights and ``done.json`` under ``checkpoints/<stage>/``, one history
record), so ``fine_tune`` skips it when it runs the rest of the schedule, and a resumed run does not
solve it again.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit.checkpointing import finish_stage, stage_finished
from tlkit.data.listing import TaskColumn
from tlkit.feature_cache import FeatureCache
from tlkit.head_fit import HeadFit, solve_head
from tlkit.model import HeadConfig, backbone_groups
from tlkit.multitask.data import labelled
from tlkit.multitask.losses import MaskedAccuracy, MaskedCrossentropy
from tlkit.multitask.model import task_head
from tlkit.rundir import RunDir
from tlkit.schedule import Schedule, Stage


def leading_head_stages(schedule: Schedule) -> list[Stage]:
    """The head-only stages before the first stage that thaws backbone groups, whose head may be
    solved (``solver`` other than ``"sgd"``) and that run at all."""
    found = []
    for stage in schedule.stages:
        if stage.unfreeze != 0:
            break
        if stage.epochs and stage.solver != "sgd":
            found.append(stage)
    return found


def is_done(run: RunDir, stage: Stage) -> bool:
    return stage_finished(run.checkpoints(stage.name))


def task_cache(cache: FeatureCache, model: keras.Model, task: str) -> FeatureCache:
    """The cache of one task: its head (sharing the model's layers) and only the rows labelled for it."""
    def rows(x: Any, y: dict[str, np.ndarray] | None) -> tuple[np.ndarray, np.ndarray] | None:
        if x is None or y is None:
            return None
        keep = labelled(y[task])
        return np.asarray(x)[keep], np.asarray(y[task])[keep]

    train = rows(cache.train_x, cache.train_y)  # type: ignore[arg-type]
    val = rows(cache.val_x, cache.val_y)  # type: ignore[arg-type]
    assert train is not None
    if val is not None and not len(val[0]):
        val = None
    train_batches = dataclasses.replace(cache.train, examples=tf.data.Dataset.from_tensor_slices(train),
                                        count=len(train[0]))
    val_batches = None
    if val is not None and cache.validation is not None:
        val_batches = dataclasses.replace(cache.validation, examples=tf.data.Dataset.from_tensor_slices(val),
                                          count=len(val[0]))
    return FeatureCache(task_head(model, task), train_batches, val_batches, train[0], train[1],
                        val[0] if val else None, val[1] if val else None, cache.seconds, cache.backbone_passes)


def solve_task_heads(
    model: keras.Model, cache: FeatureCache, tasks: Sequence[TaskColumn], loss_weights: dict[str, float],
    head: HeadConfig, stage: Stage, run: RunDir, *, seed: int, strategy: tf.distribute.Strategy,
    say: Callable[[str], None],
) -> dict[str, HeadFit]:
    """Solves every task's head on its labelled cached rows and records the stage (see the module
    docstring). The stage's one history record follows the records of the stages before it.

    Returns:
        ``{task: HeadFit}``; tasks without a labelled training row keep their initial head (said).
    """
    backbone_groups(model).set_trainable(0, freeze_batchnorm=head.bn_inference)
    fits: dict[str, HeadFit] = {}
    history = [r for r in run.live_history() if r["stage"] != stage.name]
    record: dict[str, Any] = {"stage": stage.name, "stage_epoch": 1, "epoch": len(history) + 1}
    for task in tasks:
        part = task_cache(cache, model, task.name)
        if not len(part.train_x):
            say(f"stage {stage.name!r}: task {task.name!r} has no labelled training row; its head keeps its start")
            continue
        task_config = dataclasses.replace(head, multi_label=task.multi_label)
        loss = MaskedCrossentropy(task.multi_label, head.label_smoothing, loss_weights.get(task.name, 1.0))
        with strategy.scope():  # solve_head compiles the task's head model, which belongs to this strategy
            fit, logs = solve_head(part, task_config, loss=loss, metrics=[MaskedAccuracy(task.multi_label)],
                                   seed=seed)
        fits[task.name] = fit
        say(f"stage {stage.name!r}: task {task.name!r} head solved on {len(part.train_x)} labelled rows "
            f"({fit.describe()})")
        for key, value in logs.items():  # Keras's names for a dict-output model: <task>_loss, val_<task>_loss
            record[f"val_{task.name}_{key[4:]}" if key.startswith("val_") else f"{task.name}_{key}"] = value
    for split in ("", "val_"):
        parts = [record[f"{split}{t.name}_loss"] for t in tasks if f"{split}{t.name}_loss" in record]
        if parts:
            record[f"{split}loss"] = float(sum(parts))
    record.update({"solver": ",".join(sorted({f.solver for f in fits.values()})), "time": time.time()})
    run.rewrite_live_history([*history, record])
    finish_stage(run.checkpoints(stage.name), model, stage, feature_cache=True, solved=True,
                 tasks={name: asdict(fit) for name, fit in fits.items()})
    return fits
