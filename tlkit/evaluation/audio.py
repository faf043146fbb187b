"""Audio models scored per whole clip: the mean probabilities of ``crops`` evenly spaced crops.

:func:`evaluate_audio` is training's test evaluation of an audio run; ``tlkit evaluate``
scores clips with the same :func:`tlkit.data.audio.predict_clips`.
"""

from __future__ import annotations

from typing import Any

import keras

from tlkit.data.audio import predict_clips
from tlkit.data.images import Example, encode_labels
from tlkit.model import HeadConfig, classification_loss, classification_metrics


def evaluate_audio(
    model: keras.Model,
    examples: list[Example],
    class_names: list[str],
    waveforms: dict[str, Any],
    clip_length: int,
    *,
    crops: int = 3,
    head: HeadConfig | None = None,
    batch_size: int = 32,
) -> dict[str, float]:
    """Loss and metrics of ``model`` on whole clips, each scored by the mean probabilities of
    ``crops`` evenly spaced ``clip_length`` crops (waveforms: ``{path: (samples,) float32}``).

    Returns the keys ``model.evaluate(..., return_dict=True)`` would: ``loss``, ``accuracy``, ...
    """
    head = head or HeadConfig()
    waves = [waveforms[e.path] for e in examples]
    probabilities = predict_clips(model.predict_on_batch, waves, clip_length, crops=crops, batch_size=batch_size)
    targets = encode_labels(examples, class_names)
    results = {"loss": float(classification_loss(head)(targets, probabilities))}
    for metric in classification_metrics(head, len(class_names)):
        metric.update_state(targets, probabilities)
        results[metric.name] = float(metric.result())
    return results
