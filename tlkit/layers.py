"""Small Keras layers tlkit puts inside models so exported models need no side code.

All are registered as serializable under the ``tlkit`` package, so ``.keras`` files that
contain them load with ``safe_mode=True`` once ``tlkit`` is imported. For a file that loads
with plain Keras (no ``import tlkit``), :func:`tlkit.portable.portable_model` replaces each
of them by built-in Keras layers.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops
from keras.src.models.functional import Functional  # the class of every functional keras.Model

from tlkit.backbones.layers import ImageNormalization, StochasticDepth  # re-exported: defined beside the backbones
from tlkit.errors import ConfigError

__all__ = [
    "FrozenBatchNormalization",
    "ImageNormalization",
    "RandomAffine",
    "StochasticDepth",
    "TrainingOnly",
    "WaveformStandardization",
    "affine_resample",
    "with_frozen_batchnorm",
]

#: The Keras model classes whose layer graph ``keras.models.clone_model`` can rebuild (a
#: subclassed model's graph is not known to Keras).
CLONABLE_MODELS = (keras.Sequential, Functional)


@keras.saving.register_keras_serializable(package="tlkit")
class TrainingOnly(keras.Sequential):
    """A ``Sequential`` of random augmentation layers that is the identity unless ``training=True``.

    Keras's random layers default to ``training=True`` when a model is called directly
    (``model(x)``); wrapped here, a direct call, ``predict`` and every export see the
    un-augmented input, and only ``fit`` (which passes ``training=True``) augments.
    """

    def call(self, inputs: Any, training: bool = False, mask: Any = None) -> Any:
        if not training:
            return inputs
        return super().call(inputs, training=True, mask=mask)


@keras.saving.register_keras_serializable(package="tlkit")
class RandomAffine(keras.layers.Layer):
    """Per-example random zoom, shift and rotation in one bilinear resampling, XLA-compatible.

    Input: (B, H, W, C) images (any value range). Output: (B, H, W, C) in the compute dtype,
    each output pixel a convex combination of four input pixels (so the value range is kept).
    Outside training (``training=False``, the default) the input is returned unchanged.

    Per example it draws a zoom factor ``z ~ U(1 - zoom, 1 + zoom)`` (``z > 1`` zooms out, as
    in ``keras.layers.RandomZoom``; one factor for both axes, like ``RandomZoom(zoom)``), a
    shift of up to ``translation`` of the height / width and an angle of up to ``rotation``
    of a full turn, and samples output pixel ``p`` at input point ``c + z * R(a) (p - c) - t``
    (``c`` the image centre). Points outside the image are reflected about the edge
    (``fill_mode="reflect"`` in Keras: ``d c b a | a b c d | d c b a``). Keras's
    ``RandomZoom`` / ``RandomRotation`` / ``RandomTranslation`` do the same sampling with
    ``ImageProjectiveTransformV3``, which XLA cannot compile (``supports_jit=False``, so
    ``jit_compile="auto"`` turns XLA off for the whole model); this layer uses gathers only.
    Composing the three transforms into one resampling also interpolates once, not three times.
    """

    def __init__(
        self,
        zoom: float = 0.0,
        translation: float = 0.0,
        rotation: float = 0.0,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("zoom", zoom), ("translation", translation), ("rotation", rotation)):
            if not 0.0 <= float(value) < 1.0:
                raise ConfigError(f"augmentation {name} must be a fraction in [0, 1), got {value!r}")
        self.zoom = float(zoom)
        self.translation = float(translation)
        self.rotation = float(rotation)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_jit = True

    def call(self, inputs: Any, training: bool = False) -> Any:
        x = ops.cast(inputs, self.compute_dtype)
        if not training:
            return x
        shape = ops.shape(x)

        def uniform(bound: float) -> Any:
            return keras.random.uniform((shape[0], 1), -bound, bound, seed=self.seed_generator)

        # Unused draws (a bound of 0) cost a (B, 1) random vector each; kept so that one seed
        # gives the same zooms whatever translation / rotation say.
        return affine_resample(x, zoom=1.0 + uniform(self.zoom), angle=uniform(self.rotation * 2.0 * math.pi),
                               shift_y=uniform(self.translation), shift_x=uniform(self.translation))

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "zoom": self.zoom, "translation": self.translation,
                "rotation": self.rotation, "seed": self.seed}


def affine_resample(images: Any, zoom: Any, angle: Any, shift_y: Any, shift_x: Any) -> Any:
    """Bilinear resampling of ``images`` under a per-example centred zoom, rotation and shift.

    Input: ``images`` (B, H, W, C); ``zoom`` (scale, > 1 zooms out), ``angle`` (radians) and
    ``shift_y`` / ``shift_x`` (fractions of the height / width), each (B, 1) float32.
    Output: (B, H, W, C) in ``images``' dtype; output pixel ``p`` is the input sampled at
    ``c + zoom * R(angle) (p - c) - shift * (H, W)`` (``c`` the centre), reflected about the
    edges. Only gathers and elementwise ops, so XLA compiles it.
    """
    shape = ops.shape(images)
    height, width, channels = shape[1], shape[2], shape[3]
    h, w = ops.cast(height, "float32"), ops.cast(width, "float32")
    ys, xs = ops.meshgrid(ops.arange(height, dtype="float32"), ops.arange(width, dtype="float32"), indexing="ij")
    cy, cx = (h - 1.0) / 2.0, (w - 1.0) / 2.0
    py, px = ops.reshape(ys, (1, -1)) - cy, ops.reshape(xs, (1, -1)) - cx  # (1, H*W), centred
    cos, sin = ops.cos(angle) * zoom, ops.sin(angle) * zoom
    src_y = _reflect(cy + sin * px + cos * py - shift_y * h, h)  # (B, H*W)
    src_x = _reflect(cx + cos * px - sin * py - shift_x * w, w)
    y0, x0 = ops.floor(src_y), ops.floor(src_x)
    y0i, x0i = ops.cast(y0, "int32"), ops.cast(x0, "int32")
    y1i, x1i = ops.minimum(y0i + 1, height - 1), ops.minimum(x0i + 1, width - 1)
    wy = ops.cast(ops.expand_dims(src_y - y0, -1), images.dtype)
    wx = ops.cast(ops.expand_dims(src_x - x0, -1), images.dtype)
    # One gather of the four neighbours from the (B*H*W, C) pixel table: much cheaper than four
    # batched take_along_axis calls, which broadcast int64 indices over the channels.
    base = ops.expand_dims(ops.arange(shape[0], dtype="int32") * (height * width), -1)  # (B, 1)
    rows = ops.stack([y0i * width, y1i * width])  # (2, B, H*W)
    cols = ops.stack([x0i, x1i])
    index = base + ops.expand_dims(rows, 1) + ops.expand_dims(cols, 0)  # (2 y, 2 x, B, H*W)
    corners = ops.take(ops.reshape(images, (-1, channels)), ops.reshape(index, (-1,)), axis=0)
    corners = ops.reshape(corners, (2, 2, shape[0], -1, channels))
    top = corners[0, 0] * (1 - wx) + corners[0, 1] * wx
    bottom = corners[1, 0] * (1 - wx) + corners[1, 1] * wx
    return ops.reshape(top * (1 - wy) + bottom * wy, shape)


def _reflect(coord: Any, size: Any) -> Any:
    """Continuous coordinates reflected about the edges ``-0.5`` and ``size - 0.5``, then
    clipped to ``[0, size - 1]`` (Keras's / scipy's ``"reflect"`` fill: edge pixels repeat)."""
    period = 2.0 * size
    t = coord + 0.5
    t = t - ops.floor(t / period) * period  # in [0, 2*size)
    t = ops.where(t >= size, period - t, t) - 0.5
    return ops.clip(t, 0.0, size - 1.0)


@keras.saving.register_keras_serializable(package="tlkit")
class WaveformStandardization(keras.layers.Layer):
    """Per-clip zero mean, unit variance: (B, samples) -> (B, samples) (Wav2Vec2's feature extractor)."""

    def __init__(self, epsilon: float = 1e-7, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilon = float(epsilon)

    def call(self, inputs: Any) -> Any:
        x = ops.cast(inputs, self.compute_dtype)
        mean = ops.mean(x, axis=-1, keepdims=True)
        variance = ops.var(x, axis=-1, keepdims=True)
        return (x - mean) / ops.sqrt(variance + self.epsilon)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="tlkit")
class FrozenBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization that always normalises with its moving statistics (inference mode).

    Plain Keras BatchNormalization uses batch statistics, and updates its moving mean and
    variance, whenever it is called with ``training=True`` while trainable. In Keras 3 the
    outer model's ``training=True`` (what ``fit`` passes) reaches every layer of a nested
    backbone, so a user who thaws a backbone by hand (``backbone.trainable = True``, the
    step of Keras's transfer-learning guide) would retrain every BatchNorm layer on small
    batches of a small dataset. This layer never does: its moving statistics never change,
    and in training it computes exactly what it computes at inference.

    Its ``gamma`` and ``beta`` follow ``trainable`` like any weight: a hand-thawed backbone
    trains them (as in Keras's guide, where BatchNorm runs in inference mode but its scale
    and offset still learn); :func:`tlkit.fine_tune` freezes them too
    (``HeadConfig.bn_inference``). Weights and config are those of BatchNormalization, so
    :func:`tlkit.portable.portable_model` turns it back into one with identical outputs.
    """

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        return super().call(inputs, training=False, mask=mask)


def _is_plain_batchnorm(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.layers.BatchNormalization) and not isinstance(layer, FrozenBatchNormalization)


def _has_plain_batchnorm(layer: keras.layers.Layer) -> bool:
    if _is_plain_batchnorm(layer):
        return True
    return any(_has_plain_batchnorm(child) for child in getattr(layer, "layers", ()) if child is not layer)


def with_frozen_batchnorm(model: keras.layers.Layer) -> keras.layers.Layer:
    """``model`` with every BatchNormalization layer replaced by :class:`FrozenBatchNormalization`.

    Input: a backbone (a functional or ``Sequential`` model, nested models included).
    Output: a model with the same graph, layer names, weights and inference outputs
    (bit-identical: the same BatchNorm arithmetic runs), whose BatchNorm layers stay in
    inference mode whatever ``trainable`` and ``training`` say. The other layers are the
    original layer objects (shared, not copied). A model without BatchNorm, a subclassed
    model (Keras cannot rebuild its graph) and a non-model layer (a SavedModel) are
    returned unchanged.
    """
    if not isinstance(model, CLONABLE_MODELS) or not _has_plain_batchnorm(model):
        return model
    swapped: list[tuple[keras.layers.Layer, keras.layers.Layer]] = []

    def swap(layer: keras.layers.Layer) -> keras.layers.Layer:
        if _is_plain_batchnorm(layer):
            frozen = FrozenBatchNormalization.from_config(layer.get_config())
            swapped.append((layer, frozen))
            return frozen
        if isinstance(layer, CLONABLE_MODELS) and _has_plain_batchnorm(layer):
            return with_frozen_batchnorm(layer)
        return layer

    clone = keras.models.clone_model(model, clone_function=swap)
    for original, frozen in swapped:
        frozen.set_weights(original.get_weights())
    clone.trainable = model.trainable
    return clone
