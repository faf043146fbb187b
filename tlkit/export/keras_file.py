"""The ``keras`` format: the run's model as ``keras_model.keras``, loadable with safe_mode=True.

Input: float32 (B, H, W, 3) pixels 0..255 of any size (or (B, samples) waveforms), as the
run's own model. The file holds :func:`tlkit.portable.portable_model` of the model (built-in
Keras layers only), so it loads with plain Keras, without tlkit; models with a layer that
has no built-in equivalent (log-mel front-ends, Whisper encoders) are saved as they are and
need ``import tlkit`` (metadata ``needs_tlkit``, and a note in the report). Runs whose
backbone is a SavedModel layer are skipped: Keras refuses to load such a file in safe mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tlkit.artifacts import (
    KERAS_FILE,
    KerasFilePredictor,
    labels_beside,
    metadata_beside,
)
from tlkit.audio_windows import ClipWindows
from tlkit.errors import ExportError
from tlkit.export.formats import ExportContext, ExportFormat
from tlkit.export.multitask import keras_outputs_entry
from tlkit.export.source import ExportSource
from tlkit.portable import portable_model
from tlkit.text import first_line


def write_keras(fmt: ExportFormat, source: ExportSource, directory: Path, context: ExportContext) -> dict[str, Any]:
    """Saves the model (its portable version where there is one) as ``directory / fmt.file``;
    returns its metadata entry."""
    try:
        model, needs_tlkit = portable_model(source.model), False
    except ExportError as exc:
        model, needs_tlkit = source.model, True
        source.notes.append(f"{fmt.file} needs `import tlkit` to load: {first_line(exc)}")
    model.save(directory / fmt.file)
    return {
        "input": source.raw_input_spec("float32"),
        "outputs": keras_outputs_entry(source.tasks) if source.tasks is not None else
        {"probabilities": {"dtype": "float32", "shape": [None, len(source.labels)]}},
        "needs_tlkit": needs_tlkit,
        "load": ("import tlkit; " if needs_tlkit else "") + "keras.saving.load_model(path, safe_mode=True)",
    }


def reload_keras(fmt: ExportFormat, path: Path, source: ExportSource) -> KerasFilePredictor:
    # Audio: one window per model call, a clip scored as metadata.json's audio_windows says.
    return KerasFilePredictor(str(path), labels_beside(path), windows=ClipWindows.from_metadata(metadata_beside(path)),
                              tasks=source.tasks)


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
