"""A multi-task training run: one backbone, one head per task, staged like a single-task run.

``tlkit train`` comes here when the config has ``[tasks]`` or its manifest has ``task:<name>``
columns (:func:`tlkit.multitask.manifest.resolve_tasks`). The run:

1. reads and splits the manifest (stratified on each row's first labelled task, groups or
   speakers kept whole) and writes ``labels.json`` / ``splits.json`` in their multi-task layout;
2. computes the frozen backbone's features of the training and validation data once, for the
   head stage (and, for images, every task's linear probe);
3. solves each task's head on its labelled rows (:mod:`tlkit.multitask.head_stage`);
4. fine-tunes the remaining stages with :func:`tlkit.fine_tune` (per-group learning rates,
   frozen BatchNorm, checkpoints and resume), the loss being the sum of the tasks' masked
   cross-entropies times their ``loss_weight``;
5. fits one temperature per task on its labelled validation rows, folded into ``<task>_logits``;
6. writes ``model.keras`` (reloads with :meth:`tlkit.rundir.RunDir.load_model`), ``run.json``
   with per-task counts, test metrics and baselines, and ``calibration.json``.

Images and audio (:mod:`tlkit.multitask.inputs`): an audio run trains on one random crop per
clip and epoch, caches :data:`~tlkit.data.audio.AUDIO_CACHED_CROPS` random crops per clip for the
head stage, and scores clips (calibration, baselines, test) as the mean over ``eval_crops`` crops.
``[adaptation]`` and ``class_weights`` are single-task options.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit import text
from tlkit.backbones.registry import get as get_spec
from tlkit.calibrate import calibrate_model
from tlkit.config import RunConfig
from tlkit.data.images import Splits
from tlkit.errors import ConfigError
from tlkit.feature_cache import FeatureCache, cache_blocker
from tlkit.fileio import atomic_save, versions
from tlkit.finetune import FineTuneResult, fine_tune
from tlkit.model_info import model_name
from tlkit.multitask.data import labelled, task_targets
from tlkit.multitask.head_stage import is_done, leading_head_stages, solve_task_heads
from tlkit.multitask.inputs import TaskData, audio_task_data, image_task_data
from tlkit.multitask.losses import task_losses, task_metrics
from tlkit.multitask.model import build_multitask_classifier
from tlkit.multitask.report import finish_task_reports, measure_task_baselines
from tlkit.rundir import RunDir


@dataclass
class MultiTaskResult:
    """What :func:`train_multitask` returns (``tlkit.train`` wraps it in its ``RunResult``)."""

    run_dir: Path
    model: keras.Model
    task_labels: dict[str, list[str]]
    history: FineTuneResult | None
    test_metrics: dict[str, float]


def train_multitask(cfg: RunConfig, strategy: tf.distribute.Strategy, *, verbose: int | str = "auto",
                    baselines: bool = True, modality: str | None = None, splits: Splits | None = None,
                    ) -> MultiTaskResult:
    """Trains a multi-task config (its ``tasks`` resolved, see the module docstring), writing or
    resuming its run directory; a finished run is not retrained.

    Args:
        modality: ``"image"`` / ``"audio"``: what an ad-hoc backbone (a ``.keras`` file, a
            SavedModel) takes; registered backbones know their own.
        splits: explicit splits (Python API) used instead of reading and splitting the manifest:
            :class:`~tlkit.data.images.Splits` (images) or :class:`~tlkit.data.audio.AudioSplits`
            (audio, with its waveforms) whose ``tasks`` are the config's, e.g. one split shared by
            runs of different task sets. A resumed run must be given the same splits.
    """
    say = lambda message: text.say(verbose, message)  # noqa: E731
    _refuse_unsupported(cfg)
    rundir = RunDir.for_worker(cfg.output_dir) if cfg.training.distribute == "multi_worker" else RunDir(cfg.output_dir)
    note = rundir.claim(cfg)
    if note:
        say(note)
    if rundir.is_complete:
        say(f"run {rundir.path} is already complete; nothing to do")
        return MultiTaskResult(rundir.path, rundir.load_model(), rundir.task_labels() or {}, None,
                               rundir.status().get("test_metrics", {}))
    rundir.ensure_writable()
    spec = get_spec(cfg.backbone.name, image_size=cfg.backbone.image_size, modality=modality,  # type: ignore[arg-type]
                    sample_rate=cfg.backbone.sample_rate)
    rundir.write_config(cfg)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.training.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(cfg.training.mixed_precision)
    data = audio_task_data(cfg, spec, say, splits) if spec.modality == "audio" else image_task_data(cfg, spec, splits)
    splits, train_ds, val_ds = data.splits, data.train, data.val
    say(splits.summary())
    rundir.write_data(splits)
    tasks = splits.tasks
    with strategy.scope():  # the metrics' variables too: multi-worker logs reduce them across workers
        model = build_multitask_classifier(
            spec, [(t.name, len(t.classes), t.multi_label) for t in tasks], weights=cfg.backbone.weights,
            head=cfg.head, augmentation=data.augmentation, image_size=data.image_size, seed=cfg.seed,
            name=model_name(cfg.name),
        )
        metrics = task_metrics(cfg.tasks)
    solved = [stage for stage in leading_head_stages(cfg.schedule) if not is_done(rundir, stage)]
    cache = _feature_cache(model, data, cfg, rundir) if (baselines or solved) else None
    transfer = {}
    if baselines:  # audio probes score whole clips, so they do not read the cache's random crops
        transfer = measure_task_baselines(model, splits, data.features, None if data.is_audio else cache,
                                          waveforms=data.waveforms, sample_rate=data.sample_rate, say=say)
    weights = {t.name: t.loss_weight for t in cfg.tasks}
    started = time.time()
    rundir.write_status({"status": "training", "backbone": spec.name, "started": started})
    for stage in solved:
        if cache is None:
            if stage.solver == "converge":
                raise ConfigError(f"stage {stage.name!r} has solver='converge', but the features are not fixed "
                                  f"({_blocker(model, train_ds, val_ds, cfg)})")
            break  # fine_tune trains it epoch by epoch
        solve_task_heads(model, cache, tasks, weights, cfg.head, stage, rundir, seed=cfg.seed, strategy=strategy,
                         say=say)
    history = fine_tune(
        model, train_ds, val_ds, cfg.schedule, head=cfg.head, loss=task_losses(cfg.tasks, cfg.head),
        metrics=metrics, run_dir=rundir.path, strategy=strategy,
        jit_compile=cfg.training.jit_compile, feature_cache="off", verbose=verbose,
    )
    rundir.write_history(history.history)
    calibration = _calibrate(model, data, say)
    if calibration:
        rundir.write_task_calibration(calibration)
    test_metrics: dict[str, float] = {}
    if splits.test:
        test_metrics = data.evaluate(model, splits.test)
        say("test: " + ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))
    if transfer:
        scored = [(task_targets(part, tasks), data.predict(model, part)) if part else None
                  for part in (splits.val, splits.test)]
        finish_task_reports(transfer, tasks, scored[0], scored[1], seconds=history.seconds)
        for name, report in transfer.items():
            say(f"task {name!r}, measured on this run's split:\n" + report.table())
            for warning in report.warnings:
                print(f"[tlkit] WARNING: task {name!r}: {warning}", file=sys.stderr, flush=True)
    with strategy.scope():  # a plain optimizer, so the saved model is a clean, fittable Keras model
        model.compile(optimizer="adam", loss=task_losses(cfg.tasks, cfg.head), metrics=task_metrics(cfg.tasks))
        model.optimizer.build(model.trainable_variables)
    atomic_save(rundir.file(RunDir.MODEL), model.save)
    atomic_save(rundir.file(RunDir.WEIGHTS), model.save_weights)
    rundir.write_status({
        "status": "complete", "backbone": spec.name, "backbone_source": spec.source,
        "started": started, "finished": time.time(), "train_seconds": history.seconds, "test_metrics": test_metrics,
        "tasks": task_records(splits, cfg), "calibration": {"tasks": calibration} if calibration else None,
        "transfer": {"tasks": {name: report.to_dict() for name, report in transfer.items()}} if transfer else None,
        "data": {"dropped_classes": [], "skipped_files": len(splits.skipped), "ignored_files": len(splits.ignored)},
        **data.contract.to_status(), "versions": versions(),
    })
    say(f"wrote {rundir.file(RunDir.MODEL)}")
    return MultiTaskResult(rundir.path, model, {t.name: list(t.classes) for t in tasks}, history, test_metrics)


def task_records(splits: Splits, cfg: RunConfig) -> list[dict[str, Any]]:
    """``run.json``'s ``"tasks"``: name, column, multi_label, loss_weight, classes and labelled rows per split."""
    weights = {t.name: t.loss_weight for t in cfg.tasks}
    return [{"name": t.name, "column": t.column, "multi_label": t.multi_label, "loss_weight": weights.get(t.name, 1.0),
             "classes": list(t.classes),
             "labelled": {name: sum(1 for e in part if e.task_labels(t.name))
                          for name, part in (("train", splits.train), ("val", splits.val), ("test", splits.test))}}
            for t in splits.tasks]


def _refuse_unsupported(cfg: RunConfig) -> None:
    if cfg.adaptation.enabled:
        raise ConfigError("[adaptation] is not available for multi-task runs ([tasks]); remove one of them")
    if cfg.data.class_weights:
        raise ConfigError("[data] class_weights is not available for multi-task runs ([tasks]); set it to false "
                          "or use [tasks.<name>] loss_weight")
    if cfg.data.manifest is None:
        raise ConfigError("[tasks] needs `[data] manifest`; class folders carry a single label")


def _feature_cache(model: keras.Model, data: TaskData, cfg: RunConfig, run: RunDir) -> FeatureCache | None:
    """The frozen backbone's features of the training and validation data (audio: ``feature_passes``
    random crops per training clip), or ``None`` where they are not fixed (attention pooling,
    ``feature_cache = "off"``)."""
    if cfg.training.feature_cache == "off" or cache_blocker(model, data.train, data.val, augmented_ok=True) is not None:
        return None
    return FeatureCache.build(model, data.train, data.val, cfg.training.feature_cache, run.checkpoints("feature_cache"),
                              train_passes=data.feature_passes)


def _blocker(model: keras.Model, train: Any, val: Any, cfg: RunConfig) -> str:
    if cfg.training.feature_cache == "off":
        return "feature_cache='off'"
    return cache_blocker(model, train, val, augmented_ok=True) or "unknown"


def _calibrate(model: keras.Model, data: TaskData, say: Any) -> dict[str, dict[str, Any]]:
    """One temperature per task, fitted on its labelled validation rows (audio: whole clips, as
    the run scores them) and folded into ``<task>_logits``."""
    if not data.splits.val:
        say("not calibrated: the run has no validation split")
        return {}
    targets = task_targets(data.splits.val, data.splits.tasks)
    probabilities = data.predict(model, data.splits.val)
    records = {}
    for task in data.splits.tasks:
        keep = labelled(targets[task.name])
        calibration = calibrate_model(model, targets[task.name][keep], np.asarray(probabilities[task.name])[keep],
                                      multi_label=task.multi_label, layer_name=f"{task.name}_logits")
        if calibration is None:
            say(f"task {task.name!r} not calibrated: a temperature does not lower its validation log-loss")
            continue
        say(f"task {task.name!r} calibrated: temperature {calibration.temperature:.3g} on {calibration.examples} "
            f"labelled validation examples, folded into {task.name}_logits")
        records[task.name] = calibration.to_dict()
    return records

