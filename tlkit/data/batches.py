"""Batches: an example-level dataset that fine-tuning batches (and shuffles) itself.

Handing :func:`tlkit.fine_tune` a :class:`Batches` instead of an already batched
``tf.data.Dataset`` lets it cache backbone features for head-only stages: it can replace
each example by its feature vector and batch the features in exactly the order the
images would have been batched (same seed, same shuffle, same batch size).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import tensorflow as tf

SHUFFLE_BUFFER_LIMIT = 10_000


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
        """The ``tf.data.Dataset`` of batches that training reads."""
        ds = self.examples
        if self.shuffle:
            ds = ds.shuffle(min(self.count, SHUFFLE_BUFFER_LIMIT), seed=self.seed, reshuffle_each_iteration=True)
        return ds.batch(self.batch_size).prefetch(tf.data.AUTOTUNE)

    def in_order(self) -> tf.data.Dataset:
        """Batches in the fixed example order (no shuffling), e.g. to compute features once."""
        return self.examples.batch(self.batch_size).prefetch(tf.data.AUTOTUNE)

    def with_examples(self, examples: tf.data.Dataset) -> "Batches":
        """The same batching applied to other per-example data of the same length and order."""
        return replace(self, examples=examples)

    @property
    def steps(self) -> int:
        return -(-self.count // self.batch_size)
