"""Staged fine-tuning: a schedule is data (a list of stages), the loop is ``model.fit``.

Each :class:`Stage` says how many backbone layer groups are thawed (counted from the
output end), at what learning rate, with optional per-group (discriminative) learning
rates through ``keras.optimizers.MultiOptimizer``, linear warm-up and cosine decay.
Between stages the model is recompiled. Callbacks carry checkpoints, early stopping,
TensorBoard and the merged history; a run directory makes an interrupted run resumable.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np
import tensorflow as tf

from tlkit.data.batches import Batches
from tlkit.errors import ConfigError
from tlkit.model import (
    FEATURES_LAYER,
    HeadConfig,
    backbone_groups,
    classification_loss,
    classification_metrics,
    split_head,
)


@dataclass(frozen=True)
class Stage:
    """One stage of a fine-tuning schedule.

    Attributes:
        name: used for checkpoint and log folders (letters, digits, ``_``, ``-``).
        epochs: number of epochs (0 skips the stage).
        unfreeze: backbone groups thawed, counted from the output end; 0 trains the head
            only; ``"all"`` thaws the whole backbone.
        learning_rate: peak learning rate of the head.
        group_lr_decay: discriminative learning rates: the thawed group ``d`` places below
            the output end (``d = 0`` is the top group) trains at
            ``learning_rate * group_lr_decay ** (d + 1)``. 1.0 gives every group the head's rate.
        warmup_epochs: linear warm-up from 0 to the peak rate over this many epochs.
        decay: ``"cosine"`` decays to ``min_lr_fraction * peak`` by the stage's end;
            ``"constant"`` keeps the peak.
        min_lr_fraction: floor of the cosine decay, as a fraction of the peak.
        early_stopping_patience: stop the stage after this many epochs without a better
            validation loss (``None``: never).
        optimizer: ``"adam"``, ``"adamw"`` or ``"sgd"`` (momentum 0.9).
        weight_decay: for ``"adamw"``.
    """

    name: str
    epochs: int
    unfreeze: int | Literal["all"] = 0
    learning_rate: float = 1e-3
    group_lr_decay: float = 1.0
    warmup_epochs: float = 0.0
    decay: Literal["cosine", "constant"] = "cosine"
    min_lr_fraction: float = 0.0
    early_stopping_patience: int | None = None
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"stage name {self.name!r} must be letters, digits, '_' or '-'")
        if self.epochs < 0:
            raise ConfigError(f"stage {self.name!r}: epochs must be >= 0, got {self.epochs}")
        if self.learning_rate <= 0:
            raise ConfigError(f"stage {self.name!r}: learning_rate must be > 0, got {self.learning_rate}")
        if self.unfreeze != "all" and (not isinstance(self.unfreeze, int) or self.unfreeze < 0):
            raise ConfigError(f"stage {self.name!r}: unfreeze must be a count >= 0 or 'all', got {self.unfreeze!r}")
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ConfigError(f"stage {self.name!r}: unknown optimizer {self.optimizer!r} (adam, adamw, sgd)")
        if self.decay not in ("cosine", "constant"):
            raise ConfigError(f"stage {self.name!r}: decay must be 'cosine' or 'constant', got {self.decay!r}")


@dataclass(frozen=True)
class Schedule:
    """An ordered list of stages."""

    stages: tuple[Stage, ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("a schedule needs at least one stage")
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stage names must be unique, got {names}")

    @classmethod
    def feature_extraction(cls, epochs: int = 10, learning_rate: float = 1e-3, **stage: Any) -> "Schedule":
        """Head only, backbone frozen throughout."""
        return cls((Stage("head", epochs, 0, learning_rate, **stage),))

    @classmethod
    def fine_tune(
        cls,
        head_epochs: int = 5,
        epochs: int = 5,
        top_groups: int = 2,
        deeper_epochs: int = 0,
        deeper_groups: int | Literal["all"] = "all",
        learning_rate: float = 1e-3,
        fine_tune_learning_rate: float = 1e-4,
        group_lr_decay: float = 0.5,
        warmup_epochs: float = 1.0,
        early_stopping_patience: int | None = None,
    ) -> "Schedule":
        """Head first; then the top ``top_groups`` groups at a lower rate; then, optionally, deeper."""
        stages = [Stage("head", head_epochs, 0, learning_rate, early_stopping_patience=early_stopping_patience)]
        stages.append(
            Stage("top", epochs, top_groups, fine_tune_learning_rate, group_lr_decay, warmup_epochs,
                  early_stopping_patience=early_stopping_patience)
        )
        if deeper_epochs:
            stages.append(
                Stage("deeper", deeper_epochs, deeper_groups, fine_tune_learning_rate / 2, group_lr_decay,
                      warmup_epochs, early_stopping_patience=early_stopping_patience)
            )
        return cls(tuple(stages))

    @classmethod
    def preset(cls, name: str, **kwargs: Any) -> "Schedule":
        """``"feature_extraction"`` or ``"fine_tune"`` with keyword overrides."""
        presets = {"feature_extraction": cls.feature_extraction, "fine_tune": cls.fine_tune}
        if name not in presets:
            raise ConfigError(f"unknown schedule preset {name!r}; choose from {sorted(presets)}")
        try:
            return presets[name](**kwargs)
        except TypeError as exc:
            raise ConfigError(f"schedule preset {name!r}: {exc}") from exc

    @classmethod
    def from_dicts(cls, stages: Sequence[dict[str, Any]]) -> "Schedule":
        """A schedule from plain dicts (e.g. ``[[schedule.stages]]`` tables of a TOML config)."""
        built = []
        for index, raw in enumerate(stages):
            try:
                built.append(Stage(**raw))
            except TypeError as exc:
                raise ConfigError(f"schedule stage #{index + 1}: {exc}") from exc
        return cls(tuple(built))


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
    """Appends one JSON line per epoch (with the stage and learning rate) to ``path``."""

    def __init__(self, stage: Stage, path: Path | None, records: list[dict[str, Any]], offset: int) -> None:
        super().__init__()
        self.stage = stage
        self.path = path
        self.records = records
        self.offset = offset

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        record: dict[str, Any] = {"stage": self.stage.name, "stage_epoch": epoch + 1, "epoch": self.offset + epoch + 1}
        record.update({k: float(v) for k, v in (logs or {}).items()})
        record["lr"] = _current_lr(self.model.optimizer)
        record["time"] = time.time()
        self.records.append(record)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")


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
    metrics: Sequence[Any] | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    strategy: tf.distribute.Strategy | None = None,
    class_weight: dict[int, float] | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    jit_compile: bool | str = "auto",
    feature_cache: Literal["auto", "memory", "disk", "off"] = "auto",
    verbose: int | str = "auto",
) -> FineTuneResult:
    """Runs ``schedule`` on a tlkit classifier with ``model.fit``.

    Args:
        model: a model from :func:`tlkit.build_classifier` (or any model with a layer named
            ``"backbone"``; its groups then come from the spec or a depth split).
        train / validation: ``tf.data.Dataset`` of ``(inputs, one_hot_labels)`` batches, or
            :class:`~tlkit.data.batches.Batches` (what ``tlkit.data.make_batches`` returns),
            which also allows the feature cache.
        schedule: default ``Schedule.fine_tune()``.
        head: the head config, for the default loss and metrics (default: the model's own).
        loss / metrics: override the defaults (cross-entropy matching the head; accuracy).
        run_dir: where checkpoints, TensorBoard logs and ``history.json`` go. With a run
            directory, calling again after an interruption resumes: finished stages are
            skipped (their final weights loaded) and the current stage restarts from its
            last finished epoch.
        strategy: a ``tf.distribute`` strategy; the model must have been built in its
            scope. Default: the strategy in scope (Keras's default).
        class_weight: per-class loss weights (single-label only).
        callbacks: extra Keras callbacks, added to every stage.
        jit_compile: passed to ``model.compile`` (XLA).
        feature_cache: head-only stages of a model without augmentation, given ``Batches``,
            train the head on backbone features computed once (``"auto"``: in memory, on
            disk past 2 GiB; ``"memory"``/``"disk"`` force it; ``"off"`` never). The result
            equals the uncached path for the same data and seed, within float tolerance.

    Returns:
        A :class:`FineTuneResult` with one merged history across stages.
    """
    schedule = schedule or Schedule.fine_tune()
    head = head or getattr(model, "tlkit_head", None) or HeadConfig()
    num_classes = int(model.output.shape[-1])
    loss = loss or classification_loss(head)
    strategy = strategy or tf.distribute.get_strategy()
    groups = backbone_groups(model)
    run = Path(run_dir) if run_dir is not None else None
    scratch = tempfile.TemporaryDirectory(prefix="tlkit-stages-")
    checkpoints = run / "checkpoints" if run is not None else Path(scratch.name)
    history_path = run / "history.jsonl" if run else None
    records = _read_records(history_path)
    result = FineTuneResult()
    start = time.monotonic()
    steps = _steps_per_epoch(train)
    epochs_done = 0
    cache: FeatureCache | None = None
    for stage in schedule.stages:
        stage_dir = checkpoints / stage.name
        result.stage_boundaries.append(epochs_done)
        if (stage_dir / "done.json").is_file():
            model.load_weights(stage_dir / "final.weights.h5")
            epochs_done += len([r for r in records if r["stage"] == stage.name])
            _print(verbose, f"stage {stage.name!r} already finished in {run}; loaded its weights")
            continue
        if stage.epochs == 0:
            continue
        thawed = groups.set_trainable(stage.unfreeze, freeze_batchnorm=head.bn_inference)
        use_cache = not thawed and _cache_applies(model, train, validation, feature_cache)
        if use_cache and cache is None:
            _print(verbose, "head-only stage: computing backbone features once (feature cache)")
            cache = FeatureCache.build(model, train, validation, feature_cache, Path(scratch.name))
            result.feature_seconds = cache.seconds
        fit_model = cache.head if use_cache and cache else model
        fit_train = cache.train if use_cache and cache else train
        fit_val = cache.validation if use_cache and cache else validation
        prefix = "head_" if use_cache else ""
        done_epochs = _resume_epoch(stage_dir, prefix)
        records = [r for r in records if r["stage"] != stage.name or r["stage_epoch"] <= done_epochs]
        _print(
            verbose,
            f"stage {stage.name!r}: {stage.epochs} epochs, "
            f"{'head only' if not thawed else f'{len(thawed)} of {len(groups)} backbone groups thawed'}"
            f"{' (on cached features)' if use_cache else ''}, lr {stage.learning_rate:g}",
        )
        with strategy.scope():
            fit_model.compile(
                optimizer=_stage_optimizer(stage, steps, model, thawed),
                loss=loss,
                metrics=list(metrics) if metrics is not None else classification_metrics(head, num_classes),
                jit_compile=jit_compile,
            )
        # The history line is written before the backup, so a resumed run never misses an epoch.
        stage_callbacks = [
            _HistoryRecorder(stage, history_path, records, epochs_done),
            *_stage_callbacks(stage, stage_dir, run, fit_val is not None, prefix),
        ]
        if history_path is not None:
            _rewrite_history(history_path, records)
        fit_model.fit(
            _batched(fit_train),
            validation_data=_batched(fit_val),
            epochs=stage.epochs,
            class_weight=class_weight,
            callbacks=[*stage_callbacks, *callbacks],
            verbose=verbose,
            shuffle=False,  # tf.data input: shuffling belongs to the pipeline
        )
        best = stage_dir / f"{prefix}best.weights.h5"
        if fit_val is not None and best.is_file():
            fit_model.load_weights(best)  # the stage's best epoch
        epochs_done += len([r for r in records if r["stage"] == stage.name])
        model.save_weights(stage_dir / "final.weights.h5")
        (stage_dir / "done.json").write_text(
            json.dumps({"stage": asdict(stage), "feature_cache": use_cache, "finished": time.time()})
        )
        if run is not None:
            _write_merged(run, records)
    optimizer = getattr(model, "optimizer", None)
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not getattr(model, "compiled", False) or optimizer is None or isinstance(inner, keras.optimizers.MultiOptimizer):
        # Leave a model that evaluates, fits and saves like any Keras model: compiled (also when
        # every stage ran on cached features, where only the head model was compiled) and
        # with a plain optimizer (a per-group MultiOptimizer cannot be deserialised).
        with strategy.scope():
            model.compile(
                optimizer=keras.optimizers.Adam(schedule.stages[-1].learning_rate),
                loss=loss,
                metrics=list(metrics) if metrics is not None else classification_metrics(head, num_classes),
            )
            model.optimizer.build(model.trainable_variables)
    result.history = list(records)
    result.seconds = time.monotonic() - start
    scratch.cleanup()
    return result


def _batched(data: Any) -> Any:
    return data.batched() if isinstance(data, Batches) else data


def _cache_applies(model: keras.Model, train: Any, validation: Any, mode: str) -> bool:
    """Features can stand in for images: no random augmentation, and tlkit batches the data."""
    if mode == "off":
        return False
    # Random augmentation, or a pooling layer that trains (attention pooling), means the
    # features are not fixed during a head-only stage.
    has_augment = any(layer.name == "augment" or (layer.name == FEATURES_LAYER and layer.trainable_weights)
                      for layer in model.layers)
    batchable = isinstance(train, Batches) and (validation is None or isinstance(validation, Batches))
    if mode != "auto" and (has_augment or not batchable):
        raise ConfigError(
            "feature_cache needs un-augmented input, fixed pooling and data given as tlkit Batches "
            "(tlkit.data.make_batches); build the model with augmentation=None or use feature_cache='auto'"
        )
    return not has_augment and batchable


@dataclass
class FeatureCache:
    """Backbone features of the train/validation examples, computed once, and the head to train on them.

    The head model shares its layers with the full model, so training it trains the full
    model's head. Features are kept in memory, or in a ``.npy`` file when larger than
    ``memory_limit`` bytes (or when asked for with ``mode="disk"``).
    """

    head: keras.Model
    train: Batches
    validation: Batches | None
    seconds: float

    @classmethod
    def build(
        cls, model: keras.Model, train: Batches, validation: Batches | None, mode: str, folder: Path,
        memory_limit: int = 2 << 30,
    ) -> "FeatureCache":
        start = time.monotonic()
        extractor, head_model = split_head(model)
        parts = [_features(extractor, data, mode, folder / name, memory_limit)
                 for name, data in (("train", train), ("validation", validation)) if data is not None]
        return cls(head_model, parts[0], parts[1] if len(parts) > 1 else None, time.monotonic() - start)


def _features(extractor: keras.Model, data: Batches, mode: str, path: Path, memory_limit: int) -> Batches:
    # predict runs the extractor as a compiled function (several times faster than eager calls).
    features = np.asarray(extractor.predict(data.in_order().map(lambda x, y: x), verbose=0), dtype=np.float32)
    labels = np.concatenate([np.asarray(y) for _, y in data.in_order()])
    if mode == "disk" or features.nbytes > memory_limit:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path.with_suffix(".features.npy"), features)
        stored = np.load(path.with_suffix(".features.npy"), mmap_mode="r")

        def rows() -> Any:
            for i in range(len(stored)):
                yield np.asarray(stored[i]), labels[i]

        signature = (tf.TensorSpec(features.shape[1:], tf.float32), tf.TensorSpec(labels.shape[1:], labels.dtype))
        examples = tf.data.Dataset.from_generator(rows, output_signature=signature).apply(
            tf.data.experimental.assert_cardinality(len(stored))
        )
    else:
        examples = tf.data.Dataset.from_tensor_slices((features, labels))
    return data.with_examples(examples)


def _stage_callbacks(stage: Stage, stage_dir: Path, run: Path | None, has_val: bool, prefix: str = "") -> list[Any]:
    """Backup (resume), best checkpoint, TensorBoard, early stopping. ``prefix`` names the files
    of a stage trained on cached features (they hold the head's weights, not the full model's)."""
    monitor = "val_loss" if has_val else "loss"
    stage_dir.mkdir(parents=True, exist_ok=True)
    callbacks: list[Any] = [
        keras.callbacks.BackupAndRestore(str(stage_dir / f"{prefix}backup"), double_checkpoint=True),
        keras.callbacks.ModelCheckpoint(
            str(stage_dir / f"{prefix}best.weights.h5"), monitor=monitor, save_best_only=True,
            save_weights_only=True,
        ),
    ]
    if run is not None:
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(run / "logs" / stage.name)))
    if stage.early_stopping_patience is not None:
        callbacks.append(keras.callbacks.EarlyStopping(monitor=monitor, patience=stage.early_stopping_patience))
    return callbacks


def _resume_epoch(stage_dir: Path, prefix: str = "") -> int:
    meta = stage_dir / f"{prefix}backup" / "training_metadata.json"
    if not meta.is_file():
        return 0
    return int(json.loads(meta.read_text()).get("epoch", 0))


def _read_records(path: Path | None) -> list[dict[str, Any]]:
    if path is None or not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by an interruption
    return records


def _rewrite_history(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    tmp.replace(path)


def _write_merged(run: Path, records: list[dict[str, Any]]) -> None:
    """``history.json``: ``{"epochs": [records...], "stages": [{"name", "first_epoch", "last_epoch"}]}``."""
    stages: list[dict[str, Any]] = []
    for record in records:
        if not stages or stages[-1]["name"] != record["stage"]:
            stages.append({"name": record["stage"], "first_epoch": record["epoch"], "last_epoch": record["epoch"]})
        stages[-1]["last_epoch"] = record["epoch"]
    tmp = run / "history.json.tmp"
    tmp.write_text(json.dumps({"epochs": records, "stages": stages}, indent=1), encoding="utf-8")
    tmp.replace(run / "history.json")


def _print(verbose: int | str, message: str) -> None:
    if verbose != 0:
        print(f"[tlkit] {message}", flush=True)
