"""Re-running a single-chain classifier layer by layer, for gradients at an inner activation.

Grad-CAM and saliency (:mod:`tlkit.explain`) need the gradient of a class score with respect to
an activation inside the model (a backbone's spatial map, an audio front-end's features). Keras
gives no handle on an intermediate tensor of a called functional model, so the explainers replay
the model's layers in order under a ``GradientTape``; :func:`check_replay` guards that the replay
reproduces the model's own output. The score is the class *logit* (the layer named ``logits``)
when there is one, else the log of the probability.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tlkit.errors import ConfigError

__all__ = ["LOGITS_LAYER", "chain_layers", "check_replay", "choose_classes", "class_score", "class_targets",
           "log_probabilities", "run_head", "run_layers"]

LOGITS_LAYER = "logits"


def chain_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The model's layers after its input, in order (tlkit classifiers are a single chain)."""
    if len(model.inputs) != 1:
        raise ConfigError(f"model {model.name!r} has {len(model.inputs)} inputs; explanations need one")
    return [item for item in model.layers if not isinstance(item, keras.layers.InputLayer)]


def run_layers(layers: Sequence[keras.layers.Layer], x: Any) -> Any:
    for item in layers:
        x = item(x, training=False)
    return x


def run_head(layers: Sequence[keras.layers.Layer], x: Any) -> tuple[Any, Any]:
    """Runs the head; returns ``(score source, probabilities)``: the logits when the
    head has a layer named ``logits``, else the log of the probabilities."""
    logits = None
    for item in layers:
        x = item(x, training=False)
        if item.name == LOGITS_LAYER:
            logits = x
    return (logits if logits is not None else log_probabilities(x)), x


def log_probabilities(probabilities: Any) -> Any:
    return tf.math.log(tf.maximum(tf.cast(probabilities, tf.float32), 1e-12))


def choose_classes(probabilities: Any, targets: np.ndarray | None) -> np.ndarray:
    if targets is not None:
        return targets
    return np.argmax(np.asarray(probabilities), axis=-1).astype(np.int64)


def class_score(score_source: Any, classes: np.ndarray) -> tf.Tensor:
    scores = tf.cast(score_source, tf.float32)
    if scores.shape.rank != 2:
        raise ConfigError(f"the classifier's scores have shape {tuple(scores.shape)}; expected (B, num_classes)")
    num_classes = int(scores.shape[-1])
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise ConfigError(f"class_index {classes.tolist()} out of range for {num_classes} classes")
    return tf.reduce_sum(scores * tf.one_hot(classes, num_classes))


def class_targets(class_index: int | Sequence[int] | None, count: int) -> np.ndarray | None:
    if class_index is None:
        return None
    targets = np.asarray(class_index, np.int64).reshape(-1)
    if targets.size == 1:
        return np.full(count, int(targets[0]), np.int64)
    if targets.size != count:
        raise ConfigError(f"class_index has {targets.size} entries for {count} examples")
    return targets


def check_replay(model: keras.Model, x: tf.Tensor, probabilities: Any) -> None:
    """Guards the layer-by-layer replay: it must reproduce the model's own output."""
    expected = np.asarray(model(x, training=False), np.float32)
    got = np.asarray(probabilities, np.float32)
    if expected.shape != got.shape or not np.allclose(expected, got, atol=1e-3):
        raise ConfigError(
            f"model {model.name!r} is not a plain chain of layers (re-running its layers in order does not "
            "reproduce its output), so explanations cannot be computed for it"
        )
