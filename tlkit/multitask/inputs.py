"""The data side of a multi-task run, image or audio: datasets, per-example predictions, test scores.

Image runs read the manifest with :func:`tlkit.multitask.data.load_task_splits` and serve
:class:`~tlkit.data.batches.Batches` of pixels. Audio runs read it with
:func:`tlkit.data.audio.load_audio_splits` (``tasks=``; speakers kept whole) and serve, as a
single-task audio run does, one random seeded crop per clip and epoch for training and
``eval_crops`` evenly spaced crops per clip for validation; predictions, calibration, baselines
and test scores are per clip, the mean of its crops' probabilities
(:func:`tlkit.data.audio.predict_clips`). Targets are ``{task: (B, C_task)}`` with ``-1`` rows
where a label is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from tlkit.audio_augment import audio_augmentation
from tlkit.backbones.spec import BackboneSpec
from tlkit.baselines import frozen_clip_features, frozen_features
from tlkit.config import RunConfig
from tlkit.data.audio import (
    AUDIO_CACHED_CROPS,
    AudioSplits,
    audio_crops,
    clip_samples,
    load_audio_splits,
    make_audio_dataset,
    predict_clips,
)
from tlkit.data.images import Example, Splits
from tlkit.errors import ConfigError, DataError
from tlkit.multitask.data import load_task_splits, task_batches, task_targets
from tlkit.multitask.losses import task_scores
from tlkit.multitask.manifest import task_columns
from tlkit.rundir import InputContract
from tlkit.task_outputs import TaskLayout


@dataclass
class TaskData:
    """What a multi-task run trains and scores on.

    Attributes:
        splits: the split examples (``splits.tasks`` with their classes).
        train / val: what ``fine_tune`` reads: image Batches, or audio random-crop / fixed-crop
            ``tf.data`` datasets of ``(waveforms, {task: targets})``.
        predict: ``(model, examples) -> {task: (N, C_task)}`` probabilities per example (per clip).
        evaluate: ``(model, examples) -> {"loss", "<task>_loss", "<task>_accuracy"}``.
        features: ``(feature extractor, examples) -> (N, C)`` frozen features per example, for
            the linear probes (audio: the mean over the evaluation crops).
        contract: the model's input contract (``run.json``).
        augmentation / image_size: for building the model.
        feature_passes: passes over ``train`` the feature cache takes (random audio crops).
        waveforms / sample_rate: audio: the decoded clips, for the log-mel baseline.
    """

    splits: Splits
    train: Any
    val: Any
    predict: Callable[[keras.Model, Sequence[Example]], dict[str, np.ndarray]]
    evaluate: Callable[[keras.Model, Sequence[Example]], dict[str, float]]
    features: Callable[[keras.Model, Sequence[Example]], np.ndarray]
    contract: InputContract
    augmentation: Any
    image_size: tuple[int, int] | None
    feature_passes: int = 1
    waveforms: dict[str, np.ndarray] | None = None
    sample_rate: int | None = None

    @property
    def is_audio(self) -> bool:
        return self.contract.is_audio


def image_task_data(cfg: RunConfig, spec: BackboneSpec, splits: Splits | None = None) -> TaskData:
    """The manifest's images, split (or the ``splits`` given), as :class:`TaskData`."""
    if splits is None:
        assert cfg.data.manifest is not None
        splits = load_task_splits(cfg.data.manifest, task_columns(cfg), val_fraction=cfg.data.val_fraction,
                                  test_fraction=cfg.data.test_fraction, seed=cfg.seed)
    _check_tasks(splits, cfg)
    tasks = splits.tasks
    size = (cfg.backbone.image_size,) * 2 if cfg.backbone.image_size else spec.image_size

    def batches(examples: Sequence[Example], training: bool = False) -> Any:
        return task_batches(examples, tasks, size, cfg.data.batch_size, training=training, seed=cfg.seed,
                            cache=cfg.data.cache)

    def predict(model: keras.Model, examples: Sequence[Example]) -> dict[str, np.ndarray]:
        values = model.predict(batches(examples).in_order(), verbose=0)
        return {t.name: np.asarray(values[t.name], np.float32) for t in tasks}

    def evaluate(model: keras.Model, examples: Sequence[Example]) -> dict[str, float]:
        values = model.evaluate(batches(examples).batched(), verbose=0, return_dict=True)
        return {k: float(v) for k, v in values.items()}

    return TaskData(splits, batches(splits.train, True), batches(splits.val) if splits.val else None, predict,
                    evaluate, lambda extractor, examples: frozen_features(extractor, batches(examples)),
                    InputContract("image", size), cfg.augmentation, size)


def audio_task_data(cfg: RunConfig, spec: BackboneSpec, say: Callable[[str], None],
                    splits: Splits | None = None) -> TaskData:
    """The manifest's clips, decoded once and split with speakers kept whole (or the
    :class:`~tlkit.data.audio.AudioSplits` given), as :class:`TaskData`.

    Raises:
        ConfigError: the backbone has no audio front-end, ``eval_crops`` < 1, or ``splits`` hold
            no decoded clips or other tasks than the config's.
    """
    rate, clip, crops = audio_crops(spec, cfg.data.clip_seconds, cfg.data.eval_crops)
    if clip != clip_samples(cfg.data.clip_seconds, rate):
        say(f"backbone {spec.name!r} takes exactly {clip} samples; crops are {clip / rate:g}s")
    if splits is None:
        splits = load_audio_splits(manifest=cfg.data.manifest, sample_rate=rate, val_fraction=cfg.data.val_fraction,
                                   test_fraction=cfg.data.test_fraction, seed=cfg.seed, tasks=task_columns(cfg))
    if not isinstance(splits, AudioSplits) or splits.sample_rate != rate:
        raise ConfigError(f"an audio multi-task run needs AudioSplits decoded at {rate} Hz (load_audio_splits), "
                          f"got {type(splits).__name__}")
    _check_tasks(splits, cfg)
    tasks, waves, batch = splits.tasks, splits.waveforms, cfg.data.batch_size
    layout = TaskLayout.from_labels({t.name: t.classes for t in tasks}, {t.name: t.multi_label for t in tasks})

    def dataset(examples: Sequence[Example], training: bool = False) -> Any:
        return make_audio_dataset(examples, [], waves, clip, batch, training=training, seed=cfg.seed,
                                  crops=1 if training else crops, targets=task_targets(examples, tasks))

    def predict(model: keras.Model, examples: Sequence[Example]) -> dict[str, np.ndarray]:
        joined = predict_clips(lambda rows: layout.join(model.predict_on_batch(rows)), [waves[e.path] for e in examples],
                               clip, crops=crops, batch_size=batch)
        return layout.split(joined)

    def evaluate(model: keras.Model, examples: Sequence[Example]) -> dict[str, float]:
        return task_scores(task_targets(examples, tasks), predict(model, examples), cfg.tasks, cfg.head)

    def features(extractor: keras.Model, examples: Sequence[Example]) -> np.ndarray:
        return frozen_clip_features(extractor, [waves[e.path] for e in examples], clip, crops=crops, batch_size=batch)

    augmentation = audio_augmentation(cfg.augmentation, say)
    return TaskData(splits, dataset(splits.train, True), dataset(splits.val) if splits.val else None, predict,
                    evaluate, features, InputContract("audio", None, rate, clip / rate, crops), augmentation, None,
                    AUDIO_CACHED_CROPS, waves, rate)


def _check_tasks(splits: Splits, cfg: RunConfig) -> None:
    """Raises unless ``splits`` hold the config's tasks (given splits may not), each with two classes
    among its labelled training rows (one for a multi-label task).

    Raises:
        ConfigError: other tasks than the config's.
        DataError: a task with too few classes in training (its head could not be fitted).
    """
    names = [t.name for t in splits.tasks]
    if names != [t.name for t in cfg.tasks]:
        raise ConfigError(f"the splits hold the tasks {names}, the config {[t.name for t in cfg.tasks]}; "
                          "give splits of the config's tasks")
    for task in splits.tasks:
        found = sorted({label for e in splits.train for label in e.task_labels(task.name)})
        if len(found) < (1 if task.multi_label else 2):
            raise DataError(f"task {task.name!r} has the class(es) {found} among its labelled training rows; its "
                            "head needs two: label more training examples of its other classes, or lower "
                            "val_fraction / test_fraction")
