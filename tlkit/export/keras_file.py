"""The ``keras`` format: the run's model as ``keras_model.keras``, loadable with safe_mode=True.

Input: float32 (B, H, W, 3) pixels 0..255 of any size (or (B, samples) waveforms), as the
run's own model. Runs whose backbone is a SavedModel layer are skipped: Keras refuses to
load such a file in safe mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlkit.artifacts import KERAS_FILE, KerasFilePredictor, labels_beside
from tlkit.export.formats import ExportContext, ExportFormat
from tlkit.export.source import ExportSource


def write_keras(fmt: ExportFormat, source: ExportSource, directory: Path, context: ExportContext) -> dict[str, Any]:
    """Saves the model as ``directory / fmt.file``; returns its metadata entry."""
    source.model.save(directory / fmt.file)
    return {
        "input": source.raw_input_spec("float32"),
        "outputs": {"probabilities": {"dtype": "float32", "shape": [None, len(source.labels)]}},
        "load": "import tlkit; keras.saving.load_model(path, safe_mode=True)",
    }


def reload_keras(fmt: ExportFormat, path: Path, source: ExportSource) -> KerasFilePredictor:
    return KerasFilePredictor(str(path), labels_beside(path))


def loads_in_safe_mode(source: ExportSource) -> bool:
    return not source.has_savedmodel_backbone


KERAS = ExportFormat(
    name="keras", file=KERAS_FILE, min_agreement=0.99, quantization="",
    write=write_keras, reload=reload_keras, applies_to=loads_in_safe_mode,
    not_applicable=(
        "the backbone is a SavedModel layer (TFSMLayer), which Keras refuses to load with "
        "safe_mode=True; deploy the SavedModel or a TFLite file instead"
    ),
)
