"""``export_run``: every requested format written, verified, and committed as one new version.

Everything is built in a hidden sibling directory (``.tmp-export-<host>-<pid>-<id>``), each
format in its own scratch folder inside it, and renamed into place only after the
artifacts have been reloaded and checked against the run on held-out examples. A format
that fails (its conversion raises, or it misses its agreement threshold) is left out and
named with its reason in :attr:`ExportReport.failed`; the formats that passed are still
written (``strict=True``: any failure writes nothing). An export in which nothing passed
leaves no version directory behind, and an existing version is never overwritten.
Temporary directories left by interrupted exports (their process gone, or untouched for an
hour) are removed by the next export.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.artifacts import LABELS_FILE, METADATA_FILE, REPORT_FILE
from tlkit.errors import ConfigError, ExportError, TlkitError
from tlkit.export.formats import FORMATS, ExportContext, ExportFormat, get_format
from tlkit.export.model_card import write_model_card
from tlkit.export.parity import verify
from tlkit.export.report import ExportReport
from tlkit.export.source import (
    ExportSource,
    calibration_examples,
    check_calibration,
    load_source,
    parity_examples,
)
from tlkit.fileio import atomic_write_text, versions, write_json
from tlkit.text import first_line, safe_name

# Representative data for int8 calibration: one example each, shaped like the TFLite
# input without its batch axis: (H, W, 3) float32 pixels 0..255 at the run's image_size,
# or (samples,) float32 for audio.
RepresentativeData = Iterable[np.ndarray]

TMP_PREFIX = ".tmp-export-"
STALE_AFTER_S = 3600.0
"""A temporary export directory untouched this long is stale even if its PID is alive (reused)."""


def export_run(
    run_dir: str | Path,
    formats: Sequence[str] | str | None = None,
    out: str | Path | None = None,
    *,
    calibration_samples: int = 100,
    parity_samples: int = 50,
    min_agreement: float | Mapping[str, float] | None = None,
    int8_io: bool = False,
    representative_data: RepresentativeData | None = None,
    bias_correction: bool = True,
    strict: bool = False,
) -> ExportReport:
    """Exports a finished run in several formats, verifies each, and writes a new version.

    Args:
        run_dir: a finished run directory (read through :class:`tlkit.rundir.RunDir`).
        formats: registered format names (a list or a comma-separated string); ``None``
            exports every format that applies to the run (``keras`` is skipped for models
            whose backbone is a SavedModel layer, which cannot load in safe mode; the TFLite
            formats for ops TFLite cannot convert; the reasons are in ``report.skipped``).
        out: the directory holding the version folders; default ``saved_models/<name>``
            (relative to the working directory) with ``<name>`` the run's name.
        calibration_samples: training examples used to calibrate the int8 model.
        parity_samples: held-out (val, then test) examples each artifact is checked on.
        min_agreement: top-1 agreement each format must reach: one number for all, or a
            mapping format -> number; missing formats use their record's ``min_agreement``.
        int8_io: the int8 TFLite model takes and returns int8 tensors (quantized with the
            scale / zero point in ``metadata.json``) instead of float32.
        representative_data: replaces the calibration examples drawn from the training
            split: each item one example shaped like the TFLite input without its batch
            axis, (H, W, 3) float32 pixels 0..255 at the run's image size (or (samples,)).
        bias_correction: before converting ``tflite-dynamic`` and ``tflite-int8``, shift
            the bias (or the following BatchNorm's mean) of every Keras convolution and
            Dense layer by the mean error its int8-rounded weights cause on the
            calibration examples (see :mod:`tlkit.export.quantize`). The Keras model itself
            is left unchanged. ``False`` converts the weights as they are.
        strict: any failed format fails the whole export (nothing is written) instead of
            being left out of the version.

    Returns:
        An :class:`ExportReport`; the artifacts are in ``report.out_dir``. When some formats
        failed, ``report.failed`` names them with a one-line reason and ``report.passed``
        is false; the version holds the formats that passed.

    Raises:
        ExportError: no format passed, or (``strict``) any format failed: a conversion
            error, or an artifact's top-1 agreement with the run below its threshold.
            Nothing is left on disk in that case. Also a ``representative_data`` example of
            the wrong shape (checked before anything is built).
        ConfigError: ``run_dir`` is not a finished run, or a format name is unknown.
    """
    if calibration_samples < 1 or parity_samples < 1:
        raise ConfigError(
            f"calibration_samples and parity_samples must be >= 1, got {calibration_samples} and {parity_samples}"
        )
    source = load_source(run_dir)
    wanted, skipped = _resolve_formats(formats, source)
    thresholds = _thresholds(min_agreement)
    given: list[np.ndarray] | None = None
    if representative_data is not None:  # the caller's examples: a wrong shape is their error, found first
        given = [np.asarray(x, np.float32) for x in representative_data]
        check_calibration(given, source.fixed_shape)
    base = (Path(out) if out is not None else Path("saved_models") / safe_name(source.name)).absolute()
    made_base = not base.exists()
    base.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(base)
    if removed:
        source.notes.append(
            f"removed {len(removed)} temporary folder(s) left in {str(base)!r} by interrupted exports: "
            + ", ".join(removed)
        )
    report = ExportReport(
        run_dir=str(source.run.path.resolve()), name=source.name, version=_next_version(base), out_dir="",
        skipped=skipped, created=datetime.now(UTC).isoformat(timespec="seconds"), versions=versions(),
        notes=source.notes,
    )
    tmp = base / f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        parity, report.parity_split = parity_examples(source, parity_samples)
        meta = _base_metadata(source, report)
        atomic_write_text(tmp / LABELS_FILE, "\n".join(source.labels) + "\n")
        cached: list[list[np.ndarray]] = []

        def calibration() -> list[np.ndarray]:
            """The calibration examples, read once and shared by every quantized format."""
            if not cached:
                examples = given if given is not None else calibration_examples(source, calibration_samples)
                check_calibration(examples, source.fixed_shape)
                cached.append(examples)
                report.calibration_samples = len(examples)
            return cached[0]

        context = ExportContext(calibration, int8_io=int8_io, bias_correction=bias_correction)
        failures, below_threshold = _build_all(wanted, source, tmp, context, parity, thresholds, report, meta)
        report.failed = {name: _one_line(text) for name, text in failures.items()}
        if failures and (strict or not meta["artifacts"]):
            table = report.table() if report.results else "(no artifact was verified)"
            hint = (
                "\nIf the measured agreement is acceptable, lower the threshold with --min-agreement FORMAT=VALUE."
                if below_threshold else ""
            )
            why = " (--strict: every format must pass)" if strict and meta["artifacts"] else ""
            raise ExportError(
                f"export of run {str(source.run.path)!r} failed{why}; nothing was written to {str(base)!r}:\n  "
                + "\n  ".join(f"{name}: {text}" for name, text in failures.items()) + f"\n{table}{hint}"
            )
        if report.failed:
            meta["failed"] = report.failed
        meta["notes"] = report.notes
        write_json(tmp / METADATA_FILE, meta)
        write_model_card(source, report, tmp)  # model_card.md: data, metrics, baselines, parity (Hub layout)
        report.out_dir = str(_commit(tmp, base, report))
        return report
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            if made_base and not any(base.iterdir()):
                with contextlib.suppress(OSError):
                    base.rmdir()  # a first export that failed leaves no empty model folder either


def _build_all(
    wanted: list[ExportFormat],
    source: ExportSource,
    tmp: Path,
    context: ExportContext,
    parity: list[np.ndarray],
    thresholds: dict[str, float],
    report: ExportReport,
    meta: dict[str, Any],
) -> tuple[dict[str, str], bool]:
    """Writes and verifies each format in a scratch folder of ``tmp`` and moves the ones that
    pass into ``tmp``; returns the failures (format -> reason) and whether any was a parity miss."""
    references: dict[str, list[np.ndarray]] = {}
    failures: dict[str, str] = {}
    below_threshold = False
    for fmt in wanted:
        stage = tmp / f".build-{safe_name(fmt.name)}"
        stage.mkdir()
        try:
            info = {"path": fmt.file, **fmt.write(fmt, source, stage, context)}
            result, runtime = verify(fmt, stage, source, parity, references, thresholds[fmt.name], info)
        except TlkitError as exc:
            failures[fmt.name] = str(exc)
            shutil.rmtree(stage, ignore_errors=True)
            continue
        except Exception as exc:  # converters raise many kinds; report them all as one
            failures[fmt.name] = f"{type(exc).__name__}: {first_line(exc)}"
            shutil.rmtree(stage, ignore_errors=True)
            continue
        if runtime:
            report.tflite_runtime = runtime
        report.results.append(result)
        info["parity"] = {
            "max_abs_diff": result.max_abs_diff, "top1_agreement": result.top1_agreement,
            "samples": result.samples, "split": report.parity_split, "latency_ms": result.latency_ms,
            "min_agreement": result.min_agreement,
        }
        if result.tasks is not None:  # a multi-task model: every task's agreement
            info["parity"]["tasks"] = result.tasks
        if not result.passed:
            below_threshold = True
            lead = next((n for n in result.notes.split("; ") if "disagreement" in n), "")
            failures[fmt.name] = (
                f"top-1 agreement {result.top1_agreement:.3f} with the Keras model is below "
                f"{result.min_agreement:.3f} (max |dp| {result.max_abs_diff:.3g}, {result.samples} examples)"
                + (f"\n    {lead}" if lead else "")
            )
            shutil.rmtree(stage, ignore_errors=True)
            continue
        meta["artifacts"][fmt.name] = info
        for part in stage.iterdir():
            if part.name != METADATA_FILE:  # the reload's own metadata; the version gets the full one
                os.replace(part, tmp / part.name)
        shutil.rmtree(stage, ignore_errors=True)
    return failures, below_threshold


def _one_line(text: str, limit: int = 300) -> str:
    """The first line of a failure, cut to ``limit`` characters (converter errors run to pages)."""
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


def remove_stale_temporaries(base: Path, *, now: float | None = None) -> list[str]:
    """Removes the ``.tmp-export-*`` directories in ``base`` that no running export owns.

    Stale: written on this host by a process that is gone, or untouched (no entry in it
    modified) for :data:`STALE_AFTER_S` seconds. Returns the names removed.
    """
    now = time.time() if now is None else now
    removed = []
    for path in sorted(base.glob(f"{TMP_PREFIX}*")):
        if path.is_dir() and _is_stale(path, now):
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path.name)
    return removed


def _is_stale(path: Path, now: float) -> bool:
    try:
        touched = max([path.stat().st_mtime, *(p.stat().st_mtime for p in path.iterdir())])
    except OSError:
        return False  # vanished meanwhile (its export finished): not ours to remove
    if now - touched > STALE_AFTER_S:
        return True
    # .tmp-export-<host>-<pid>-<id>, or .tmp-export-<pid>-<id> from tlkit before the host was recorded
    parts = path.name[len(TMP_PREFIX):].split("-")
    host, pid = "-".join(parts[:-2]) or socket.gethostname(), parts[-2] if len(parts) >= 2 else ""
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's export (a shared disk), or a name not ours: only the age tells
    return not _process_alive(int(pid))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _commit(tmp: Path, base: Path, report: ExportReport) -> Path:
    """Renames ``tmp`` to the next free version number (never onto an existing version)."""
    for _ in range(100):
        version = _next_version(base)
        report.version = version
        report.out_dir = str(base / str(version))
        write_json(tmp / REPORT_FILE, report.to_dict())
        final = base / str(version)
        try:
            # mkdir claims the number atomically (a racing export gets FileExistsError and
            # takes the next one); the rename below then replaces only our own empty claim.
            final.mkdir()
        except FileExistsError:
            continue
        try:
            os.replace(tmp, final)
        except OSError:
            final.rmdir()
            continue
        return final
    raise ExportError(f"could not claim a new version directory under {str(base)!r} (too many concurrent exports?)")


def _next_version(base: Path) -> int:
    numbers = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] if base.is_dir() else []
    return max(numbers, default=0) + 1


def _resolve_formats(formats: Sequence[str] | str | None, source: ExportSource) -> tuple[list[ExportFormat], dict[str, str]]:
    """The records to build, in registry order, and the requested ones skipped (with the reason)."""
    if formats is None:
        requested = list(FORMATS)
    else:
        requested = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    unknown = sorted(set(requested) - set(FORMATS))
    if unknown or not requested:
        raise ConfigError(f"unknown export format(s) {unknown or requested}; choose from {', '.join(FORMATS)}")
    wanted: list[ExportFormat] = []
    skipped: dict[str, str] = {}
    for name in (n for n in FORMATS if n in requested):
        fmt = get_format(name)
        if fmt.applies_to(source):
            wanted.append(fmt)
        else:
            why = fmt.why_not(source) if fmt.why_not is not None else ""
            skipped[name] = why or fmt.not_applicable or "does not apply to this run"
    return wanted, skipped


def _thresholds(min_agreement: float | Mapping[str, float] | None) -> dict[str, float]:
    thresholds = {name: fmt.min_agreement for name, fmt in FORMATS.items()}
    if isinstance(min_agreement, Mapping):
        unknown = sorted(set(min_agreement) - set(FORMATS))
        if unknown:
            raise ConfigError(f"min_agreement names unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
        thresholds.update({k: float(v) for k, v in min_agreement.items()})
    elif min_agreement is not None:
        thresholds = {k: float(min_agreement) for k in thresholds}
    bad = {k: v for k, v in thresholds.items() if not 0.0 <= v <= 1.0}
    if bad:
        raise ConfigError(f"min_agreement values must be between 0 and 1, got {bad}")
    return thresholds


def _base_metadata(source: ExportSource, report: ExportReport) -> dict[str, Any]:
    return {
        "name": source.name,
        **source.contract_metadata(),  # labels, modality, sample_rate and, for audio, audio_windows
        "created": report.created,
        "source_run": {
            "path": report.run_dir,
            "name": source.name,
            "backbone": source.status.get("backbone") or source.config.get("backbone", {}).get("name"),
            "image_size": source.status.get("image_size"),
            "test_metrics": source.status.get("test_metrics", {}),
            "multi_label": source.multi_label,
        },
        "artifacts": {},
        "versions": report.versions,
    }
