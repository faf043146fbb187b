"""Export a finished run for deployment: SavedModel, ``.keras`` and TFLite, each verified.

``export_run(run_dir)`` (``tlkit export RUN_DIR``) writes one *version directory*::

    saved_models/<name>/<version>/          (or <out>/<version>/; version = next free integer)
        saved_model.pb, variables/, ...     SavedModel; signature ``serving_default``
        keras_model.keras                   the Keras model (loads with safe_mode=True)
        model_fp32.tflite                   TFLite, float32
        model_fp16.tflite                   TFLite, float16 weights
        model_dynamic.tflite                TFLite, dynamic-range (int8 weights, float activations)
        model_int8.tflite                   TFLite, full-integer int8 (calibrated on training data)
                                            (both int8 variants bias-corrected, see tlkit.export.quantize)
        model.onnx                          ONNX, float32 (optional extra tlkit[onnx]; image runs)
        labels.txt                          class names, one a line, in output order
        metadata.json                       labels, input contract per artifact, parity, versions, source run
        export_report.json                  the parity table (also returned as :class:`ExportReport`)

The version directory is itself a SavedModel directory, so TensorFlow Serving can serve
``saved_models/<name>`` as its model base path. Each format is one :class:`ExportFormat`
record in a registry (:func:`list_formats`, :func:`get_format`, :func:`register_format`);
the input contract of each is in its module's docstring (:mod:`tlkit.export.savedmodel`,
:mod:`tlkit.export.keras_file`, :mod:`tlkit.export.tflite`) and in ``metadata.json``.
Reading an export back (predictors, file names) is :mod:`tlkit.artifacts`.

A default export builds every format whose record applies to the run (``applies_to``;
the reasons for the others are in ``report.skipped``). A format that fails, by a
conversion error or a parity miss, is left out of the version and named in
``report.failed``; the others are still written (``strict=True``: all or nothing). Audio
artifacts score a whole clip as the run does, by the window contract of
:mod:`tlkit.audio_windows` recorded in ``metadata.json`` (the SavedModel cuts the windows
inside its serving function), and parity compares them with the run's own clip scores.

Modules: ``formats`` (the record and the registry), ``source`` (the run, read through
:class:`tlkit.rundir.RunDir`), ``savedmodel`` / ``keras_file`` / ``tflite`` (the built-in
formats), ``quantize`` (bias correction), ``parity`` (verification against the Keras model),
``report`` and ``runner`` (:func:`export_run`).
"""

from __future__ import annotations

from tlkit.artifacts import load_exported_predictor
from tlkit.export.formats import (
    FORMATS,
    ExportContext,
    ExportFormat,
    get_format,
    list_formats,
    register_format,
    unregister_format,
)
from tlkit.export.keras_file import KERAS
from tlkit.export.onnx_format import ONNX
from tlkit.export.report import ExportReport, FormatResult
from tlkit.export.runner import export_run
from tlkit.export.savedmodel import SAVEDMODEL
from tlkit.export.source import ExportSource
from tlkit.export.tflite import TFLITE_FORMATS

for _fmt in (SAVEDMODEL, KERAS, *TFLITE_FORMATS, ONNX):
    register_format(_fmt, overwrite=True)

__all__ = [
    "FORMATS",
    "ExportContext",
    "ExportFormat",
    "ExportReport",
    "ExportSource",
    "FormatResult",
    "export_run",
    "get_format",
    "list_formats",
    "load_exported_predictor",
    "register_format",
    "unregister_format",
]
