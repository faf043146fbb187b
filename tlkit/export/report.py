"""What an export did: one :class:`FormatResult` per artifact, gathered in an :class:`ExportReport`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from tlkit.text import format_table, human_size


@dataclass
class FormatResult:
    """Parity of one exported artifact with the run's Keras model.

    Attributes:
        format: the format's name (see :func:`tlkit.export.list_formats`).
        path: the artifact, relative to the version directory (``"."`` for the SavedModel).
        size_bytes: bytes on disk (the SavedModel: its own files only).
        max_abs_diff: max |p_export - p_keras| over the parity sample and all classes.
        top1_agreement: fraction of parity examples where both pick the same class.
        latency_ms: median wall time of one ``predict_one`` call (one example, this machine).
        min_agreement: the threshold ``top1_agreement`` had to reach.
        samples: number of parity examples.
        passed: ``top1_agreement >= min_agreement``.
        notes: anything worth knowing (quantization, runtime used).
        tasks: multi-task models: per task ``{"top1_agreement", "max_abs_diff"}``
            (``top1_agreement`` above is the lowest of them); ``None`` otherwise.
    """

    format: str
    path: str
    size_bytes: int
    max_abs_diff: float
    top1_agreement: float
    latency_ms: float
    min_agreement: float
    samples: int
    passed: bool
    notes: str = ""
    tasks: dict[str, dict[str, float]] | None = None


@dataclass
class ExportReport:
    """What :func:`tlkit.export.export_run` did.

    Attributes:
        run_dir: the source run directory.
        name: the model name (the run's ``name``).
        version: the version number written (or that would have been written, on failure).
        out_dir: the version directory (it exists only when the export succeeded).
        results: one :class:`FormatResult` per format that was written and checked, in build
            order (a format that missed its threshold is here with ``passed=False``).
        skipped: formats not exported because they do not apply to the run, with the reason.
        failed: formats that were tried and are not in the version (conversion error or
            parity miss), each with a one-line reason; the others were still written.
        parity_split: where the parity examples came from (``"val+test"`` normally).
        calibration_samples: training examples used to calibrate the int8 model and to
            bias-correct the quantized formats (0: none).
        tflite_runtime: the interpreter used to run the TFLite files.
        created: UTC time, ISO 8601.
        versions: tensorflow, keras, tlkit, numpy, python versions.
        notes: anything the export had to decide on the user's behalf.
    """

    run_dir: str
    name: str
    version: int
    out_dir: str
    results: list[FormatResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    parity_split: str = ""
    calibration_samples: int = 0
    tflite_runtime: str = ""
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Every format that was tried is in the version."""
        return not self.failed and all(r.passed for r in self.results)

    def result(self, fmt: str) -> FormatResult:
        """The result of one format (KeyError when it was not exported)."""
        for r in self.results:
            if r.format == fmt:
                return r
        raise KeyError(fmt)

    def to_dict(self) -> dict[str, Any]:
        result = dataclasses.asdict(self)
        for entry in result["results"]:  # per-task parity only where there are tasks
            if entry.get("tasks") is None:
                entry.pop("tasks", None)
        return result

    def table(self) -> str:
        """The parity table as plain text (format, file, size, max |dp|, agreement, latency)."""
        rows = [
            (
                r.format, r.path, human_size(r.size_bytes), f"{r.max_abs_diff:.2e}",
                f"{r.top1_agreement:.3f}", f"{r.min_agreement:.2f}", f"{r.latency_ms:.2f}",
                "ok" if r.passed else "FAILED",
            )
            for r in self.results
        ]
        text = format_table(
            ("format", "file", "size", "max |dp|", "top-1 agree", "min", "latency ms", "status"), rows
        )
        for fmt, reason in self.skipped.items():
            text += f"\nskipped {fmt}: {reason}"
        for fmt, reason in self.failed.items():
            text += f"\nfailed {fmt}: {reason}"
        for note in self.notes:
            text += f"\nnote: {note}"
        return text
