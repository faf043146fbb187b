"""Small Keras layers tlkit puts inside models so exported models need no side code.

All are registered as serializable under the ``tlkit`` package, so ``.keras`` files that
contain them load with ``safe_mode=True`` once ``tlkit`` is imported. For a file that loads
with plain Keras (no ``import tlkit``), :func:`tlkit.portable.portable_model` replaces each
of them by built-in Keras layers.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops
from keras.src.models.functional import Functional  # the class of every functional keras.Model

from tlkit.backbones.spec import ImagePreprocessing

#: The Keras model classes whose layer graph ``keras.models.clone_model`` can rebuild (a
#: subclassed model's graph is not known to Keras).
CLONABLE_MODELS = (keras.Sequential, Functional)


@keras.saving.register_keras_serializable(package="tlkit")
class ImageNormalization(keras.layers.Layer):
    """A backbone's own pixel preprocessing: ``(flip(x) * scale + offset - mean) / std``.

    Input: (B, H, W, 3) RGB pixel values 0..255 (any float or int dtype).
    Output: (B, H, W, 3) in the compute dtype.
    """

    def __init__(
        self,
        scale: float = 1.0,
        offset: float = 0.0,
        mean: tuple[float, ...] = (0.0, 0.0, 0.0),
        std: tuple[float, ...] = (1.0, 1.0, 1.0),
        channel_order: str = "rgb",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)
        self.offset = float(offset)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.channel_order = channel_order

    @classmethod
    def from_spec(cls, spec: ImagePreprocessing, **kwargs: Any) -> "ImageNormalization":
        return cls(spec.scale, spec.offset, spec.mean, spec.std, spec.channel_order, **kwargs)

    def call(self, inputs: Any) -> Any:
        x = ops.cast(inputs, self.compute_dtype)
        if self.channel_order == "bgr":
            x = ops.flip(x, axis=-1)
        x = x * self.scale + self.offset
        mean = ops.convert_to_tensor(self.mean, dtype=self.compute_dtype)
        std = ops.convert_to_tensor(self.std, dtype=self.compute_dtype)
        return (x - mean) / std

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "scale": self.scale,
            "offset": self.offset,
            "mean": list(self.mean),
            "std": list(self.std),
            "channel_order": self.channel_order,
        }


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
class StochasticDepth(keras.layers.Dropout):
    """Dropout (e.g. a backbone's drop-connect) that is inactive while the layer is frozen.

    Keras 3 passes the outer model's ``training=True`` into a nested, frozen backbone, and
    plain ``Dropout`` ignores ``trainable``; this layer drops only when it is both training
    and trainable, so a frozen backbone gives deterministic features (and the feature cache
    gives the same head as the normal path).
    """

    def call(self, inputs: Any, training: bool = False) -> Any:
        return super().call(inputs, training=bool(training) and self.trainable)


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
