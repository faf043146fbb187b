"""Decoded waveforms -> crops -> batched ``tf.data``: the audio datasets training and evaluation read.

Datasets yield ``(waveform float32 (B, clip_samples), targets float32 (B, num_classes))``:
training takes one random, seeded crop per clip and epoch (clips shorter than the crop are
zero-padded at a random offset); evaluation takes ``crops`` evenly spaced crops per clip.

A training dataset is a plain ``tf.data`` pipeline (each pass over it reshuffles and meets other
crop draws, which the feature cache uses to cache several crops per clip) that also carries an
:class:`AudioEpochs` as ``tlkit_epochs`` (:func:`tlkit.data.batches.epoch_addressed`): epoch ``e``
of it is shuffled, and its crops drawn, with seeds made from the dataset's seed and ``e`` only, so
``fine_tune`` can start a resumed stage at its epoch with the batches an uninterrupted run reads
there (see ``docs/reliability.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from tlkit.data.batches import EPOCHS_ATTRIBUTE, SHUFFLE_BUFFER_LIMIT, epoch_chain, epoch_seed
from tlkit.data.images import Example, encode_labels
from tlkit.errors import DataError

__all__ = ["AudioEpochs", "clip_samples", "fixed_crops", "make_audio_dataset"]


def clip_samples(seconds: float, sample_rate: int) -> int:
    """Samples in a crop of ``seconds`` at ``sample_rate`` (at least 1)."""
    return max(1, int(round(seconds * sample_rate)))


def fixed_crops(waveform: np.ndarray, length: int, count: int = 1) -> np.ndarray:
    """``count`` evenly spaced crops of ``length`` samples: ``(count, length)`` float32.

    The first crop starts at the clip's start, the last ends at its end (one crop: the
    centre). A clip shorter than ``length`` is zero-padded equally on both sides, and
    every crop is then that padded clip.
    """
    wave = np.asarray(waveform, dtype=np.float32).reshape(-1)
    if count < 1:
        raise DataError(f"need at least one crop per clip, got {count}")
    if len(wave) < length:
        left = (length - len(wave)) // 2
        wave = np.pad(wave, (left, length - len(wave) - left))
    spare = len(wave) - length
    if count == 1:
        starts = [spare // 2]
    else:
        starts = np.round(np.linspace(0, spare, count)).astype(int).tolist()
    return np.stack([wave[s : s + length] for s in starts]).astype(np.float32)


def _random_crop(waveform: tf.Tensor, draw: tf.Tensor, length: int) -> tf.Tensor:
    """One crop of ``length`` at an offset derived from the int64 ``draw``; short clips padded at random."""
    samples = tf.shape(waveform, out_type=tf.int64)[0]
    shortfall = tf.maximum(tf.constant(length, tf.int64) - samples, 0)
    pad_left = tf.math.floormod(draw, shortfall + 1)
    waveform = tf.pad(waveform, [[pad_left, shortfall - pad_left]])
    spare = tf.shape(waveform, out_type=tf.int64)[0] - length
    start = tf.math.floormod(tf.bitwise.right_shift(draw, 16), spare + 1)
    crop = waveform[start : start + length]
    crop.set_shape([length])
    return crop


def _waveforms_of(examples: Sequence[Example], waveforms: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    missing = [e.path for e in examples if e.path not in waveforms]
    if missing:
        raise DataError(
            f"{len(missing)} example(s) have no decoded waveform (first: {missing[0]!r}); "
            "build datasets from the AudioSplits that load_audio_splits returned"
        )
    return [waveforms[e.path] for e in examples]


def make_audio_dataset(
    examples: Sequence[Example],
    class_names: Sequence[str],
    waveforms: Mapping[str, np.ndarray],
    clip_length: int,
    batch_size: int = 32,
    *,
    training: bool = False,
    seed: int = 0,
    crops: int = 1,
    targets: Any = None,
) -> tf.data.Dataset:
    """A batched ``tf.data.Dataset`` of ``(waveform float32 (B, clip_length), targets (B, C))``.

    Args:
        examples: the split to serve; every path must be in ``waveforms``.
        class_names: output order of the one-hot (or multi-hot) targets.
        waveforms: decoded clips, e.g. :attr:`AudioSplits.waveforms`.
        clip_length: samples per crop (see :func:`clip_samples`).
        training: one random crop per clip per epoch, shuffled with ``seed`` (the same
            seed gives the same crops and order; each epoch differs from the last). The
            dataset carries its :class:`AudioEpochs` as ``tlkit_epochs``, which ``fine_tune``
            reads epoch by epoch (each further pass over the dataset itself reshuffles).
        crops: evaluation only: ``crops`` evenly spaced crops per clip as consecutive
            rows (so the dataset holds ``len(examples) * crops`` rows); validation loss
            and accuracy are then per crop. :func:`predict_clips` averages them per clip.
        targets: the targets to pair with the examples instead of their one-hot
            ``class_names``: an ``(N, C)`` array or a dict of them (a multi-task model's
            ``{task: (N, C_task)}``, see :func:`tlkit.multitask.data.task_targets`).
    """
    if not examples:
        raise DataError("cannot build a dataset from zero examples (is a split empty? lower val/test fractions)")
    if clip_length < 1:
        raise DataError(f"clip length must be at least one sample, got {clip_length}")
    waves = _waveforms_of(examples, waveforms)
    targets = encode_labels(examples, class_names) if targets is None else targets
    if not training:
        rows = np.concatenate([fixed_crops(w, clip_length, crops) for w in waves])
        repeated = tf.nest.map_structure(lambda column: np.repeat(np.asarray(column), crops, axis=0), targets)
        ds = tf.data.Dataset.from_tensor_slices((rows, repeated))
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    lengths = np.array([len(w) for w in waves], np.int64)
    ragged = tf.RaggedTensor.from_row_lengths(np.concatenate(waves).astype(np.float32), lengths)
    epochs = AudioEpochs(tf.data.Dataset.from_tensor_slices((ragged, targets)), len(waves), clip_length, batch_size,
                         seed)
    shuffled = epochs.clips.shuffle(min(len(waves), SHUFFLE_BUFFER_LIMIT), seed=seed, reshuffle_each_iteration=True)
    # The draws come in the same order each pass but meet other clips after the reshuffle,
    # so crops change from pass to pass while staying reproducible for a seed.
    ds = _cropped(shuffled, tf.data.Dataset.random(seed=seed), clip_length).batch(batch_size).prefetch(
        tf.data.AUTOTUNE)
    setattr(ds, EPOCHS_ATTRIBUTE, epochs)
    return ds


@dataclass(frozen=True)
class AudioEpochs:
    """A training set's random crops by epoch (:class:`~tlkit.data.batches.EpochAddressed`).

    Attributes:
        clips: unbatched ``(waveform float32 (samples,), target)`` in a fixed order.
        count / clip_length / batch_size / seed: clips, samples per crop, crops per batch, seed.
    """

    clips: tf.data.Dataset
    count: int
    clip_length: int
    batch_size: int
    seed: int = 0

    @property
    def steps(self) -> int:
        return -(-self.count // self.batch_size)

    def epoch(self, epoch: int) -> tf.data.Dataset:
        """Epoch ``epoch``'s batches: shuffled with ``epoch_seed(seed, epoch)``, its crops drawn from
        ``epoch_seed(seed, epoch, 1)``; the same batches on every pass."""
        shuffled = self.clips.shuffle(min(self.count, SHUFFLE_BUFFER_LIMIT), seed=epoch_seed(self.seed, epoch),
                                      reshuffle_each_iteration=False)
        draws = tf.data.Dataset.random(seed=epoch_seed(self.seed, epoch, 1))
        return _cropped(shuffled, draws, self.clip_length).batch(self.batch_size)

    def epochs(self, first: int, end: int) -> tf.data.Dataset:
        """Epochs ``first .. end - 1`` back to back: ``(end - first) * steps`` batches (see
        :meth:`tlkit.data.batches.Batches.epochs`)."""
        return epoch_chain(self.epoch, first, end)


def _cropped(clips: tf.data.Dataset, draws: tf.data.Dataset, clip_length: int) -> tf.data.Dataset:
    """``(clip, target)`` examples -> ``(crop (clip_length,), target)``, the n-th crop placed by the n-th draw."""
    return tf.data.Dataset.zip((clips, draws)).map(
        lambda pair, draw: (_random_crop(tf.cast(pair[0], tf.float32), draw, clip_length), pair[1]),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
