"""One record per export format, and the registry that :func:`tlkit.export.export_run` reads.

A format is an :class:`ExportFormat`: its name, the file it writes in the version directory,
the top-1 agreement its reloaded artifact must reach, what its quantization is, a ``write``
function and a ``reload`` function. Adding a format is one record and its test::

    from tlkit.export import ExportFormat, register_format

    register_format(ExportFormat(
        name="weights-npz", file="weights.npz", min_agreement=0.99, quantization="none (float32)",
        write=write_npz,        # (fmt, source, directory, context) -> metadata entry (a dict)
        reload=reload_npz,      # (fmt, path, source) -> predictor with .labels and .predict_one
    ))

The built-in records (SavedModel, ``.keras``, four TFLite variants) are registered by
``tlkit/export/__init__.py`` in build order; formats registered later are built after them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.errors import ConfigError
from tlkit.export.source import ExportSource
from tlkit.predict import Predictor


@dataclass(frozen=True)
class ExportContext:
    """What a format's ``write`` may use besides the run.

    Attributes:
        calibration: returns the calibration examples (read on the first call and shared by
            every format), each shaped like the fixed input without its batch axis:
            (H, W, 3) float32 pixels 0..255 at the run's image size, or (samples,).
        int8_io: the full-integer model should take and return int8 tensors.
        bias_correction: formats with int8 weights may bias-correct them (see
            :mod:`tlkit.export.quantize`).
    """

    calibration: Callable[[], list[np.ndarray]]
    int8_io: bool = False
    bias_correction: bool = True


WriteFn = Callable[["ExportFormat", ExportSource, Path, ExportContext], dict[str, Any]]
"""``write(fmt, source, directory, context)``: writes ``directory / fmt.file`` and returns the
format's ``metadata.json`` entry (input / output contract, quantization...; ``path`` is added)."""

ReloadFn = Callable[["ExportFormat", Path, ExportSource], Predictor]
"""``reload(fmt, path, source)``: the written artifact at ``path`` as a predictor, loaded as a
user would (labels from the files beside it). Optional ``prepare(example)`` gives the input
the artifact really sees (e.g. resized): the Keras reference is computed on it."""


def always(source: ExportSource) -> bool:
    """``applies_to`` of formats that every run can be exported in."""
    return True


def file_size(path: Path) -> int:
    """``size`` of single-file formats: bytes on disk."""
    return path.stat().st_size


@dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Attributes:
        name: what users pass to ``--formats`` (e.g. ``"tflite-int8"``).
        file: the artifact, relative to the version directory (``"."``: the directory itself).
        min_agreement: default lowest top-1 agreement with the Keras model on the parity sample.
        quantization: what the format does to the weights, in words ("" when nothing).
        write: see :data:`WriteFn`.
        reload: see :data:`ReloadFn`.
        applies_to: whether a run can be exported in this format (else it is skipped; a
            default export builds only the formats that apply).
        not_applicable: the reason given when ``applies_to`` says no.
        why_not: the reason for this run, when it depends on the run (replaces ``not_applicable``).
        size: bytes the artifact takes on disk, given ``directory / file``.
        options: format-specific parameters its ``write`` reads (e.g. TFLite converter settings).
    """

    name: str
    file: str
    min_agreement: float
    quantization: str
    write: WriteFn
    reload: ReloadFn
    applies_to: Callable[[ExportSource], bool] = always
    not_applicable: str = ""
    why_not: Callable[[ExportSource], str] | None = None
    size: Callable[[Path], int] = file_size
    options: Any = None


FORMATS: dict[str, ExportFormat] = {}
"""Every registered format by name, in build order."""


def register_format(fmt: ExportFormat, *, overwrite: bool = False) -> ExportFormat:
    """Adds ``fmt`` to the registry (built after those registered before it).

    Raises:
        ConfigError: a format of that name exists and ``overwrite`` is false, or the record
            is malformed (empty name or file, threshold outside 0..1).
    """
    if not fmt.name or not fmt.file:
        raise ConfigError(f"an export format needs a name and a file, got name={fmt.name!r} file={fmt.file!r}")
    if not 0.0 <= fmt.min_agreement <= 1.0:
        raise ConfigError(f"export format {fmt.name!r}: min_agreement must be between 0 and 1, got {fmt.min_agreement}")
    if fmt.name in FORMATS and not overwrite:
        raise ConfigError(f"export format {fmt.name!r} is already registered; pass overwrite=True to replace it")
    FORMATS[fmt.name] = fmt
    return fmt


def unregister_format(name: str) -> None:
    """Removes a format from the registry (no error when it is not there)."""
    FORMATS.pop(name, None)


def get_format(name: str) -> ExportFormat:
    """The record of one format.

    Raises:
        ConfigError: no format of that name is registered (the message lists them).
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"unknown export format {name!r}; choose from {', '.join(FORMATS)}") from None


def list_formats() -> list[ExportFormat]:
    """Every registered format, in build order."""
    return list(FORMATS.values())
