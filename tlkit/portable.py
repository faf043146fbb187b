"""Portable models: a tlkit model rebuilt from built-in Keras layers only.

A ``.keras`` file of a tlkit model names tlkit's own layers (``tlkit>ImageNormalization``...),
so it loads only in a process that has imported tlkit. :func:`portable_model` returns the
same functional graph, nested backbone models included, with every tlkit layer replaced by
built-in Keras layers that compute the same outputs at inference; its ``.keras`` file loads
with plain ``keras.saving.load_model(path, safe_mode=True)``.

===============================  =====================================================
tlkit layer                      built-in replacement
===============================  =====================================================
ImageNormalization               ``Normalization`` with fixed mean ``(mean - offset) / scale``
                                 and variance ``(std / scale) ** 2``; for BGR backbones a
                                 fixed 1x1 ``Conv2D`` that swaps R and B comes first
TrainingOnly, AudioAugment,      ``Identity`` (augmentation is the identity at inference)
RandomAffine
StochasticDepth                  ``Identity`` (drop-connect is the identity at inference)
FrozenBatchNormalization         ``BatchNormalization``, same weights (it would train its
                                 statistics again if the portable model were fine-tuned)
AttentionPooling                 a small functional model: ``Reshape`` (spatial input) ->
                                 ``Dense(1)`` scores -> ``Softmax`` over positions ->
                                 ``Dot`` (weighted sum) -> ``Reshape``
WaveformStandardization          ``LayerNormalization(center=False, scale=False)``
===============================  =====================================================

Not portable (:class:`~tlkit.errors.ExportError` naming the layer): ``LogMelSpectrogram``
(Keras's ``MelSpectrogram`` uses the HTK mel scale and its own dB scaling; no built-in layer
computes Slaney filters with Whisper's per-example log floor), ``SlicedPositionEmbedding``
(adding a position table sliced to the input's length needs an op no built-in layer has) and
``SavedModelBackbone`` (a SavedModel's graph is code, which safe mode refuses). So image
classifiers are portable; Whisper and log-mel audio models are not (deploy their SavedModel
or TFLite export instead).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from tlkit.audio_augment import AudioAugment
from tlkit.errors import ExportError
from tlkit.layers import (
    CLONABLE_MODELS,
    FrozenBatchNormalization,
    ImageNormalization,
    RandomAffine,
    StochasticDepth,
    TrainingOnly,
    WaveformStandardization,
)
from tlkit.model import AttentionPooling

__all__ = ["NOT_PORTABLE", "portable_model"]

#: tlkit layers without a built-in equivalent, and why.
NOT_PORTABLE: dict[str, str] = {
    "LogMelSpectrogram": (
        "Keras's MelSpectrogram uses the HTK mel scale and its own dB scaling, and no built-in layer "
        "computes Slaney mel filters with Whisper's per-example log floor"
    ),
    "SlicedPositionEmbedding": (
        "adding a position table sliced to the input's length needs an op no built-in Keras layer has"
    ),
    "SavedModelBackbone": "a SavedModel's graph is code, which Keras's safe mode refuses to load",
}

#: ``copy(original, replacement)``: sets the replacement's weights once it is built.
WeightCopy = Callable[[keras.layers.Layer, keras.layers.Layer], None]


def portable_model(model: keras.Model) -> keras.Model:
    """The same model built from built-in Keras layers only (see the module docstring).

    Args:
        model: a functional or ``Sequential`` Keras model, e.g. from
            :func:`tlkit.build_classifier` or :func:`tlkit.imagenet_classifier`.

    Returns:
        A new ``keras.Model`` with the same inputs, outputs, layer names (nested models
        included) and weights (copied, not shared), whose inference outputs equal the
        original's within float rounding (measured well under 1e-5). Training-only layers
        become ``Identity``, so it is a model to deploy, not to fine-tune.

    Raises:
        ExportError: ``model`` is a subclassed model, or holds a layer that has no built-in
            equivalent (:data:`NOT_PORTABLE`, or a custom layer from outside Keras); the
            message names the layer and its class.
    """
    if not isinstance(model, CLONABLE_MODELS):
        raise ExportError(
            f"model {model.name!r} is a subclassed {type(model).__name__}; only functional and Sequential "
            "models can be rebuilt from built-in layers"
        )
    clone = _rebuild(model)
    foreign = [f"{layer.name!r} ({type(layer).__name__})" for layer in _all_layers(clone) if not _is_builtin(layer)]
    if foreign:  # pragma: no cover - every path above returns built-in layers
        raise ExportError(f"portable model still holds non-Keras layers: {', '.join(foreign)}")
    return clone


def _rebuild(model: keras.Model) -> keras.Model:
    pending: list[tuple[keras.layers.Layer, keras.layers.Layer, WeightCopy]] = []

    def replace(layer: keras.layers.Layer) -> keras.layers.Layer:
        new, copy = _replacement(layer)
        if copy is not None:
            pending.append((layer, new, copy))
        return new

    call = None if isinstance(model, keras.Sequential) else _call  # Sequential takes no call_function
    clone = keras.models.clone_model(model, clone_function=replace, call_function=call)
    for original, new, copy in pending:  # the replacements are built now (the graph called them)
        copy(original, new)
    clone.trainable = model.trainable
    return clone


def _call(layer: keras.layers.Layer, *args: Any, **kwargs: Any) -> Any:
    """Calls a replacement with the recorded arguments its ``call`` accepts (an ``Identity``
    standing in for a ``Sequential`` takes no ``mask``)."""
    parameters = inspect.signature(layer.call).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        kwargs = {key: value for key, value in kwargs.items() if key in parameters}
    return layer(*args, **kwargs)


def _same_weights(original: keras.layers.Layer, new: keras.layers.Layer) -> None:
    new.set_weights(original.get_weights())


def _replacement(layer: keras.layers.Layer) -> tuple[keras.layers.Layer, WeightCopy | None]:
    """The built-in layer standing in for ``layer``, and how to copy its weights (``None``: none)."""
    name = type(layer).__name__
    if isinstance(layer, (TrainingOnly, AudioAugment, RandomAffine, StochasticDepth)):
        return keras.layers.Identity(name=layer.name), None
    if isinstance(layer, FrozenBatchNormalization):
        return keras.layers.BatchNormalization.from_config(layer.get_config()), _same_weights
    if isinstance(layer, ImageNormalization):
        return _normalization(layer)
    if isinstance(layer, WaveformStandardization):
        standardize = keras.layers.LayerNormalization(
            axis=-1, epsilon=layer.epsilon, center=False, scale=False, name=layer.name, dtype=layer.dtype_policy)
        return standardize, None
    if isinstance(layer, AttentionPooling):
        return _attention_pooling(layer), None
    if name in NOT_PORTABLE:
        raise ExportError(
            f"layer {layer.name!r} ({name}) has no built-in Keras equivalent: {NOT_PORTABLE[name]}; "
            "deploy the SavedModel or TFLite export of this model, or load its .keras file after `import tlkit`"
        )
    if not _is_builtin(layer):
        raise ExportError(
            f"layer {layer.name!r} is a {type(layer).__module__}.{name}, not a built-in Keras layer; "
            "plain Keras cannot load it, so the model cannot be made portable"
        )
    if isinstance(layer, CLONABLE_MODELS):
        return _rebuild(layer), None  # a nested backbone: the same treatment, weights copied inside
    return type(layer).from_config(layer.get_config()), _same_weights


def _normalization(layer: ImageNormalization) -> tuple[keras.layers.Layer, WeightCopy | None]:
    """``(flip(x) * scale + offset - mean) / std`` as ``(flip(x) - m) / sqrt(v)`` with
    ``m = (mean - offset) / scale`` and ``v = (std / scale) ** 2`` (``scale > 0``)."""
    if layer.scale <= 0:
        raise ExportError(f"layer {layer.name!r} (ImageNormalization) has scale {layer.scale}; expected > 0")
    mean = [(m - layer.offset) / layer.scale for m in layer.mean]
    variance = [(s / layer.scale) ** 2 for s in layer.std]
    if layer.channel_order != "bgr":
        return keras.layers.Normalization(axis=-1, mean=mean, variance=variance, name=layer.name,
                                          dtype=layer.dtype_policy), None
    swap = keras.layers.Conv2D(3, 1, use_bias=False, trainable=False, name="rgb_to_bgr", dtype=layer.dtype_policy)
    normalize = keras.layers.Normalization(axis=-1, mean=mean, variance=variance, name="normalize",
                                           dtype=layer.dtype_policy)

    def set_swap(original: keras.layers.Layer, new: keras.layers.Layer) -> None:
        kernel = np.zeros((1, 1, 3, 3), np.float32)
        for channel in range(3):
            kernel[0, 0, 2 - channel, channel] = 1.0  # output channel c takes input channel 2 - c
        new.get_layer("rgb_to_bgr").set_weights([kernel])

    return keras.Sequential([swap, normalize], name=layer.name), set_swap


def _attention_pooling(layer: AttentionPooling) -> keras.Model:
    """``sum_t softmax_t(x_t . w + b) * x_t`` from Dense, Softmax and Dot layers, weights copied."""
    shape = tuple(layer.input.shape)
    channels = int(shape[-1])
    policy = layer.dtype_policy
    inputs = keras.Input(shape=shape[1:], dtype=layer.input.dtype, name=f"{layer.name}_input")
    steps = inputs if len(shape) == 3 else keras.layers.Reshape((-1, channels), name="positions")(inputs)
    scores = keras.layers.Dense(1, name="score", dtype=policy)(steps)
    weights = keras.layers.Softmax(axis=1, name="weights", dtype="float32")(scores)
    pooled = keras.layers.Dot(axes=1, name="weighted_sum", dtype=policy)([weights, steps])  # (B, 1, C)
    outputs = keras.layers.Reshape((channels,), name="pooled")(pooled)
    pool = keras.Model(inputs, outputs, name=layer.name)
    pool.get_layer("score").set_weights([np.asarray(layer.score), np.asarray(layer.score_bias)])
    return pool


def _is_builtin(layer: keras.layers.Layer) -> bool:
    return type(layer).__module__.split(".")[0] == "keras"


def _all_layers(layer: Any) -> list[keras.layers.Layer]:
    out: list[keras.layers.Layer] = []
    for child in getattr(layer, "layers", ()):
        out.append(child)
        out.extend(_all_layers(child))
    return out
