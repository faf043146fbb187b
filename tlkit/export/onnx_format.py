"""The ``onnx`` format: ``model.onnx`` for ONNX Runtime (and any ONNX consumer), written by
Keras 3's own ``model.export(path, format="onnx")`` (tf2onnx under the TensorFlow backend).

Input ``image``: float32 (B, H, W, 3) RGB pixels 0..255 at the run's fixed ``image_size``
(any batch; resize first, :class:`tlkit.artifacts.OnnxPredictor` does it with the Keras
model's bilinear resize). The preprocessing (scaling, mean / std) is inside the graph, so
the file takes raw pixels like the SavedModel. A fixed H, W was chosen over dynamic ones so
that ONNX Runtime never resizes (ONNX ``Resize`` and TensorFlow's bilinear resize round
differently). Output: (B, C) float32 probabilities. The class names are in ``labels.txt`` /
``metadata.json`` beside it and in the file's own ``metadata_props`` (``labels``, JSON), so a
copied ``.onnx`` stays self-describing.

Needs the optional extra ``pip install 'tlkit[onnx]'`` (tf2onnx, onnx, onnxruntime); without
it the format is skipped by a default export, with that reason. Image runs only: audio
front-ends (STFT, log-mel) and SavedModel (TF-Hub) backbones are not verified through tf2onnx.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import warnings
from pathlib import Path
from typing import Any

import tensorflow as tf

from tlkit.artifacts import (
    ONNX_EXTRA,
    ONNX_FILE,
    OnnxPredictor,
    labels_beside,
    task_output_names,
)
from tlkit.errors import ExportError
from tlkit.export.formats import ExportContext, ExportFormat
from tlkit.export.multitask import onnx_outputs_entry
from tlkit.export.source import ExportSource
from tlkit.text import first_line

#: The distributions the format needs, by import name.
REQUIRED_MODULES = ("tf2onnx", "onnx", "onnxruntime")


def missing_modules() -> list[str]:
    """The import names of :data:`REQUIRED_MODULES` that are not installed."""
    return [name for name in REQUIRED_MODULES if importlib.util.find_spec(name) is None]


def onnx_applies(source: ExportSource) -> bool:
    """An image run without a SavedModel backbone, with the ONNX packages installed."""
    return source.modality == "image" and not source.has_savedmodel_backbone and not missing_modules()


def write_onnx(fmt: ExportFormat, source: ExportSource, directory: Path, context: ExportContext) -> dict[str, Any]:
    """Exports the model at the fixed image size to ``directory / fmt.file``, embeds the labels;
    returns its metadata entry (input / output read back from the file).

    Raises:
        ExportError: the packages are missing, or the conversion failed.
    """
    missing = missing_modules()
    if missing:
        raise ExportError(f"the onnx format needs {', '.join(missing)}, not installed: {ONNX_EXTRA}")
    import onnx  # optional dependency, present (checked above)

    path = directory / fmt.file
    signature = [tf.TensorSpec([None, *source.fixed_shape], tf.float32, name=source.input_name)]
    try:
        # tf2onnx prints its progress and numpy-2 FutureWarnings; the result is checked below.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            source.model.export(str(path), format="onnx", input_signature=signature, verbose=False)
    except Exception as exc:  # tf2onnx raises many kinds
        raise ExportError(f"ONNX conversion failed: {type(exc).__name__}: {first_line(exc)}") from exc
    model = onnx.load(str(path))
    props = {"labels": json.dumps(source.labels), "producer": "tlkit", "input_range": "float32 RGB pixels 0..255"}
    if source.tasks is not None:  # one graph output per task, matched to its task (and named in the file too)
        outputs: dict[str, Any] = {"outputs": onnx_outputs_entry(path, source.model, source.tasks, source.fixed_shape)}
        props["tasks"] = json.dumps({task: {**entry, "output": outputs["outputs"][task]["name"]}
                                     for task, entry in source.tasks.to_metadata().items()})
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))
    graph_input, graph_output = model.graph.input[0], model.graph.output[0]
    if source.tasks is None:
        outputs = {"output": {"name": graph_output.name, "dtype": "float32", "shape": [None, len(source.labels)],
                              "meaning": "probabilities"}}
    return {
        "quantization": fmt.quantization,
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "input": {"name": graph_input.name, "dtype": "float32", "shape": [None, *source.fixed_shape],
                  "range": [0, 255],
                  "layout": "RGB, channels last, resized to this size (bilinear, as keras.layers.Resizing)"},
        **outputs,
        "metadata_props": list(props),
    }


def reload_onnx(fmt: ExportFormat, path: Path, source: ExportSource) -> OnnxPredictor:
    return OnnxPredictor(str(path), labels_beside(path), tasks=source.tasks, output_names=task_output_names(path))


ONNX = ExportFormat(
    name="onnx", file=ONNX_FILE, min_agreement=0.99, quantization="none (float32)",
    write=write_onnx, reload=reload_onnx, applies_to=onnx_applies,
    not_applicable=f"image runs without a SavedModel backbone, with the ONNX packages installed ({ONNX_EXTRA})",
)
"""The ``onnx`` record (registered after the TFLite ones by ``tlkit/export/__init__.py``)."""
