"""The ``savedmodel`` format: the version directory itself, for TensorFlow Serving.

Signature ``serving_default``: ``image`` uint8 (B, H, W, C) of any H, W with C = 1 (grey),
2 (grey + alpha), 3 (RGB) or 4 (RGBA), made RGB inside the function as ``tlkit predict``
decodes files (alpha dropped, grey repeated); or for audio models ``waveform`` float32
(B, samples) in -1..1 at the model's sample rate, of any length: the function scores each
clip as the run does, the mean probabilities over ``max(eval_crops, ceil(samples /
clip_samples))`` evenly spaced windows of the training crop (:mod:`tlkit.audio_windows`;
recorded in ``metadata.json`` under ``audio_windows``), so a clip longer than the encoder
takes (Whisper: 30 s) is scored whole. Outputs ``probabilities`` float32 (B, C),
``labels`` string (B, k) and ``scores`` float32 (B, k), the top k = min(5, C) classes,
best first. A multi-task model's signature returns those three per task instead, named
``<task>_probabilities``, ``<task>_labels`` and ``<task>_scores`` (:mod:`tlkit.export.multitask`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tensorflow as tf

from tlkit.artifacts import (
    MAX_TOP_K,
    SAVED_MODEL_FILE,
    SIGNATURE,
    SavedModelPredictor,
    labels_beside,
)
from tlkit.audio_windows import tf_score_windows
from tlkit.export.formats import ExportContext, ExportFormat
from tlkit.export.multitask import (
    savedmodel_outputs_entry,
    serving_outputs,
    window_scores,
)
from tlkit.export.source import ExportSource

# What tf.saved_model.save writes: the SavedModel's own files in a directory shared with
# the other artifacts.
_PARTS = (SAVED_MODEL_FILE, "fingerprint.pb", "variables", "assets")


def write_savedmodel(fmt: ExportFormat, source: ExportSource, directory: Path, context: ExportContext) -> dict[str, Any]:
    """Saves the serving module into ``directory``; returns its metadata entry."""
    module = _serving_module(source)
    tf.saved_model.save(module, str(directory / fmt.file), signatures={SIGNATURE: module.serve})
    k = min(MAX_TOP_K, len(source.labels))
    spec = source.raw_input_spec("uint8", any_channels=True)
    if source.windows is not None:
        spec["windows"] = "cut and averaged inside the serving function (see audio_windows)"
    if source.tasks is not None:
        return {"signature": SIGNATURE, "input": spec, "outputs": savedmodel_outputs_entry(source.tasks)}
    return {
        "signature": SIGNATURE,
        "input": spec,
        "outputs": {
            "probabilities": {"dtype": "float32", "shape": [None, len(source.labels)]},
            "labels": {"dtype": "string", "shape": [None, k], "meaning": f"top {k} class names, best first"},
            "scores": {"dtype": "float32", "shape": [None, k], "meaning": "their probabilities"},
        },
    }


def reload_savedmodel(fmt: ExportFormat, path: Path, source: ExportSource) -> SavedModelPredictor:
    return SavedModelPredictor(str(path), labels_beside(path / SAVED_MODEL_FILE), input_name=source.input_name,
                               windows=source.windows, tasks=source.tasks)


def savedmodel_size(path: Path) -> int:
    """Bytes of the SavedModel's own files in ``path`` (not the other artifacts beside them)."""
    total = 0
    for part in (path / name for name in _PARTS):
        if part.is_file():
            total += part.stat().st_size
        elif part.is_dir():
            total += sum(f.stat().st_size for f in part.rglob("*") if f.is_file())
    return total


def to_rgb(images: tf.Tensor) -> tf.Tensor:
    """(B, H, W, C) with C in 1..4 -> (B, H, W, 3): grey repeated, alpha dropped (as
    ``tf.io.decode_image(channels=3)`` does for files); other C fail with a clear message."""
    channels = tf.shape(images)[-1]
    check = tf.debugging.assert_less_equal(
        channels, 4, message="the image needs 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA) channels"
    )
    with tf.control_dependencies([check]):
        rgb = tf.cond(channels < 3, lambda: tf.image.grayscale_to_rgb(images[..., :1]), lambda: images[..., :3])
    return tf.ensure_shape(rgb, [None, None, None, 3])


def _serving_module(source: ExportSource) -> tf.Module:
    """A ``tf.Module`` whose ``serve`` takes raw input and returns probabilities and top labels."""
    model = source.model
    k = min(MAX_TOP_K, len(source.labels))
    windows = source.windows
    tasks = source.tasks
    if source.modality == "image":
        spec = tf.TensorSpec([None, None, None, None], tf.uint8, name="image")
    else:
        spec = tf.TensorSpec([None, None], tf.float32, name="waveform")

    class Serving(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="tlkit_serving")
            self.model = model
            # Every Keras variable (random-seed state included) must be reachable from the
            # root, or tf.saved_model.save refuses functions that capture them.
            self.model_variables = list(model.variables)
            self.label_names = tf.constant(source.labels)
            if tasks is not None:
                self.task_label_names = {h.name: tf.constant(list(h.labels)) for h in tasks.heads}

        @tf.function(input_signature=[spec])
        def serve(self, raw: tf.Tensor) -> dict[str, tf.Tensor]:
            if source.modality == "image":
                outputs = self.model(tf.cast(to_rgb(raw), tf.float32), training=False)
            elif windows is not None and tasks is not None:
                outputs = window_scores(tf_score_windows, self.model, raw, tasks, windows.clip_samples, windows.crops)
            elif windows is not None:
                outputs = tf_score_windows(lambda x: self.model(x, training=False), raw, windows.clip_samples,
                                           windows.crops)
            else:
                outputs = self.model(raw, training=False)
            if tasks is not None:  # one set of outputs per task
                return serving_outputs(outputs, tasks, self.task_label_names)
            probabilities = outputs
            scores, indices = tf.math.top_k(probabilities, k=k)
            return {"probabilities": probabilities, "labels": tf.gather(self.label_names, indices), "scores": scores}

    return Serving()


SAVEDMODEL = ExportFormat(
    name="savedmodel", file=".", min_agreement=0.99, quantization="",
    write=write_savedmodel, reload=reload_savedmodel, size=savedmodel_size,
)
