"""Batches: an example-level dataset that fine-tuning batches (and shuffles) itself.

Handing :func:`tlkit.fine_tune` a :class:`Batches` instead of an already batched
``tf.data.Dataset`` lets it cache backbone features for head-only stages: it can replace
each example by its feature vector and batch the features in exactly the order the
images would have been batched (same seed, same shuffle, same batch size).

Epoch ``e`` of a training set reads the same batches in the same order whether or not the run
was interrupted before it: :meth:`Batches.epochs` shuffles epoch ``e`` with a seed made from the
Batches' seed and ``e`` only, so a resumed stage starts at its epoch with that epoch's order, and
no earlier pass over the data (an interrupted process, Keras's build under a strategy) shifts it
(see ``docs/reliability.md``). Other training sets take part through :class:`EpochAddressed`:
a ``tf.data.Dataset`` that carries one as ``tlkit_epochs`` (the audio training set of
:func:`tlkit.data.audio.make_audio_dataset`) is read by epoch the same way (:func:`epoch_addressed`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import tensorflow as tf

SHUFFLE_BUFFER_LIMIT = 10_000

#: The attribute of a ``tf.data.Dataset`` holding its :class:`EpochAddressed` source.
EPOCHS_ATTRIBUTE = "tlkit_epochs"


@runtime_checkable
class EpochAddressed(Protocol):
    """Training data whose epoch ``e`` depends on its seed and ``e`` only (:class:`Batches` is one).

    ``epochs(first, end)``: the batched ``tf.data.Dataset`` of epochs ``first .. end - 1`` back to
    back, ``steps`` batches each (``fit`` reads it with ``steps_per_epoch=steps``).
    """

    @property
    def steps(self) -> int: ...

    def epochs(self, first: int, end: int) -> tf.data.Dataset: ...


@dataclass(frozen=True)
class Batches:
    """Unbatched ``(input, target)`` examples in a fixed order, plus how to batch them.

    Attributes:
        examples: an unbatched ``tf.data.Dataset`` of ``(input, target)`` in a deterministic
            order (decode and resize already applied, ideally cached).
        count: number of examples.
        batch_size: examples per batch.
        shuffle: reshuffle every epoch (training sets).
        seed: shuffle seed; the same seed gives the same order of batches.
    """

    examples: tf.data.Dataset
    count: int
    batch_size: int = 32
    shuffle: bool = False
    seed: int = 0

    def batched(self) -> tf.data.Dataset:
        """The ``tf.data.Dataset`` of one epoch's batches (each further pass over the same dataset
        object reshuffles; see :meth:`epochs` for epoch ``e`` of a training run)."""
        ds = self.examples
        if self.shuffle:
            ds = ds.shuffle(min(self.count, SHUFFLE_BUFFER_LIMIT), seed=self.seed, reshuffle_each_iteration=True)
        return ds.batch(self.batch_size).prefetch(tf.data.AUTOTUNE)

    def epochs(self, first: int, end: int) -> tf.data.Dataset:
        """Epochs ``first .. end - 1`` back to back: ``(end - first) * steps`` batches, for ``fit`` with
        ``steps_per_epoch=steps`` (Keras then keeps one iterator across epochs).

        Epoch ``e`` is shuffled with :func:`epoch_seed` ``(seed, e)`` and not reshuffled, so every
        pass over the returned dataset reads the same batches: a stage resumed after epoch ``k``
        reads those of an uninterrupted stage from epoch ``k`` on.
        """
        if not self.shuffle:
            return self.examples.batch(self.batch_size).repeat(max(0, end - first)).prefetch(tf.data.AUTOTUNE)
        buffer = min(self.count, SHUFFLE_BUFFER_LIMIT)
        return epoch_chain(lambda e: self.examples.shuffle(buffer, seed=epoch_seed(self.seed, e),
                                                           reshuffle_each_iteration=False).batch(self.batch_size),
                           first, end)

    def in_order(self) -> tf.data.Dataset:
        """Batches in the fixed example order (no shuffling), e.g. to compute features once."""
        return self.examples.batch(self.batch_size).prefetch(tf.data.AUTOTUNE)

    def with_examples(self, examples: tf.data.Dataset) -> "Batches":
        """The same batching applied to other per-example data of the same length and order."""
        return replace(self, examples=examples)

    @property
    def steps(self) -> int:
        return -(-self.count // self.batch_size)


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """The shuffle seed of epoch ``epoch`` (from 0) of data shuffled with ``seed``: a function of the two only
    (``stream`` > 0: another independent seed of that epoch, e.g. for its random crops)."""
    return int(np.random.SeedSequence([seed % 2**32, epoch, *([stream] if stream else [])]).generate_state(1)[0])


def epoch_chain(epoch: Callable[[int], tf.data.Dataset], first: int, end: int) -> tf.data.Dataset:
    """``epoch(first)``, ..., ``epoch(end - 1)`` (each an epoch's batched dataset) back to back, prefetched;
    none (``end <= first``) gives an empty dataset of the same structure."""
    parts = [epoch(e) for e in range(first, end)] or [epoch(first).take(0)]
    while len(parts) > 1:  # pairwise, so the nesting is log2(epochs) deep
        parts = [a.concatenate(b) for a, b in zip(parts[::2], parts[1::2])] + parts[len(parts) // 2 * 2:]
    return parts[0].prefetch(tf.data.AUTOTUNE)


def epoch_addressed(data: Any) -> EpochAddressed | None:
    """``data`` read by epoch: tlkit :class:`Batches` themselves, the :class:`EpochAddressed` source a
    ``tf.data.Dataset`` carries as ``tlkit_epochs``, or ``None`` (a plain pipeline: a transformed copy
    of such a dataset carries none)."""
    if isinstance(data, Batches):
        return data
    source = getattr(data, EPOCHS_ATTRIBUTE, None)
    return source if isinstance(source, EpochAddressed) else None


def epoch_range(batched: tf.data.Dataset, steps: int, first: int, end: int) -> tf.data.Dataset:
    """Passes ``first .. end - 1`` over a newly built, finite batched dataset of ``steps`` batches.

    ``repeat`` makes pass ``e`` the ``e``-th iteration of ``batched`` (a reshuffling ``shuffle``
    advances its order once per iteration, as when ``fit`` re-iterates it every epoch); ``skip``
    passes over the earlier epochs without training on them. ``batched`` must be new (not
    iterated before), or its first pass is not epoch 0.
    """
    return batched.repeat(end).skip(first * steps)
