"""Staged fine-tuning: a schedule is data (a list of stages), the loop is ``model.fit``.

Each :class:`Stage` says how many backbone layer groups are thawed (counted from the
output end), at what learning rate, with optional per-group (discriminative) learning
rates through ``keras.optimizers.MultiOptimizer``, linear warm-up and cosine decay.
Between stages the model is recompiled. Callbacks carry checkpoints, early stopping,
TensorBoard and the merged history; a run directory makes an interrupted run resumable.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import keras
import tensorflow as tf

from tlkit.adaptation.training import Adapter, StagePlan
from tlkit.checkpointing import (
    FINAL_WEIGHTS,
    StageCheckpoint,
    check_workers_agree,
    finish_stage,
    restore_backup,
    stage_finished,
)
from tlkit.config import AdaptationConfig
from tlkit.data.batches import Batches, epoch_addressed, epoch_range
from tlkit.errors import ConfigError
from tlkit.feature_cache import FeatureCache, cache_blocker
from tlkit.head_fit import HeadFit, solve_head
from tlkit.model import (HeadConfig, backbone_groups, classification_loss, classification_metrics, integer_labels,
                         split_head)
from tlkit.rundir import RunDir
from tlkit.schedule import Schedule, Stage
from tlkit.text import say


@dataclass
class FineTuneResult:
    """What :func:`fine_tune` returns.

    ``history`` has one record per epoch across all stages:
    ``{"stage", "stage_epoch", "epoch", "loss", "val_loss", ..., "lr"}``.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    stage_boundaries: list[int] = field(default_factory=list)
    seconds: float = 0.0
    feature_seconds: float = 0.0  # time spent computing cached features (0 when not used)
    head_fits: dict[str, HeadFit] = field(default_factory=dict)  # stages whose head was solved
    adaptation: dict[str, Any] = field(default_factory=dict)  # what the adaptation did (empty: none)

    def metric(self, name: str) -> list[float]:
        """The values of one metric across all epochs of all stages."""
        return [float(r[name]) for r in self.history if name in r]


def _stage_optimizer(
    stage: Stage, steps_per_epoch: int, model: keras.Model, thawed: list[int]
) -> keras.optimizers.Optimizer:
    total = max(1, stage.epochs * steps_per_epoch)
    warmup = int(round(stage.warmup_epochs * steps_per_epoch))

    def make(peak: float) -> keras.optimizers.Optimizer:
        rate: Any = peak
        if stage.decay == "cosine":
            rate = keras.optimizers.schedules.CosineDecay(
                initial_learning_rate=0.0 if warmup else peak,
                decay_steps=max(1, total - warmup),
                alpha=stage.min_lr_fraction,
                warmup_target=peak if warmup else None,
                warmup_steps=warmup,
            )
        elif warmup:
            rate = keras.optimizers.schedules.CosineDecay(0.0, 1, alpha=1.0, warmup_target=peak, warmup_steps=warmup)
        if stage.optimizer == "sgd":
            return keras.optimizers.SGD(rate, momentum=0.9)
        if stage.optimizer == "adamw":
            return keras.optimizers.AdamW(rate, weight_decay=stage.weight_decay)
        return keras.optimizers.Adam(rate)

    if stage.group_lr_decay == 1.0 or not thawed:
        return make(stage.learning_rate)
    groups = backbone_groups(model)
    head_optimizer = make(stage.learning_rate)
    by_variable: dict[int, keras.optimizers.Optimizer] = {}
    for depth, index in enumerate(sorted(thawed, reverse=True)):
        optimizer = make(stage.learning_rate * stage.group_lr_decay ** (depth + 1))
        for variable in groups.variables(index):
            by_variable[id(variable)] = optimizer
    return keras.optimizers.MultiOptimizer(_GroupOptimizerMap(by_variable, head_optimizer))


class _GroupOptimizerMap:
    """Maps each variable to its group's optimizer (the head's for anything else)."""

    def __init__(self, by_variable: dict[int, keras.optimizers.Optimizer], default: keras.optimizers.Optimizer):
        self.by_variable = by_variable
        self.default_optimizer = default

    def __call__(self, variable: keras.Variable) -> keras.optimizers.Optimizer:
        return self.by_variable.get(id(variable), self.default_optimizer)

    def values(self) -> list[keras.optimizers.Optimizer]:
        unique: dict[int, keras.optimizers.Optimizer] = {id(o): o for o in self.by_variable.values()}
        return [*unique.values(), self.default_optimizer]

    def get_config(self) -> dict[str, Any]:
        return {"groups": len(self.values())}


def _steps_per_epoch(dataset: Any) -> int:
    if isinstance(dataset, Batches):
        return dataset.steps
    cardinality = int(dataset.cardinality()) if hasattr(dataset, "cardinality") else -1
    if cardinality > 0:
        return cardinality
    if hasattr(dataset, "__len__"):
        return len(dataset)
    return sum(1 for _ in dataset)


class _HistoryRecorder(keras.callbacks.Callback):
    """Records one entry per epoch (with the stage and learning rate), and appends it to the run's
    live history before any checkpoint of that epoch is written."""

    def __init__(self, stage: Stage, run: RunDir | None, records: list[dict[str, Any]], offset: int) -> None:
        super().__init__()
        self.stage = stage
        self.run = run
        self.records = records
        self.offset = offset

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        record: dict[str, Any] = {"stage": self.stage.name, "stage_epoch": epoch + 1, "epoch": self.offset + epoch + 1}
        record.update({k: float(v) for k, v in (logs or {}).items()})
        record["lr"] = _current_lr(self.model.optimizer)
        record["time"] = time.time()
        self.records.append(record)
        if self.run is not None:
            self.run.append_live_history(record)


class _EpochSeeds(keras.callbacks.Callback):
    """At the start of every epoch, sets each random layer's seed state (dropout, augmentation) to its
    seed and the run's epoch number, so its draws in an epoch do not depend on how many epochs this
    process ran before: a resumed run draws the masks an uninterrupted one draws (Keras saves no
    ``SeedGenerator`` state with the weights)."""

    def __init__(self, offset: int) -> None:
        super().__init__()
        self.offset = offset

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        weights = {id(v) for v in self.model.weights}  # model.variables adds the SeedGenerator states
        for state in (v for v in self.model.variables if id(v) not in weights and v.name == "seed_generator_state"):
            seed = int(keras.ops.convert_to_numpy(state)[0])
            # The draw counter starts the epoch's own stream: Keras folds seeds into int32 (mod 2**31 - 2), so
            # epochs 2**20 draws apart stay disjoint for 2047 epochs of up to a million draws each.
            state.assign([seed, (self.offset + epoch) << 20])


def _current_lr(optimizer: Any) -> float:
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if isinstance(inner, keras.optimizers.MultiOptimizer):
        inner = inner.optimizers[-1]
    rate = inner.learning_rate
    return float(keras.ops.convert_to_numpy(rate))


def fine_tune(
    model: keras.Model,
    train: Any,
    validation: Any = None,
    schedule: Schedule | None = None,
    *,
    head: HeadConfig | None = None,
    loss: Any = None,
    metrics: Sequence[Any] | dict[str, Sequence[Any]] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    strategy: tf.distribute.Strategy | None = None,
    class_weight: dict[int, float] | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    jit_compile: bool | str = "auto",
    feature_cache: Literal["auto", "memory", "disk", "off"] = "auto",
    feature_passes: int = 1,
    features: FeatureCache | None = None,
    backup_seconds: float | None = None,
    verbose: int | str = "auto",
    adaptation: AdaptationConfig | None = None,
    target: Any = None,
) -> FineTuneResult:
    """Runs ``schedule`` on a tlkit classifier with ``model.fit``.

    Args:
        model: a model from :func:`tlkit.build_classifier` (or any model with a layer named
            ``"backbone"``; its groups then come from the spec or a depth split).
        train / validation: ``tf.data.Dataset`` of ``(inputs, labels)`` batches, or
            :class:`~tlkit.data.batches.Batches` (what ``tlkit.data.make_batches`` returns),
            which also allows the feature cache. Labels are one-hot rows (B, C), or class
            indices (B,) / (B, 1) integers as ``keras.utils.image_dataset_from_directory``
            yields by default (then the default loss and metrics are the sparse ones).
        schedule: default ``Schedule.fine_tune()``.
        head: the head config, for the default loss and metrics (default: the model's own).
        loss / metrics: override the defaults (cross-entropy matching the head; accuracy); a
            model with a dict of outputs takes dicts keyed by output name (see :mod:`tlkit.multitask`).
        run_dir: where checkpoints, TensorBoard logs and ``history.json`` go. With a run
            directory, calling again after an interruption resumes: finished stages are
            skipped (their final weights loaded) and the current stage restarts from its
            last finished epoch.
        strategy: a ``tf.distribute`` strategy; the model must have been built in its
            scope. Default: the strategy in scope (Keras's default).
        class_weight: per-class loss weights (single-label only).
        callbacks: extra Keras callbacks, added to every stage.
        jit_compile: passed to ``model.compile`` (XLA).
        feature_cache: head-only stages train the head on backbone features computed once
            (``"auto"``: in memory, on disk past 2 GiB; ``"memory"``/``"disk"`` force it, and
            say why when it cannot apply; ``"off"`` never). Stages whose head is solved
            (``Stage.solver``) use clean (un-augmented) features; epoch-by-epoch head stages use
            the cache only without augmentation. The result equals the uncached path for the
            same data and seed, within float tolerance.
        feature_passes: passes over ``train`` when it is a random ``tf.data`` pipeline (audio
            crops): that many random crops per clip are cached. Ignored for ``Batches``.
        features: a :class:`~tlkit.feature_cache.FeatureCache` already built with
            ``FeatureCache.build`` for this model (frozen as it is now) and these data, e.g. by
            ``tlkit train`` for its linear probe; head-only stages then reuse it.
        backup_seconds: seconds between resume backups within a stage (with ``run_dir``); the
            default is 30 s or 20 times a backup's write time, whichever is longer (backups then
            cost under 5% of training time). A finished stage writes its final weights; without
            ``run_dir`` nothing is written (see :mod:`tlkit.checkpointing`).
        adaptation / target: adapt to an unlabelled target domain (``dann``, ``coral``,
            ``reweight``, ``adabn``); ``target`` holds its raw inputs as tlkit Batches or a
            batched ``tf.data.Dataset`` (labels ignored). ``dann`` and ``coral`` train a
            training model sharing the classifier's layers in the stages that thaw backbone
            groups; the classifier never holds the domain head (see :mod:`tlkit.adaptation.training`).

    Returns:
        A :class:`FineTuneResult` with one merged history across stages.
    """
    schedule = schedule or Schedule.fine_tune()
    head = head or getattr(model, "tlkit_head", None) or HeadConfig()
    num_classes = int(keras.tree.flatten(model.output)[0].shape[-1])  # a multi-task model: its first output
    sparse = integer_labels(train)
    loss = loss or classification_loss(head, sparse=sparse)
    strategy = strategy or tf.distribute.get_strategy()
    groups = backbone_groups(model)
    run = RunDir(run_dir) if run_dir is not None else None
    if run is not None:
        run.path.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix="tlkit-stages-")
    records = run.live_history() if run is not None else []
    result = FineTuneResult()
    start = time.monotonic()
    steps = _steps_per_epoch(train)
    epochs_done = 0
    cache: FeatureCache | None = features
    head_in_scope = False
    adapter = Adapter.create(adaptation, target, model, schedule, strategy, seed=_seed(train),
                             say=lambda message: say(verbose, message))
    if adapter is not None:
        adapter.prepare(train)

    def metric_list() -> Any:
        # In the strategy's scope: metric variables made outside it are plain per-worker variables,
        # and a multi-worker fit / evaluate then reports the chief's shard of the data, not the split.
        with strategy.scope():
            if isinstance(metrics, dict):  # per-output metrics of a multi-task model
                return {name: _in_scope(values, strategy) for name, values in metrics.items()}
            if metrics is not None:
                return _in_scope(metrics, strategy)
            return classification_metrics(head, num_classes, sparse=sparse)

    for stage in schedule.stages:
        stage_dir = run.checkpoints(stage.name) if run is not None else None
        result.stage_boundaries.append(epochs_done)
        finished = stage_finished(stage_dir)
        check_workers_agree(strategy, int(finished), f"whether stage {stage.name!r} is finished", stage_dir)
        if finished:
            model.load_weights(stage_dir / FINAL_WEIGHTS)
            epochs_done += len([r for r in records if r["stage"] == stage.name])
            say(verbose, f"stage {stage.name!r} already finished in {run.path}; loaded its weights")
            continue
        if stage.epochs == 0:
            continue
        thawed = groups.set_trainable(stage.unfreeze, freeze_batchnorm=head.bn_inference)
        solve = _solves_head(stage, thawed, model, train, validation, feature_cache, verbose)
        blocked = None if solve else cache_blocker(model, train, validation, augmented_ok=False)
        use_cache = solve or (not thawed and feature_cache != "off" and blocked is None)
        if not thawed and feature_cache in ("memory", "disk") and not use_cache:
            raise ConfigError(f"feature_cache={feature_cache!r} cannot apply to stage {stage.name!r}: {blocked}")
        if use_cache and cache is None:
            say(verbose, "head-only stage: computing backbone features once (feature cache)")
            cache = FeatureCache.build(model, train, validation, feature_cache, Path(scratch.name),
                                       train_passes=feature_passes)
        if use_cache and cache is not None and not head_in_scope:
            with strategy.scope():  # the head model must belong to the strategy that fits it
                cache.head = split_head(model)[1]
            head_in_scope = True
            result.feature_seconds = cache.seconds
        if solve:
            assert cache is not None
            records = [r for r in records if r["stage"] != stage.name]
            with strategy.scope():  # solve_head compiles the head model, which belongs to this strategy
                fit, logs = solve_head(cache, head, loss=loss, metrics=metric_list(), class_weight=class_weight,
                                       sample_weight=adapter.solve_weights(cache) if adapter else None)
            say(verbose, f"stage {stage.name!r}: head solved to convergence on cached features ({fit.describe()})")
            record = {"stage": stage.name, "stage_epoch": 1, "epoch": epochs_done + 1, **logs,
                      "solver": fit.solver, "time": time.time()}
            record.update({"C": fit.C} if fit.C is not None else {"solver_epochs": fit.epochs})
            records.append(record)
            result.head_fits[stage.name] = fit
        else:
            plan = adapter.plan(stage, thawed, cache if use_cache else None, train, validation, steps,
                                class_weight) if adapter else None
            _run_stage(stage, model, cache if use_cache else None, train, validation, thawed, records, epochs_done,
                       stage_dir, run, strategy, loss, metric_list(), class_weight, callbacks,
                       jit_compile, steps, backup_seconds, verbose, len(groups), plan)
        epochs_done += len([r for r in records if r["stage"] == stage.name])
        if stage_dir is not None:
            finish_stage(stage_dir, model, stage, feature_cache=use_cache, solved=solve)
        if run is not None:
            run.rewrite_live_history(records)
            run.write_history(records)
    if adapter is not None:
        adapter.finish()
        result.adaptation = adapter.summary
    _leave_plain_optimizer(model, strategy, schedule, loss, metric_list())
    result.history = list(records)
    result.seconds = time.monotonic() - start
    scratch.cleanup()
    return result


def _solves_head(
    stage: Stage, thawed: list[int], model: keras.Model, train: Any, validation: Any, feature_cache: str,
    verbose: int | str,
) -> bool:
    """Whether a stage's head is solved to convergence on cached features (see ``Stage.solver``)."""
    if thawed or stage.solver == "sgd":
        return False
    reason = "feature_cache='off'" if feature_cache == "off" else cache_blocker(
        model, train, validation, augmented_ok=True)
    if reason is None:
        return True
    if stage.solver == "converge":
        raise ConfigError(f"stage {stage.name!r} has solver='converge', but its features are not fixed: {reason}")
    say(verbose, f"stage {stage.name!r}: training the head epoch by epoch ({reason})")
    return False


def _run_stage(
    stage: Stage, model: keras.Model, cache: FeatureCache | None, train: Any, validation: Any, thawed: list[int],
    records: list[dict[str, Any]], epochs_done: int, stage_dir: Path | None, run: RunDir | None,
    strategy: tf.distribute.Strategy, loss: Any, metrics: list[Any],
    class_weight: dict[int, float] | None, callbacks: Sequence[keras.callbacks.Callback], jit_compile: bool | str,
    steps: int, backup_seconds: float | None, verbose: int | str, group_count: int, plan: StagePlan | None = None,
) -> None:
    """Trains one stage epoch by epoch with ``fit``, resuming from its backup (``plan``: the
    adaptation's training model and data, see :meth:`tlkit.adaptation.training.Adapter.plan`)."""
    fit_model = cache.head if cache else model
    fit_train = cache.train if cache else train
    fit_val = cache.validation if cache else validation
    source = fit_train  # what an adaptation's training data is built from
    prefix = "head_" if cache else ""
    if plan is not None:
        fit_model, fit_train, fit_val, prefix = plan.model, plan.train, plan.validation, plan.prefix
        class_weight = plan.class_weight
    with strategy.scope():
        fit_model.compile(optimizer=_stage_optimizer(stage, steps, model, thawed), loss=loss, metrics=metrics,
                          jit_compile=jit_compile)
    fit_model._initial_epoch = None  # never inherit a previous fit's resume point (Keras keeps it)
    with strategy.scope():  # restoring builds the optimizer's slots: they must belong to the strategy
        resumed = restore_backup(fit_model, stage_dir, prefix) if stage_dir is not None else None
    initial = resumed.epoch if resumed else 0
    check_workers_agree(strategy, initial, f"the epoch stage {stage.name!r} resumes after", stage_dir)
    records[:] = [r for r in records if r["stage"] != stage.name or r["stage_epoch"] <= initial]
    say(
        verbose,
        f"stage {stage.name!r}: {stage.epochs} epochs, "
        f"{'head only' if not thawed else f'{len(thawed)} of {group_count} backbone groups thawed'}"
        f"{' (on cached features)' if cache else ''}{' (adapted)' if plan else ''}, lr {stage.learning_rate:g}"
        f"{f'; resuming after epoch {initial}' if initial else ''}",
    )
    keep_last = plan is not None and plan.keep_last
    if initial >= stage.epochs:
        checkpoint = StageCheckpoint(stage_dir, "val_loss" if fit_val is not None else "loss", stage.epochs,
                                     prefix=prefix, resumed=resumed)
        checkpoint.set_model(fit_model)
        if not keep_last:
            checkpoint.restore_best()
        return
    monitor = "val_loss" if fit_val is not None else "loss"
    checkpoint = StageCheckpoint(stage_dir, monitor, stage.epochs, prefix=prefix, budget_seconds=backup_seconds,
                                 resumed=resumed)
    # The history line is written before the backup, so a resumed run never misses an epoch.
    stage_callbacks: list[Any] = [_EpochSeeds(epochs_done), *(plan.callbacks if plan else []),
                                  _HistoryRecorder(stage, run, records, epochs_done), checkpoint]
    if run is not None:
        stage_callbacks.append(keras.callbacks.TensorBoard(log_dir=str(run.logs(stage.name))))
    if stage.early_stopping_patience is not None:
        stage_callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor, patience=stage.early_stopping_patience))
    if run is not None:
        run.rewrite_live_history(records)
    epoch_data, epoch_steps = _epoch_data(fit_train, source, initial, stage.epochs)
    fit_model.fit(
        _batched(epoch_data), validation_data=_batched(fit_val), epochs=stage.epochs, initial_epoch=initial,
        steps_per_epoch=epoch_steps, class_weight=class_weight, callbacks=[*stage_callbacks, *callbacks],
        verbose=_keras_verbose(verbose),
        shuffle=False,  # tf.data input: shuffling belongs to the pipeline
    )
    fit_model._initial_epoch = None
    if fit_val is not None and not keep_last:
        checkpoint.restore_best()  # the stage's best epoch


def _leave_plain_optimizer(
    model: keras.Model, strategy: tf.distribute.Strategy, schedule: Schedule, loss: Any, metrics: list[Any],
) -> None:
    """Leaves a model that evaluates, fits and saves like any Keras model: compiled (also when
    every stage ran on cached features, where only the head model was compiled) and with a plain
    optimizer (a per-group MultiOptimizer cannot be deserialised)."""
    optimizer = getattr(model, "optimizer", None)
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if getattr(model, "compiled", False) and optimizer is not None and not isinstance(
            inner, keras.optimizers.MultiOptimizer):
        return
    with strategy.scope():
        model.compile(optimizer=keras.optimizers.Adam(schedule.stages[-1].learning_rate), loss=loss, metrics=metrics)
        model.optimizer.build(model.trainable_variables)


def _in_scope(metrics: Sequence[Any], strategy: tf.distribute.Strategy) -> list[Any]:
    """``metrics`` (names or ``keras.metrics.Metric`` objects) as a list; under a strategy with several
    replicas each Metric object is rebuilt from its config in the current (the strategy's) scope, so its
    variables are the strategy's (a caller's metric made outside the scope would count one worker only)."""
    if strategy.num_replicas_in_sync == 1:
        return list(metrics)
    return [type(m).from_config(m.get_config()) if isinstance(m, keras.metrics.Metric) else m for m in metrics]


def _seed(data: Any) -> int:
    """The shuffle seed of tlkit Batches (0 otherwise): seeds the adaptation's own fits."""
    return int(data.seed) if isinstance(data, Batches) else 0


def _epoch_data(data: Any, source: Any, first: int, end: int) -> tuple[Any, int | None]:
    """A stage's training data from epoch ``first`` to ``end - 1`` and the steps of one epoch, so that a
    resumed stage reads in each epoch the batches an uninterrupted one reads (see
    :meth:`Batches.epochs`). That holds for tlkit Batches, for a ``tf.data.Dataset`` carrying an
    epoch-addressed source (:func:`~tlkit.data.batches.epoch_addressed`: the audio training set of
    ``make_audio_dataset``), and for an adaptation's data built from Batches
    for this stage (``epoch_range``: passes of a new dataset; under a ``tf.distribute`` strategy Keras's
    symbolic build starts one pass first, which shifts them). Any other ``tf.data`` pipeline is returned as
    it is with ``None`` steps (``fit`` re-iterates it every epoch; its order is its next pass's)."""
    addressed = epoch_addressed(data)
    if addressed is not None:
        return addressed.epochs(first, end), addressed.steps
    steps = int(data.cardinality()) if isinstance(source, Batches) and isinstance(data, tf.data.Dataset) else -1
    if steps > 0:
        return epoch_range(data, steps, first, end), steps
    return data, None


def _batched(data: Any) -> Any:
    data = data.batched() if isinstance(data, Batches) else data
    if isinstance(data, tf.data.Dataset) and (
            data.options().experimental_distribute.auto_shard_policy == tf.data.experimental.AutoShardPolicy.AUTO):
        # Multi-worker: tlkit's pipelines read from in-memory tensors (paths, cached features), not from
        # files, so AUTO's FILE sharding cannot apply; DATA: every worker keeps its share of each batch.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        data = data.with_options(options)
    return data


def _keras_verbose(verbose: int | str) -> int | str:
    """``"auto"``: a progress bar on a terminal, one plain line per epoch otherwise (a log file
    gets no ANSI escapes or carriage returns)."""
    if verbose == "auto":
        return 1 if sys.stdout.isatty() else 2
    return verbose

