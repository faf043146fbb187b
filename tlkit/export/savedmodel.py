"""The ``savedmodel`` format: the version directory itself, for TensorFlow Serving.

Signature ``serving_default``: ``image`` uint8 (B, H, W, 3) RGB of any H, W, or for audio
models ``waveform`` float32 (B, samples) in -1..1 at the model's sample rate. Outputs
``probabilities`` float32 (B, C), ``labels`` string (B, k) and ``scores`` float32 (B, k),
the top k = min(5, C) classes, best first.
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
from tlkit.export.formats import ExportContext, ExportFormat
from tlkit.export.source import ExportSource

# What tf.saved_model.save writes: the SavedModel's own files in a directory shared with
# the other artifacts.
_PARTS = (SAVED_MODEL_FILE, "fingerprint.pb", "variables", "assets")


def write_savedmodel(fmt: ExportFormat, source: ExportSource, directory: Path, context: ExportContext) -> dict[str, Any]:
    """Saves the serving module into ``directory``; returns its metadata entry."""
    module = _serving_module(source)
    tf.saved_model.save(module, str(directory / fmt.file), signatures={SIGNATURE: module.serve})
    k = min(MAX_TOP_K, len(source.labels))
    return {
        "signature": SIGNATURE,
        "input": source.raw_input_spec("uint8"),
        "outputs": {
            "probabilities": {"dtype": "float32", "shape": [None, len(source.labels)]},
            "labels": {"dtype": "string", "shape": [None, k], "meaning": f"top {k} class names, best first"},
            "scores": {"dtype": "float32", "shape": [None, k], "meaning": "their probabilities"},
        },
    }


def reload_savedmodel(fmt: ExportFormat, path: Path, source: ExportSource) -> SavedModelPredictor:
    return SavedModelPredictor(str(path), labels_beside(path / SAVED_MODEL_FILE), input_name=source.input_name)


def savedmodel_size(path: Path) -> int:
    """Bytes of the SavedModel's own files in ``path`` (not the other artifacts beside them)."""
    total = 0
    for part in (path / name for name in _PARTS):
        if part.is_file():
            total += part.stat().st_size
        elif part.is_dir():
            total += sum(f.stat().st_size for f in part.rglob("*") if f.is_file())
    return total


def _serving_module(source: ExportSource) -> tf.Module:
    """A ``tf.Module`` whose ``serve`` takes raw input and returns probabilities and top labels."""
    model = source.model
    k = min(MAX_TOP_K, len(source.labels))
    if source.modality == "image":
        spec = tf.TensorSpec([None, None, None, 3], tf.uint8, name="image")
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

        @tf.function(input_signature=[spec])
        def serve(self, raw: tf.Tensor) -> dict[str, tf.Tensor]:
            probabilities = self.model(tf.cast(raw, tf.float32), training=False)
            scores, indices = tf.math.top_k(probabilities, k=k)
            return {"probabilities": probabilities, "labels": tf.gather(self.label_names, indices), "scores": scores}

    return Serving()


SAVEDMODEL = ExportFormat(
    name="savedmodel", file=".", min_agreement=0.99, quantization="",
    write=write_savedmodel, reload=reload_savedmodel, size=savedmodel_size,
)
