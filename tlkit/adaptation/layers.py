"""The layers of an adaptation *training* model: gradient reversal, the CORAL loss, domain stacking.

None of them is ever part of an exported classifier: :mod:`tlkit.adaptation.training` puts
them into a second functional model that shares every layer of the classifier and is used
only by ``fit``.

- :class:`GradientReversal` (Ganin et al., JMLR 2016): the identity forward, ``-lambda *
  grad`` backward; ``lambda`` is a non-trainable variable that :class:`ReversalRamp` raises
  as ``2 / (1 + exp(-10 p)) - 1`` over a stage's training progress ``p``.
- :func:`coral_loss` (Sun & Saenko, ECCV 2016 workshops, "Deep CORAL"):
  ``||C_s - C_t||_F^2 / (4 d^2)`` between the feature covariances of two batches.
- :class:`StackDomains` puts a source and a target batch into one batch (so BatchNorm layers
  that train see both domains, as in DANN); :class:`DomainAlignment` adds the alignment loss
  on the stacked pooled features (only while training) and passes the source rows on to the
  classifier head.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf
from keras import ops


@tf.custom_gradient
def _reverse(x: tf.Tensor, scale: tf.Tensor) -> tuple[tf.Tensor, Any]:
    def grad(upstream: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return -tf.cast(scale, upstream.dtype) * upstream, tf.zeros_like(scale)

    return tf.identity(x), grad


@keras.saving.register_keras_serializable(package="tlkit")
class GradientReversal(keras.layers.Layer):
    """Identity forward; the backward pass multiplies the incoming gradient by ``-lambda``.

    Input and output: any tensor (e.g. pooled features (B, C)). ``lambda`` is the
    non-trainable variable :attr:`scale` (``initial``: its starting value), so a callback can
    ramp it during ``fit`` without retracing the training function.
    """

    def __init__(self, initial: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.initial = float(initial)
        self.scale = self.add_weight(name="scale", shape=(), initializer=keras.initializers.Constant(self.initial),
                                     trainable=False)

    def call(self, inputs: Any) -> Any:
        return _reverse(inputs, ops.convert_to_tensor(self.scale))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "initial": self.initial}


def ganin_lambda(progress: float) -> float:
    """``2 / (1 + exp(-10 p)) - 1``: 0 at the start of training, near 1 by its end (``p`` in 0..1)."""
    return 2.0 / (1.0 + math.exp(-10.0 * min(max(progress, 0.0), 1.0))) - 1.0


class ReversalRamp(keras.callbacks.Callback):
    """Sets a :class:`GradientReversal` layer's ``lambda`` before every batch from the stage's
    progress ``p = (epoch + batch / steps) / epochs`` (resumed stages continue where they were);
    logs it as ``dann_lambda``. The loss weight is applied to the domain loss itself, so the
    reversed gradient is ``-lambda * weight * dL/dfeatures``."""

    def __init__(self, layer: GradientReversal, epochs: int, steps: int) -> None:
        super().__init__()
        self.layer = layer
        self.epochs = max(1, int(epochs))
        self.steps = max(1, int(steps))
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        progress = (self._epoch + batch / self.steps) / self.epochs
        self.layer.scale.assign(ganin_lambda(progress))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if logs is not None:
            logs["dann_lambda"] = float(keras.ops.convert_to_numpy(self.layer.scale))


def _covariance(x: Any) -> Any:
    count = ops.cast(ops.shape(x)[0], x.dtype)
    centred = x - ops.mean(x, axis=0, keepdims=True)
    return ops.matmul(ops.transpose(centred), centred) / ops.maximum(count - 1.0, 1.0)


def coral_loss(source: Any, target: Any) -> Any:
    """Deep CORAL: ``||C_s - C_t||_F^2 / (4 d^2)`` for features ``source`` (n_s, d) and ``target``
    (n_t, d) (float32 scalar; 0 when the two covariance matrices are equal)."""
    source = ops.cast(source, "float32")
    target = ops.cast(target, "float32")
    d = ops.cast(ops.shape(source)[-1], "float32")
    difference = _covariance(source) - _covariance(target)
    return ops.sum(ops.square(difference)) / (4.0 * d * d)


class StackDomains(keras.layers.Layer):
    """``[source (n_s, ...), target (n_t, ...)] -> (n_s + n_t, ...)``: one batch of both domains."""

    def call(self, inputs: list[Any]) -> Any:
        return ops.concatenate([inputs[0], ops.cast(inputs[1], inputs[0].dtype)], axis=0)

    def compute_output_shape(self, input_shapes: list[Any]) -> Any:
        return (None, *input_shapes[0][1:])


class DomainAlignment(keras.layers.Layer):
    """Adds the alignment loss on stacked pooled features and returns the source rows.

    Inputs: ``[features (n_s + n_t, C), source_input (n_s, ...)]`` (the second only gives
    ``n_s``). Output: ``features[:n_s]``, for the classifier head. While training it adds
    ``weight * loss`` with ``add_loss``; it tracks the loss (and, for DANN, the domain
    classifier's accuracy) as metrics ``domain_loss`` / ``domain_accuracy`` or ``coral_loss``.

    Args:
        method: ``"dann"`` (a domain classifier, ``hidden`` ReLU units then one logit, behind a
            :class:`GradientReversal` layer, binary cross-entropy) or ``"coral"``.
        weight: the loss weight.
    """

    def __init__(self, method: str, weight: float = 1.0, hidden: int = 256, seed: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if method not in ("dann", "coral"):
            raise ValueError(f"DomainAlignment method must be 'dann' or 'coral', got {method!r}")
        self.method = method
        self.weight = float(weight)
        self.reversal: GradientReversal | None = None
        if method == "dann":
            init = keras.initializers.GlorotUniform(seed=seed)
            self.reversal = GradientReversal(0.0, name="gradient_reversal")
            self.domain_hidden = keras.layers.Dense(hidden, activation="relu", kernel_initializer=init,
                                                    name="domain_hidden", dtype="float32")
            self.domain_logit = keras.layers.Dense(1, kernel_initializer=init, name="domain_logit", dtype="float32")
            self.accuracy_tracker = keras.metrics.Mean(name="domain_accuracy")
        self.loss_tracker = keras.metrics.Mean(name="domain_loss" if method == "dann" else "coral_loss")

    def build(self, input_shapes: list[Any]) -> None:
        if self.reversal is not None:
            channels = int(input_shapes[0][-1])
            self.reversal.build((None, channels))
            self.domain_hidden.build((None, channels))
            self.domain_logit.build((None, int(self.domain_hidden.units)))

    def call(self, inputs: list[Any], training: bool = False) -> Any:
        features, source_input = inputs
        count = ops.shape(source_input)[0]
        pooled = ops.cast(features, "float32")
        if self.method == "coral":
            loss = coral_loss(pooled[:count], pooled[count:])
        else:
            assert self.reversal is not None
            logits = ops.squeeze(self.domain_logit(self.domain_hidden(self.reversal(pooled))), axis=-1)
            is_target = ops.cast(ops.arange(ops.shape(pooled)[0]) >= count, "float32")
            loss = ops.mean(ops.binary_crossentropy(is_target, logits, from_logits=True))
            self.accuracy_tracker.update_state(ops.mean(ops.cast((logits > 0) == (is_target > 0.5), "float32")))
        self.loss_tracker.update_state(loss)
        if training:
            self.add_loss(self.weight * loss)
        return features[:count]

    def compute_output_shape(self, input_shapes: list[Any]) -> Any:
        return input_shapes[0]
