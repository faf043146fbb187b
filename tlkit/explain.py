"""Why did the model say that? Grad-CAM for image classifiers, gradient saliency for audio.

Grad-CAM (Selvaraju et al., 2017) weights each channel ``k`` of a spatial activation
``A`` (B, h, w, K) by the mean gradient of the class score (the *logit*, before the
softmax, so a saturated probability does not flatten the map) with respect to it:
``cam = relu(sum_k mean_ij(d score / d A_ijk) * A_k)``, upsampled to the input image and
divided by its 99th percentile (then clipped to [0, 1]), so a map is on a fixed 0..1 scale
where 1 is "as strong as the strongest evidence in this image" and a few hot pixels do not
wash the rest out. :func:`overlay` leaves everything below ``threshold`` (0.2) uncoloured,
so the picture also shows where the evidence is not.

The layer: the last one whose map is at least :data:`MIN_MAP_SIZE` (7) cells on both sides
at the input size used (:func:`find_spatial_layer`), not simply the last spatial layer. The
last layer of a network at a small input is tiny (MobileNetV2 at 96 px: 3x3) and, upsampled,
colours the whole image; at 224 px the two rules mostly agree.

How the activation is reached depends on where the backbone came from:

- **nested Keras backbone** (Keras applications, ``.keras`` files, builders): that
  backbone layer (overridable with ``layer=``). The classifier's
  forward pass is re-run layer by layer: the layers before ``backbone``, then a
  sub-model of the backbone returning ``(activation, backbone output)``, then the head.
- **opaque backbone** (:class:`~tlkit.backbones.hub.SavedModelBackbone`, no inner
  layers): Grad-CAM on the backbone's own output when it is spatial, otherwise a
  gradient saliency map (``|d score / d input|``, max over colour channels). The
  :class:`Explanation` says which method was used, and a warning is logged.
- **models without a ``backbone`` layer**: the same choice among the model's own layers.

Audio models (input ``waveform``): :func:`audio_saliency` gives ``|d score / d features|``
over the output of the layer named ``frontend`` (e.g. a log-mel spectrogram).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit.errors import ConfigError
from tlkit.heatmap import overlay
from tlkit.layer_replay import (
    LOGITS_LAYER,
    chain_layers,
    check_replay,
    choose_classes,
    class_score,
    class_targets,
    log_probabilities,
    run_head,
    run_layers,
)

log = logging.getLogger("tlkit.explain")

__all__ = ["Explanation", "audio_saliency", "explain_images", "find_spatial_layer", "grad_cam", "overlay"]

BACKBONE_LAYER = "backbone"
FRONTEND_LAYER = "frontend"
MIN_MAP_SIZE = 7
"""Grad-CAM uses the last layer whose map has at least this many cells on both sides."""
CAM_PERCENTILE = 99.0
"""Each map is divided by this percentile of its values (then clipped to [0, 1])."""


@dataclass
class Explanation:
    """Heatmaps for a batch and how they were made.

    Attributes:
        heatmaps: (B, H, W) float32 in [0, 1]; images: the input's H, W; audio: (B, frames, n_mels).
        class_index: (B,) the class each map explains.
        probabilities: (B, num_classes) the model's output for the batch.
        method: ``"grad-cam"``, ``"grad-cam (backbone output)"`` or ``"saliency"``.
        layer: the layer whose activation was used (``None`` for saliency on the input).
        note: one sentence for reports, e.g. why a fallback was used.
    """

    heatmaps: np.ndarray
    class_index: np.ndarray
    probabilities: np.ndarray
    method: str
    layer: str | None
    note: str = ""


def grad_cam(
    model: keras.Model,
    images: np.ndarray,
    class_index: int | Sequence[int] | None = None,
    layer: str | None = None,
) -> np.ndarray:
    """Grad-CAM heatmaps of a tlkit image classifier.

    Args:
        model: a classifier from :func:`tlkit.build_classifier` (or a run's ``model.keras``).
        images: (B, H, W, 3) raw pixels 0..255 (the model's own input), or one (H, W, 3) image.
        class_index: the class to explain: ``None`` = each image's predicted class, an int
            for all images, or one index per image.
        layer: a backbone layer name (or a layer of the model itself, e.g. ``"backbone"``
            for its output); default: the backbone's last layer whose map is at least
            :data:`MIN_MAP_SIZE` cells on both sides at this input size
            (:func:`find_spatial_layer`).

    Returns:
        (B, H, W) float32 heatmaps in [0, 1] at the input images' size, each divided by its
        :data:`CAM_PERCENTILE` th percentile. For an opaque
        SavedModel backbone with pooled output this is a gradient saliency map instead
        (see :func:`explain_images`, whose result names the method).
    """
    return explain_images(model, images, class_index, layer).heatmaps


def explain_images(
    model: keras.Model,
    images: np.ndarray,
    class_index: int | Sequence[int] | None = None,
    layer: str | None = None,
    batch_size: int = 16,
) -> Explanation:
    """Grad-CAM (or the saliency fallback) with the method used; arguments as :func:`grad_cam`."""
    batch = np.asarray(images, np.float32)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ConfigError(f"grad_cam takes images shaped (B, H, W, 3) or (H, W, 3), got {batch.shape}")
    targets = class_targets(class_index, len(batch))
    explainer = _ImageExplainer(model, layer, tf.convert_to_tensor(batch[:1]))
    maps, classes, probabilities = [], [], []
    for start in range(0, len(batch), batch_size):
        chunk = batch[start : start + batch_size]
        wanted = None if targets is None else targets[start : start + batch_size]
        heat, cls, probs = explainer(chunk, wanted)
        maps.append(heat)
        classes.append(cls)
        probabilities.append(probs)
    if explainer.note:
        log.warning("%s", explainer.note)
    return Explanation(
        np.concatenate(maps), np.concatenate(classes), np.concatenate(probabilities),
        explainer.method, explainer.layer_name, explainer.note,
    )


def find_spatial_layer(network: keras.Model, sample: Any = None, min_size: int = MIN_MAP_SIZE) -> str:
    """The Grad-CAM layer of ``network``: the last layer with a 4-D (B, h, w, C) output whose
    map is at least ``min_size`` cells on both sides; when none is, the last of those with
    the largest map.

    Args:
        sample: an input batch for ``network``, used to measure the maps when the layers'
            shapes are not static (a network built for any input size); ``None``: static
            shapes only (a layer of unknown size counts as large enough).

    Raises:
        ConfigError: no layer has a 4-D output.
    """
    sizes = _map_sizes(network, sample)
    if not sizes:
        raise ConfigError(
            f"model {network.name!r} has no layer with a 4-D (spatial) output for Grad-CAM; "
            "pass layer=<name> or use a backbone with spatial features"
        )
    large = [name for name, size in sizes if size >= min_size]
    if large:
        return large[-1]
    biggest = max(size for _, size in sizes)
    return [name for name, size in sizes if size == biggest][-1]


def _map_sizes(network: keras.Model, sample: Any) -> list[tuple[str, float]]:
    """(layer name, smaller side of its map) of every layer with a 4-D output, in order;
    ``inf`` for a side that is unknown without ``sample``."""
    spatial: list[tuple[str, Any]] = []
    for candidate in network.layers:
        if isinstance(candidate, keras.layers.InputLayer):
            continue
        output = _own_output(network, candidate)
        if output is not None and len(output.shape) == 4:
            spatial.append((candidate.name, output))
    static = all(None not in tuple(out.shape[1:3]) for _, out in spatial)
    if spatial and not static and sample is not None:
        inputs = network.inputs[0] if len(network.inputs) == 1 else network.inputs
        probe = keras.Model(inputs, [out for _, out in spatial], name="map_sizes")
        shapes = [tuple(value.shape) for value in probe(sample[:1], training=False)]
        return [(name, float(min(shape[1:3]))) for (name, _), shape in zip(spatial, shapes)]
    return [(name, float(min(v if v is not None else np.inf for v in out.shape[1:3]))) for name, out in spatial]


def _own_output(network: keras.Model, layer: keras.layers.Layer) -> Any:
    """The symbolic output of ``layer`` in ``network``'s own graph (``None`` if it has no single one).

    A layer shared between two graphs (e.g. by :func:`tlkit.layers.with_frozen_batchnorm`,
    which rebuilds a backbone around the original non-BatchNorm layers) has one output per
    graph; ``layer.output`` is the first graph's, and a sub-model mixing the two is invalid.
    """
    for nodes in getattr(network, "_nodes_by_depth", {}).values():  # Keras's own graph bookkeeping
        for node in nodes:
            if node.operation is layer:
                outputs = node.output_tensors
                return outputs[0] if len(outputs) == 1 else None
    try:
        return layer.output
    except (AttributeError, ValueError):  # a layer used twice has no single output
        return None


def audio_saliency(
    model: keras.Model,
    waveforms: np.ndarray,
    class_index: int | Sequence[int] | None = None,
) -> Explanation:
    """Gradient saliency of an audio classifier over its front-end features.

    The model must be a chain of layers with one named ``frontend`` (e.g. the log-mel
    layer tlkit puts after the ``waveform`` input). The map is ``|d score / d features|``
    of the class logit, normalised per example.

    Args:
        waveforms: (B, samples) float32 in -1..1, or one (samples,) clip.
        class_index: as in :func:`grad_cam`.

    Returns:
        An :class:`Explanation` whose heatmaps are (B, frames, n_mels) in [0, 1].
    """
    batch = np.asarray(waveforms, np.float32)
    if batch.ndim == 1:
        batch = batch[None]
    layers = chain_layers(model)
    names = [item.name for item in layers]
    if FRONTEND_LAYER not in names:
        raise ConfigError(
            f"model {model.name!r} has no layer named {FRONTEND_LAYER!r}; audio saliency needs the front-end "
            "(e.g. the log-mel layer) as a named layer"
        )
    split = names.index(FRONTEND_LAYER) + 1
    targets = class_targets(class_index, len(batch))
    x = tf.convert_to_tensor(batch)
    features = run_layers(layers[:split], x)
    with tf.GradientTape() as tape:
        tape.watch(features)
        score_source, probabilities = run_head(layers[split:], features)
        classes = choose_classes(probabilities, targets)
        score = class_score(score_source, classes)
    gradient = tape.gradient(score, features)
    if gradient is None:
        raise ConfigError(f"no gradient reaches the {FRONTEND_LAYER!r} output of model {model.name!r}")
    check_replay(model, x, probabilities)
    saliency = tf.abs(tf.cast(gradient, tf.float32))
    if saliency.shape.rank > 3:  # e.g. (B, frames, mels, 1)
        saliency = tf.reduce_max(saliency, axis=list(range(3, saliency.shape.rank)))
    return Explanation(
        _normalise(saliency.numpy()), classes, np.asarray(probabilities, np.float32), "saliency",
        FRONTEND_LAYER, "gradient saliency over the front-end features",
    )


# --- internals -------------------------------------------------------------------------


class _ImageExplainer:
    """Re-runs a classifier's forward pass so the chosen activation's gradient is reachable."""

    def __init__(self, model: keras.Model, layer: str | None, sample: Any = None) -> None:
        self.model = model
        self.layers = chain_layers(model)
        self.note = ""
        names = [item.name for item in self.layers]
        backbone = model.get_layer(BACKBONE_LAYER) if BACKBONE_LAYER in names else None
        self.backbone_index = names.index(BACKBONE_LAYER) if backbone is not None else -1
        self.inner: keras.Model | None = None
        self.flat: keras.Model | None = None
        if backbone is None:
            # Not a tlkit classifier: any functional model, Grad-CAM on its own layers.
            self.layer_name = layer or find_spatial_layer(model, sample)
            self.method = "grad-cam"
            score_layer = LOGITS_LAYER if LOGITS_LAYER in names else None
            outputs = [_own_output(model, model.get_layer(self.layer_name)), model.outputs[0]]
            if score_layer is not None:
                outputs.append(_own_output(model, model.get_layer(score_layer)))
            self.flat = keras.Model(model.inputs, outputs, name="grad_cam")
        elif layer == BACKBONE_LAYER or (layer is None and not isinstance(backbone, keras.Model)):
            self.layer_name = BACKBONE_LAYER
            spatial = len(backbone.output.shape) == 4 if isinstance(backbone, keras.Model) else \
                self._output_rank(backbone) == 4
            if spatial:
                self.method = "grad-cam (backbone output)"
                if not isinstance(backbone, keras.Model):
                    self.note = (
                        "the backbone is an opaque layer (e.g. a SavedModel) with no inner layers, so "
                        "Grad-CAM uses its spatial output"
                    )
            else:
                self.method = "saliency"
                self.layer_name = None
                self.note = (
                    "the backbone is an opaque layer (e.g. a SavedModel) with pooled output and no "
                    "spatial layer to use, so the maps are gradient saliency (|d score / d pixel|), not Grad-CAM"
                )
        else:
            if not isinstance(backbone, keras.Model):
                raise ConfigError(
                    f"layer={layer!r}: the backbone of {model.name!r} is an opaque SavedModel with no inner layers; "
                    f"use layer=None or layer={BACKBONE_LAYER!r}"
                )
            if layer is not None and layer not in {item.name for item in backbone.layers}:
                raise ConfigError(
                    f"layer={layer!r} is not a layer of backbone {backbone.name!r}; spatial candidates are "
                    f"{_spatial_names(backbone)[-8:]}"
                )
            if layer is None:  # measured at the backbone's input for these images
                inner_sample = None if sample is None else run_layers(self.layers[: self.backbone_index], sample[:1])
                layer = find_spatial_layer(backbone, inner_sample)
            self.layer_name = layer
            target = _own_output(backbone, backbone.get_layer(self.layer_name))
            if len(target.shape) != 4:
                raise ConfigError(
                    f"layer {self.layer_name!r} outputs {tuple(target.shape)}, not a 4-D (B, h, w, C) activation"
                )
            self.method = "grad-cam"
            self.inner = keras.Model(backbone.inputs, [target, backbone.outputs[0]], name="backbone_to_layer")
        self.checked = False

    def _output_rank(self, backbone: keras.layers.Layer) -> int:
        pool_index = self.backbone_index + 1
        if pool_index < len(self.layers):
            try:
                return len(self.layers[pool_index].input.shape)
            except (AttributeError, ValueError):
                pass
        return 2

    def __call__(self, images: np.ndarray, targets: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = tf.convert_to_tensor(images)
        size = images.shape[1:3]
        if self.flat is not None:
            with tf.GradientTape() as tape:
                tape.watch(x)
                outputs = self.flat(x, training=False)
                activation, probabilities = outputs[0], outputs[1]
                score_source = outputs[2] if len(outputs) > 2 else log_probabilities(probabilities)
                classes = choose_classes(probabilities, targets)
                score = class_score(score_source, classes)
            return self._cam(tape, score, activation, size), classes, np.asarray(probabilities, np.float32)
        before = self.layers[: self.backbone_index]
        backbone = self.layers[self.backbone_index]
        after = self.layers[self.backbone_index + 1 :]
        with tf.GradientTape() as tape:
            tape.watch(x)
            h = run_layers(before, x)
            if self.method == "saliency":
                tape.watch(h)
                features = backbone(h, training=False)
                activation = h
            elif self.inner is not None:
                activation, features = self.inner(h, training=False)
            else:
                features = backbone(h, training=False)
                activation = features
            score_source, probabilities = run_head(after, features)
            classes = choose_classes(probabilities, targets)
            score = class_score(score_source, classes)
        if not self.checked:
            check_replay(self.model, x, probabilities)
            self.checked = True
        if self.method == "saliency":
            gradient = tape.gradient(score, activation)
            if gradient is None:
                raise ConfigError(f"no gradient reaches the input of the backbone of {self.model.name!r}")
            saliency = tf.reduce_max(tf.abs(tf.cast(gradient, tf.float32)), axis=-1, keepdims=True)
            heat = tf.image.resize(saliency, size, method="bilinear")[..., 0].numpy()
            return _normalise(heat, percentile=99.0), classes, np.asarray(probabilities, np.float32)
        return self._cam(tape, score, activation, size), classes, np.asarray(probabilities, np.float32)

    def _cam(self, tape: tf.GradientTape, score: tf.Tensor, activation: tf.Tensor, size: tuple[int, int]) -> np.ndarray:
        gradient = tape.gradient(score, activation)
        if gradient is None:
            raise ConfigError(f"no gradient reaches layer {self.layer_name!r} of {self.model.name!r}")
        activation = tf.cast(activation, tf.float32)
        weights = tf.reduce_mean(tf.cast(gradient, tf.float32), axis=(1, 2), keepdims=True)  # (B, 1, 1, K)
        cam = tf.nn.relu(tf.reduce_sum(weights * activation, axis=-1, keepdims=True))  # (B, h, w, 1)
        cam = tf.image.resize(cam, size, method="bilinear")[..., 0]
        return _normalise(cam.numpy(), percentile=CAM_PERCENTILE)


def _normalise(maps: np.ndarray, percentile: float | None = None) -> np.ndarray:
    """Per-example scaling to [0, 1] by the maximum, or by a high percentile (clipped above it)
    so that a few extreme cells do not wash out the rest; the maximum where the percentile is 0
    (evidence on less than the remaining fraction of the image)."""
    maps = np.nan_to_num(np.asarray(maps, np.float32))
    flat = maps.reshape(len(maps), -1)
    peak = flat.max(axis=1)
    top = np.percentile(flat, percentile, axis=1) if percentile is not None else peak
    top = np.where(top > 0, top, peak)
    top = np.where(top > 0, top, 1.0).reshape((-1,) + (1,) * (maps.ndim - 1))
    return np.clip(maps / top, 0.0, 1.0).astype(np.float32)


def _spatial_names(network: keras.Model) -> list[str]:
    names = []
    for item in network.layers:
        output = _own_output(network, item)
        if output is not None and len(output.shape) == 4:
            names.append(item.name)
    return names
