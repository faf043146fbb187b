"""Layers the backbone definitions themselves use, defined inside the backbones package.

``tlkit.layers`` re-exports them. They live here because the built-in backbones (EfficientNet-Lite
uses :class:`StochasticDepth`, keras-hub presets :class:`ImageNormalization`) are registered when
``tlkit.backbones`` is imported: defining them in ``tlkit.layers``, which itself imports the
backbone spec, made ``import tlkit.layers`` (or ``tlkit.finetune``) as a program's first tlkit
import fail with a circular import. Their Keras registered names (``tlkit>...``) are unchanged, so
saved models load as before.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from tlkit.backbones.spec import ImagePreprocessing


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
class MultiHeadAttention(keras.layers.MultiHeadAttention):
    """Keras's ``MultiHeadAttention`` whose projections stay frozen when the layer is.

    Same inputs, outputs, config and weights as ``keras.layers.MultiHeadAttention``. The one
    difference is in :meth:`build`: Keras creates the query / key / value / output
    ``EinsumDense`` sublayers there, trainable, and a layer deserialised with
    ``trainable=False`` (a frozen block of a saved, partly fine-tuned model) is built after its
    flag is set, so plain ``keras.saving.load_model`` gave back a frozen attention layer whose
    projection weights were trainable: a ``fit`` after loading trained them. Here a frozen
    layer passes its flag on to the sublayers it has just built.

    The class keeps Keras's name on purpose: a ``.keras`` / ``.weights.h5`` file stores a
    layer's weights under its snake-cased class name (``multi_head_attention_3/...``), so
    weight files written with the built-in class load into models built with this one and
    back. Registered as ``tlkit>MultiHeadAttention``.
    """

    def build(self, query_shape: Any, value_shape: Any, key_shape: Any = None) -> None:
        super().build(query_shape, value_shape, key_shape)
        if not self.trainable:
            # The setter reaches every sublayer and variable built above. Called directly: on the
            # TensorFlow backend, `self.trainable = False` on a layer whose flag is already False
            # is skipped by Keras's attribute tracking (it returns early when the new value `is`
            # the old one), so the setter would never run.
            keras.layers.Layer.trainable.fset(self, False)
