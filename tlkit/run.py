"""A training run: config in, run directory out; an interrupted run resumes.

The run directory's files are owned by :class:`tlkit.rundir.RunDir` (see its module docstring).

Audio runs: the backbone is an audio spec (a registered one, or a ``.keras`` file /
SavedModel directory when the data folder or manifest holds audio files). Every file is
decoded once and resampled to the backbone's rate; training takes one random
``clip_seconds`` crop per clip and epoch, validation ``eval_crops`` fixed crops per clip,
and test metrics average the probabilities of ``eval_crops`` crops per clip.
"""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit.adaptation.target import load_run_target
from tlkit.audio_augment import audio_augmentation
from tlkit.backbones.registry import get as get_spec
from tlkit.backbones.spec import BackboneSpec
from tlkit.calibrate import Calibration, calibrate_model
from tlkit.config import DataConfig, RunConfig, load_config
from tlkit.data.audio import (
    AUDIO_CACHED_CROPS,
    audio_clip_length,  # noqa: F401  (moved to tlkit.data.audio; tlkit.run.audio_clip_length stays)
    audio_crops,
    clip_samples,
    is_audio_file,
    load_audio_splits,
    make_audio_dataset,
    predict_clips,
)
from tlkit.data.images import IMAGE_SUFFIXES, Example, Splits, class_weights, encode_labels, load_splits, make_batches
from tlkit.errors import ConfigError
from tlkit.evaluation.audio import evaluate_audio
from tlkit.fileio import atomic_save, versions
from tlkit.feature_cache import FeatureCache, cache_blocker
from tlkit.finetune import FineTuneResult, fine_tune
from tlkit.model import build_classifier, classification_loss, classification_metrics
from tlkit.model_info import model_name
from tlkit.multitask.manifest import resolve_tasks
from tlkit.multitask.train import train_multitask
from tlkit.rundir import InputContract, RunDir
from tlkit.text import say
from tlkit.transfer_report import RunSplits, finish_report, measure_baselines


@dataclass
class RunResult:
    """What :func:`train` returns."""

    run_dir: Path
    model: keras.Model
    class_names: list[str]  # a multi-task run: {task: class names}
    history: FineTuneResult | None
    test_metrics: dict[str, float]


def make_strategy(kind: str) -> tf.distribute.Strategy:
    """The ``tf.distribute`` strategy named in ``[training] distribute``."""
    if kind == "auto":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    if kind == "multi_worker":
        return _MultiWorkerStrategy()
    if kind == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    raise ConfigError(f"unknown distribution strategy {kind!r}")


class _MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """``MultiWorkerMirroredStrategy`` whose ``reduce`` takes what Keras 3's ``fit`` hands it.

    Keras 3 (3.15, keras-team/keras#20585) calls ``strategy.reduce`` in three ways:

    - ``("MEAN", (x, y) batch, axis=None)`` in its symbolic build, which only reads the shapes. The
      collective strategy all-reduces one value at a time, only in float and int32/64, and only
      when every worker's shard has the same shape (a last batch of 5 on 2 workers is 3 + 2), so a
      batch tensor (rank >= 1, not a variable) comes back as this worker's own here;
    - ``("MEAN", per-step metric value, axis=0)``: a scalar has no axis 0, so scalars are reduced
      across replicas as they are;
    - ``(SUM, metric variable, axis=None)`` when a metric is read outside a step: reduced across
      every worker as TensorFlow does it. This is where ``fit`` and ``evaluate`` take their final
      logs from, so the metric variables must have been made in this strategy's scope (see
      ``tlkit.finetune``); made outside it they are plain per-worker variables and the logs are the
      chief's shard only.
    """

    def reduce(self, reduce_op: Any, value: Any, axis: int | None) -> Any:
        def one(item: Any) -> Any:
            local = self.experimental_local_results(item)[0]
            dtype = getattr(local, "dtype", None)
            if dtype is not None and not (dtype.is_floating or dtype in (tf.int32, tf.int64)):
                return local
            rank = getattr(getattr(local, "shape", None), "rank", None)
            if axis is None and rank and not isinstance(item, tf.Variable):
                return local  # Keras's symbolic build: a batch, for its shapes only
            return super(_MultiWorkerStrategy, self).reduce(reduce_op, item, None if rank == 0 else axis)

        return tf.nest.map_structure(one, value)


def load_run_model(run_dir: str | Path) -> tuple[keras.Model, list[str]]:
    """The final model of a run and its class names (see :meth:`tlkit.rundir.RunDir.load_model`);
    for a multi-task run, ``{task: class names}``."""
    run = RunDir(run_dir)
    return run.load_model(), run.task_labels() or run.labels()  # type: ignore[return-value]


def train(config: RunConfig | str | Path, *, verbose: int | str | None = None, baselines: bool = True) -> RunResult:
    """Trains a classifier as the config says, writing (or resuming) its run directory.

    Calling it again with the same config after an interruption resumes from the last
    finished epoch; a finished run is not retrained. A run directory made with a
    different config is refused.
    """
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    # First: a multi-worker strategy must exist before any TensorFlow op runs.
    strategy = make_strategy(cfg.training.distribute)
    verbose = cfg.training.verbose if verbose is None else verbose
    cfg = resolve_tasks(cfg)  # several label columns: one head per task (tlkit.multitask.train)
    if cfg.tasks:
        done = train_multitask(cfg, strategy, verbose=verbose, baselines=baselines, modality=_data_modality(cfg.data))
        return RunResult(done.run_dir, done.model, done.task_labels, done.history, done.test_metrics)  # type: ignore[arg-type]
    # Multi-worker: only the chief writes output_dir; the other workers write their own temp folder.
    rundir = RunDir.for_worker(cfg.output_dir) if cfg.training.distribute == "multi_worker" else RunDir(cfg.output_dir)
    run = rundir.path
    note = rundir.claim(cfg)
    if note:
        say(verbose, note)
    if rundir.is_complete:
        say(verbose, f"run {run} is already complete; nothing to do")
        return RunResult(run, rundir.load_model(), rundir.labels(), None, rundir.status().get("test_metrics", {}))
    rundir.ensure_writable()
    spec = _resolve_spec(cfg)  # a typo in the backbone fails here, before the run directory holds anything
    rundir.write_config(cfg)

    keras.utils.set_random_seed(cfg.seed)
    if cfg.training.mixed_precision != "none":
        keras.mixed_precision.set_global_policy(cfg.training.mixed_precision)
    if spec.modality == "audio":
        data = _prepare_audio(cfg, spec, rundir, verbose)
    else:
        data = _prepare_images(cfg, spec, rundir, verbose)
    splits, train_ds, val_ds = data.splits, data.train, data.val
    with strategy.scope():
        model = build_classifier(
            spec, len(splits.class_names), weights=cfg.backbone.weights, head=cfg.head,
            augmentation=data.augmentation, image_size=data.image_size, seed=cfg.seed, name=model_name(cfg.name),
        )
    transfer = cache = None
    if baselines:
        cache = _probe_cache(model, data, cfg, rundir)  # images: fine_tune's head stage reuses these features
        transfer = measure_baselines(model, data.run_splits, data.image_batches, multi_label=cfg.head.multi_label,
                                     cache=cache, say=lambda message: say(verbose, message))
    target = load_run_target(cfg, data.run_splits, spec.modality, data.image_size) if cfg.adaptation.enabled else None
    if target is not None:
        auc = target.measure(model, data.run_splits, "before", seed=cfg.seed)
        say(verbose, f"{target.summary()}; shift before training: domain AUC {auc:.3f}")
    weights = None
    if cfg.data.class_weights and not cfg.head.multi_label:
        weights = class_weights(splits.train, splits.class_names)
    started = time.time()
    rundir.write_status({"status": "training", "backbone": spec.name, "started": started})
    history = fine_tune(
        model, train_ds, val_ds, cfg.schedule, head=cfg.head, run_dir=run, strategy=strategy,
        class_weight=weights, jit_compile=cfg.training.jit_compile, feature_cache=cfg.training.feature_cache,
        feature_passes=data.feature_passes, features=cache, verbose=verbose,
        adaptation=cfg.adaptation if target else None, target=target.data if target else None,
    )
    if target is not None:
        auc = target.measure(model, data.run_splits, "after", seed=cfg.seed, done=history.adaptation)
        say(verbose, f"adaptation {cfg.adaptation.method!r}: shift after training: domain AUC {auc:.3f}")
    calibration = _calibrate(model, data, cfg, verbose)
    if calibration is not None:
        rundir.write_calibration(**calibration.to_dict())
    test_metrics: dict[str, float] = {}
    if splits.test:
        test_metrics = data.evaluate_test(model)
        say(verbose, "test: " + ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))
    if transfer is not None:
        finish_report(transfer, data.predict(model, splits.val) if splits.val else None,
                      data.predict(model, splits.test) if splits.test else None,
                      multi_label=cfg.head.multi_label, seconds=history.seconds)
        say(verbose, "measured on this run's split:\n" + transfer.table())
        for warning in transfer.warnings:
            print(f"[tlkit] WARNING: {warning}", file=sys.stderr, flush=True)
    with strategy.scope():  # a plain optimizer, so the saved model is a clean, fittable Keras model
        model.compile(
            optimizer="adam", loss=classification_loss(cfg.head),
            metrics=classification_metrics(cfg.head, len(splits.class_names)),
        )
        model.optimizer.build(model.trainable_variables)
    atomic_save(rundir.file(RunDir.MODEL), model.save)
    atomic_save(rundir.file(RunDir.WEIGHTS), model.save_weights)  # for rebuilding SavedModel-backbone runs
    rundir.write_status({
        "status": "complete", "backbone": spec.name, "backbone_source": spec.source,
        "started": started, "finished": time.time(),
        "train_seconds": history.seconds, "test_metrics": test_metrics, "num_classes": len(splits.class_names),
        "calibration": calibration.to_dict() if calibration else None,
        "transfer": transfer.to_dict() if transfer else None,
        "adaptation": target.record if target else None,
        "data": {"dropped_classes": list(splits.dropped_classes), "skipped_files": len(splits.skipped),
                 "ignored_files": len(splits.ignored)},
        **data.status, "versions": versions(),
    })
    say(verbose, f"wrote {rundir.file(RunDir.MODEL)}")
    return RunResult(run, model, splits.class_names, history, test_metrics)


@dataclass
class _RunData:
    """The data side of a run, image or audio: datasets, how to score the test split, run.json extras."""

    splits: Splits
    train: Any
    val: Any
    evaluate_test: Callable[[keras.Model], dict[str, float]]
    predict: Callable[[keras.Model, list[Example]], tuple[np.ndarray, np.ndarray]]  # -> (targets, probabilities)
    run_splits: RunSplits
    image_batches: Callable[[list[Example]], Any] | None
    augmentation: Any
    image_size: tuple[int, int] | None
    status: dict[str, Any]
    feature_passes: int = 1  # passes over `train` cached for solved head stages (random audio crops)


def _resolve_spec(cfg: RunConfig) -> BackboneSpec:
    """The backbone spec; an ad-hoc ``.keras`` / SavedModel / hub backbone is an audio
    encoder when the data are audio files."""
    return get_spec(cfg.backbone.name, image_size=cfg.backbone.image_size, modality=_data_modality(cfg.data),
                    sample_rate=cfg.backbone.sample_rate)


def _data_modality(data: DataConfig, limit: int = 200) -> str | None:
    """``"audio"`` or ``"image"`` from the suffixes of up to ``limit`` data files (``None``: unknown)."""
    paths: list[str] = []
    try:
        if data.manifest is not None:
            with open(data.manifest, newline="", encoding="utf-8") as handle:
                for index, row in enumerate(csv.DictReader(handle)):
                    if index >= limit:
                        break
                    paths.append(row.get("path") or "")
        elif data.path is not None and Path(data.path).is_dir():
            for index, file in enumerate(p for p in Path(data.path).rglob("*") if p.is_file()):
                if index >= limit:
                    break
                paths.append(str(file))
    except (OSError, csv.Error, UnicodeDecodeError):
        return None  # the data loader reports the real problem with its own message
    audio = sum(is_audio_file(p) for p in paths)
    images = sum(Path(p).suffix.lower() in IMAGE_SUFFIXES for p in paths)
    if audio > images:
        return "audio"
    return "image" if images else None


def _prepare_images(cfg: RunConfig, spec: BackboneSpec, run: RunDir, verbose: int | str) -> _RunData:
    splits = load_splits(
        cfg.data.path, cfg.data.manifest, val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction, seed=cfg.seed,
        drop_unreadable_classes=cfg.data.drop_unreadable_classes,
    )
    say(verbose, splits.summary())
    run.write_data(splits)
    size = (cfg.backbone.image_size,) * 2 if cfg.backbone.image_size else spec.image_size
    make = lambda examples, training: make_batches(  # noqa: E731
        examples, splits.class_names, size, cfg.data.batch_size, training=training, seed=cfg.seed,
        cache=cfg.data.cache,
    )
    train_ds = make(splits.train, True)
    val_ds = make(splits.val, False) if splits.val else None

    def evaluate_test(model: keras.Model) -> dict[str, float]:
        test_ds = make(splits.test, False).batched()
        values = model.evaluate(test_ds, verbose=0, return_dict=True)
        test_metrics = {k: float(v) for k, v in values.items()}
        return test_metrics

    def predict(model: keras.Model, examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
        probabilities = model.predict(make(examples, False).batched(), verbose=0)
        return encode_labels(examples, splits.class_names), np.asarray(probabilities, np.float32)

    contract = InputContract("image", size)
    run_splits = RunSplits(splits.train, splits.val, splits.test, splits.class_names)
    return _RunData(splits, train_ds, val_ds, evaluate_test, predict, run_splits, lambda ex: make(ex, False),
                    cfg.augmentation, size, contract.to_status())


def _prepare_audio(cfg: RunConfig, spec: BackboneSpec, run: RunDir, verbose: int | str) -> _RunData:
    rate, clip, crops = audio_crops(spec, cfg.data.clip_seconds, cfg.data.eval_crops)
    if clip != clip_samples(cfg.data.clip_seconds, rate):
        say(verbose, f"backbone {spec.name!r} takes exactly {clip} samples; crops are {clip / rate:g}s")
    splits = load_audio_splits(
        cfg.data.path, cfg.data.manifest, sample_rate=rate, val_fraction=cfg.data.val_fraction,
        test_fraction=cfg.data.test_fraction, seed=cfg.seed,
        drop_unreadable_classes=cfg.data.drop_unreadable_classes,
    )
    say(verbose, splits.summary())
    run.write_data(splits)
    batch = cfg.data.batch_size
    train_ds = make_audio_dataset(
        splits.train, splits.class_names, splits.waveforms, clip, batch, training=True, seed=cfg.seed
    )
    val_ds = None
    if splits.val:
        val_ds = make_audio_dataset(splits.val, splits.class_names, splits.waveforms, clip, batch, crops=crops)

    def evaluate_test(model: keras.Model) -> dict[str, float]:
        return evaluate_audio(
            model, splits.test, splits.class_names, splits.waveforms, clip, crops=crops, head=cfg.head,
            batch_size=batch,
        )

    def predict(model: keras.Model, examples: list[Example]) -> tuple[np.ndarray, np.ndarray]:
        waves = [splits.waveforms[e.path] for e in examples]
        probabilities = predict_clips(model.predict_on_batch, waves, clip, crops=crops, batch_size=batch)
        return encode_labels(examples, splits.class_names), np.asarray(probabilities, np.float32)

    status = InputContract("audio", None, rate, clip / rate, crops).to_status()
    augmentation = audio_augmentation(cfg.augmentation, lambda message: say(verbose, message))
    run_splits = RunSplits(splits.train, splits.val, splits.test, splits.class_names, splits.waveforms, rate, clip,
                           crops)
    return _RunData(splits, train_ds, val_ds, evaluate_test, predict, run_splits, None, augmentation, None, status,
                    AUDIO_CACHED_CROPS)


def _probe_cache(model: keras.Model, data: _RunData, cfg: RunConfig, rundir: RunDir) -> FeatureCache | None:
    """Image runs: the frozen backbone's features of the training and validation images, computed
    once for the linear probe and handed to ``fine_tune`` for its head stage (``None`` where the
    cache cannot apply: audio crops, trainable pooling, ``feature_cache = "off"``)."""
    mode = cfg.training.feature_cache
    if data.image_batches is None or mode == "off" or data.val is None:
        return None
    if cache_blocker(model, data.train, data.val, augmented_ok=True) is not None:
        return None
    return FeatureCache.build(model, data.train, data.val, mode, rundir.checkpoints("feature_cache"))


def _calibrate(model: keras.Model, data: _RunData, cfg: RunConfig, verbose: int | str) -> Calibration | None:
    """Temperature scaling fitted on the validation split (as the run scores it) and folded into
    the model, so every later use of the model returns calibrated probabilities."""
    if not data.splits.val:
        say(verbose, "not calibrated: the run has no validation split")
        return None
    targets, probabilities = data.predict(model, data.splits.val)
    calibration = calibrate_model(model, targets, probabilities, multi_label=cfg.head.multi_label)
    if calibration is None:
        say(verbose, "not calibrated: a temperature does not lower the validation log-loss "
                      "(validation split too small or perfectly separated)")
    else:
        say(verbose, f"calibrated: temperature {calibration.temperature:.3g} on {calibration.examples} validation "
                      f"examples (log-loss {calibration.val_nll_before:.3f} -> {calibration.val_nll_after:.3f}), "
                      "folded into the model")
    return calibration

