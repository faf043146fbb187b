"""AdaBN (Li et al., ICLR workshops 2017, "Revisiting batch normalization for practical domain
adaptation"): re-estimate every BatchNorm layer's statistics on another domain's data.

A classifier normalises each BatchNorm layer's input with moving statistics; AdaBN replaces
them by the mean and variance of that input on the target data, and changes nothing else.
:func:`adapt_batchnorm` computes them in one inference pass: a clone of the classifier whose
BatchNorm layers normalise with the statistics of each batch (so every layer's input is what
it is once the layers before it are adapted, the usual AdaBN estimate) and accumulate the
per-channel sums of their inputs over all batches. The pooled mean and (biased) variance then
replace ``moving_mean`` / ``moving_variance`` of the original layers, frozen
(:class:`~tlkit.layers.FrozenBatchNormalization`) or not. Gamma, beta and every other weight
stay bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit.data.batches import Batches
from tlkit.errors import ConfigError, DataError
from tlkit.layers import CLONABLE_MODELS


@dataclass
class AdaBNResult:
    """``layers``: BatchNorm layers whose statistics were replaced; ``examples``: rows read."""

    layers: int
    examples: int


class _MomentBatchNorm(keras.layers.BatchNormalization):
    """Normalises with the batch's own moments and adds their per-channel sums to accumulators."""

    def build(self, input_shape: Any) -> None:
        super().build(input_shape)
        channels = int(input_shape[self.axis])
        self.sum = self.add_weight(name="sum", shape=(channels,), initializer="zeros", dtype="float64", trainable=False)
        self.sum_squares = self.add_weight(name="sum_squares", shape=(channels,), initializer="zeros", dtype="float64",
                                           trainable=False)
        self.count = self.add_weight(name="count", shape=(), initializer="zeros", dtype="float64", trainable=False)

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        x = tf.cast(inputs, tf.float32)
        axis = self.axis % len(x.shape)
        reduce = [i for i in range(len(x.shape)) if i != axis]
        mean, variance = tf.nn.moments(x, reduce)
        rows = tf.cast(tf.reduce_prod(tf.gather(tf.shape(x), reduce)), tf.float64)
        self.sum.assign_add(tf.cast(mean, tf.float64) * rows)
        self.sum_squares.assign_add(tf.cast(variance + tf.square(mean), tf.float64) * rows)
        self.count.assign_add(rows)
        shape = [1] * len(x.shape)
        shape[axis] = -1
        y = (x - tf.reshape(mean, shape)) * tf.math.rsqrt(tf.reshape(variance, shape) + self.epsilon)
        if self.scale:
            y = y * tf.reshape(tf.cast(self.gamma, tf.float32), shape)
        if self.center:
            y = y + tf.reshape(tf.cast(self.beta, tf.float32), shape)
        return tf.cast(y, inputs.dtype)


def _has_batchnorm(layer: keras.layers.Layer) -> bool:
    if isinstance(layer, keras.layers.BatchNormalization):
        return True
    return any(_has_batchnorm(child) for child in getattr(layer, "layers", ()) if child is not layer)


def _moment_clone(model: keras.Model, pairs: list[tuple[keras.layers.BatchNormalization, _MomentBatchNorm]]
                  ) -> keras.Model:
    """A clone of ``model`` whose BatchNorm layers are :class:`_MomentBatchNorm` (other layers shared)."""

    def swap(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, keras.layers.BatchNormalization):
            config = layer.get_config()
            clone = _MomentBatchNorm.from_config(config)
            pairs.append((layer, clone))
            return clone
        if isinstance(layer, CLONABLE_MODELS) and _has_batchnorm(layer):
            return _moment_clone(layer, pairs)
        return layer

    return keras.models.clone_model(model, clone_function=swap)


def _inputs(data: Any, batch_size: int) -> tf.data.Dataset:
    """Batches of raw inputs only, from Batches, a batched tf.data.Dataset or an array."""
    if isinstance(data, Batches):
        data = data.in_order()
    if isinstance(data, tf.data.Dataset):
        if isinstance(data.element_spec, tuple):
            return data.map(lambda x, *rest: x)
        return data
    array = np.asarray(data, np.float32)
    if not len(array):
        raise DataError("AdaBN needs at least one target example")
    return tf.data.Dataset.from_tensor_slices(array).batch(batch_size)


def adapt_batchnorm(model: keras.Model, data: Any, *, batch_size: int = 32) -> AdaBNResult:
    """Replaces the moving statistics of every BatchNorm layer of ``model`` by those of ``data``.

    Args:
        model: a functional Keras model (a tlkit classifier, nested backbone included).
        data: raw model inputs: :class:`~tlkit.data.Batches`, a finite batched ``tf.data.Dataset``
            of inputs or ``(inputs, targets)``, or an array ``(N, ...)``.

    Returns:
        :class:`AdaBNResult` (``layers == 0``: the model has no BatchNorm layer, nothing changed).

    Raises:
        ConfigError: the model is not functional / Sequential, or a layer holding BatchNorm
            layers is not (e.g. a SavedModel backbone), so its statistics cannot be reached.
    """
    if not _has_batchnorm(model):
        return AdaBNResult(0, 0)
    for layer in model.layers:
        if _has_batchnorm(layer) and not isinstance(layer, (*CLONABLE_MODELS, keras.layers.BatchNormalization)):
            raise ConfigError(f"adabn cannot reach the BatchNorm layers inside {layer.name!r} "
                              f"({type(layer).__name__}); use a Keras backbone, or method 'coral'/'dann'/'reweight'")
    if not isinstance(model, CLONABLE_MODELS):
        raise ConfigError(f"adabn needs a functional Keras model, got {type(model).__name__}")
    pairs: list[tuple[keras.layers.BatchNormalization, _MomentBatchNorm]] = []
    clone = _moment_clone(model, pairs)
    for original, moment in pairs:  # the clone normalises with the original's scale and offset
        if original.scale:
            moment.gamma.assign(original.gamma)
        if original.center:
            moment.beta.assign(original.beta)
    rows = 0
    step = tf.function(lambda x: clone(x, training=False))
    for batch in _inputs(data, batch_size):
        step(batch)
        rows += int(tf.shape(batch)[0])
    if rows == 0:
        raise DataError("AdaBN got no target batches")
    for original, moment in pairs:
        count = float(moment.count.numpy())
        mean = moment.sum.numpy() / count
        variance = np.maximum(moment.sum_squares.numpy() / count - mean ** 2, 0.0)
        original.moving_mean.assign(mean.astype(original.moving_mean.dtype))
        original.moving_variance.assign(variance.astype(original.moving_variance.dtype))
    return AdaBNResult(len(pairs), rows)
