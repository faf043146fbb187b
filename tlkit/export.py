"""Export a finished run for deployment: SavedModel, ``.keras`` and TFLite, each verified.

``export_run(run_dir)`` (``tlkit export RUN_DIR``) writes one *version directory*::

    saved_models/<name>/<version>/          (or <out>/<version>/; version = next free integer)
        saved_model.pb, variables/, ...     SavedModel; signature ``serving_default``
        keras_model.keras                   the Keras model (loads with safe_mode=True)
        model_fp32.tflite                   TFLite, float32
        model_fp16.tflite                   TFLite, float16 weights
        model_dynamic.tflite                TFLite, dynamic-range (int8 weights, float activations)
        model_int8.tflite                   TFLite, full-integer int8 (calibrated on training data)
                                            (both int8 variants bias-corrected, see _bias_corrections)
        labels.txt                          class names, one a line, in output order
        metadata.json                       labels, input contract per artifact, parity, versions, source run
        export_report.json                  the parity table (also returned as :class:`ExportReport`)

The version directory is itself a SavedModel directory, so TensorFlow Serving can serve
``saved_models/<name>`` as its model base path. Everything is built in a hidden sibling
directory (``.tmp-export-*``) and renamed into place only after every artifact has been
reloaded and has matched the Keras model on held-out examples; a failed export leaves
no version directory behind and an existing version is never overwritten.

Input contracts (also written to ``metadata.json``):

* SavedModel ``serving_default``: ``image`` uint8 (B, H, W, 3) RGB of any H, W, or for
  audio models ``waveform`` float32 (B, samples) in -1..1 at the model's sample rate.
  Outputs ``probabilities`` float32 (B, C), ``labels`` string (B, k) and ``scores``
  float32 (B, k), the top k = min(5, C) classes, best first.
* ``.keras``: the run's model: float32 (B, H, W, 3) pixels 0..255 of any size (or waveforms).
* TFLite: a fixed input of one example at the run's ``image_size``: float32
  (1, H, W, 3) pixels 0..255 (resize first; the predictors here do it with the same
  bilinear resize the Keras model uses), or (1, samples) for audio with
  ``samples = clip_seconds * sample_rate``. Float input was chosen over uint8 so that
  every TFLite variant takes the same tensor as the Keras model; with ``int8_io`` the
  int8 model takes and returns int8 tensors instead, quantized with the scale and
  zero point written to ``metadata.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import shutil
import time
import uuid
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.errors import ConfigError, ExportError, TlkitError

FORMATS = ("savedmodel", "keras", "tflite-fp32", "tflite-fp16", "tflite-dynamic", "tflite-int8")
"""Every export format, in the order they are built."""

DEFAULT_MIN_AGREEMENT: dict[str, float] = {
    "savedmodel": 0.99,
    "keras": 0.99,
    "tflite-fp32": 0.99,
    "tflite-fp16": 0.99,
    "tflite-dynamic": 0.9,
    "tflite-int8": 0.9,
}
"""Lowest top-1 agreement with the Keras model each format must reach on the parity sample."""

TFLITE_FILES = {
    "tflite-fp32": "model_fp32.tflite",
    "tflite-fp16": "model_fp16.tflite",
    "tflite-dynamic": "model_dynamic.tflite",
    "tflite-int8": "model_int8.tflite",
}
# Not "model.keras": tlkit.predict takes a directory holding model.keras for a run directory.
KERAS_FILE = "keras_model.keras"
METADATA_FILE = "metadata.json"
LABELS_FILE = "labels.txt"
REPORT_FILE = "export_report.json"
SIGNATURE = "serving_default"
MAX_TOP_K = 5

# Representative data for int8 calibration: one example each, shaped like the TFLite
# input without its batch axis: (H, W, 3) float32 pixels 0..255 at the run's image_size,
# or (samples,) float32 for audio.
RepresentativeData = Iterable[np.ndarray]


@dataclass
class FormatResult:
    """Parity of one exported artifact with the run's Keras model.

    Attributes:
        format: one of :data:`FORMATS`.
        path: the artifact, relative to the version directory (``"."`` for the SavedModel).
        size_bytes: bytes on disk (the SavedModel: its own files only).
        max_abs_diff: max |p_export - p_keras| over the parity sample and all classes.
        top1_agreement: fraction of parity examples where both pick the same class.
        latency_ms: median wall time of one ``predict_one`` call (one example, this machine).
        min_agreement: the threshold ``top1_agreement`` had to reach.
        samples: number of parity examples.
        passed: ``top1_agreement >= min_agreement``.
        notes: anything worth knowing (quantization, runtime used).
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


@dataclass
class ExportReport:
    """What :func:`export_run` did.

    Attributes:
        run_dir: the source run directory.
        name: the model name (the run's ``name``).
        version: the version number written (or that would have been written, on failure).
        out_dir: the version directory (it exists only when the export succeeded).
        results: one :class:`FormatResult` per exported format, in build order.
        skipped: formats not exported, with the reason.
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
    parity_split: str = ""
    calibration_samples: int = 0
    tflite_runtime: str = ""
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def result(self, fmt: str) -> FormatResult:
        """The result of one format (KeyError when it was not exported)."""
        for r in self.results:
            if r.format == fmt:
                return r
        raise KeyError(fmt)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """The parity table as plain text (format, file, size, max |dp|, agreement, latency)."""
        from tlkit.text import format_table

        rows = [
            (
                r.format, r.path, _human_size(r.size_bytes), f"{r.max_abs_diff:.2e}",
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
        for note in self.notes:
            text += f"\nnote: {note}"
        return text


# --------------------------------------------------------------------------- predictors


@dataclass
class SavedModelPredictor:
    """An exported SavedModel directory as a :class:`tlkit.predict.Predictor`.

    ``predict_one`` takes one raw example, (H, W, 3) pixels 0..255 (any size; rounded to
    uint8) or a (samples,) waveform, and returns (C,) float32 probabilities.
    """

    path: str
    labels: list[str]
    input_name: str = "image"
    _fn: Any = field(default=None, repr=False)
    _loaded: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import tensorflow as tf

        self._loaded = tf.saved_model.load(self.path)
        if SIGNATURE not in self._loaded.signatures:
            raise ExportError(f"SavedModel {self.path!r} has no {SIGNATURE!r} signature; re-export it with tlkit")
        self._fn = self._loaded.signatures[SIGNATURE]

    def prepare(self, example: np.ndarray) -> np.ndarray:
        """The example as the Keras model sees it (identity: any size is accepted)."""
        return example

    def predict_one(self, example: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        if self.input_name == "image":
            batch = tf.constant(np.clip(np.rint(example), 0, 255).astype(np.uint8)[None])
        else:
            batch = tf.constant(np.asarray(example, np.float32)[None])
        return np.asarray(self._fn(**{self.input_name: batch})["probabilities"])[0]


@dataclass
class TFLitePredictor:
    """A ``.tflite`` file as a :class:`tlkit.predict.Predictor`.

    ``predict_one`` takes one raw example, (H, W, 3) pixels 0..255 of any size (resized to
    the model's fixed size with the Keras model's bilinear resize) or a (samples,)
    waveform (cropped or zero-padded to the fixed length), and returns (C,) float32
    probabilities (dequantized when the model has int8 outputs).
    """

    path: str
    labels: list[str]
    num_threads: int = 1
    runtime: str = ""
    _interpreter: Any = field(default=None, repr=False)
    _input: dict[str, Any] = field(default_factory=dict, repr=False)
    _output: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._interpreter, self.runtime = _make_interpreter(self.path, self.num_threads)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]
        self._output = self._interpreter.get_output_details()[0]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The fixed input shape including the batch axis, e.g. (1, 224, 224, 3)."""
        return tuple(int(v) for v in self._input["shape"])

    def prepare(self, example: np.ndarray) -> np.ndarray:
        """One raw example fitted to the fixed input size (float32, no batch axis)."""
        return _fit_fixed(np.asarray(example, np.float32), self.input_shape[1:])

    def predict_one(self, example: np.ndarray) -> np.ndarray:
        x = self.prepare(example)[None]
        scale, zero_point = self._input["quantization"]
        dtype = self._input["dtype"]
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            x = np.clip(np.rint(x / scale + zero_point), info.min, info.max)
        self._interpreter.set_tensor(self._input["index"], x.astype(dtype))
        self._interpreter.invoke()
        y = self._interpreter.get_tensor(self._output["index"])[0]
        scale, zero_point = self._output["quantization"]
        if np.issubdtype(y.dtype, np.integer):
            y = (y.astype(np.float32) - zero_point) * scale
        return y.astype(np.float32)


@dataclass
class KerasFilePredictor:
    """An exported ``keras_model.keras`` (loaded with safe_mode=True) as a predictor."""

    path: str
    labels: list[str]
    _model: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        import keras

        _register_tlkit_layers()
        self._model = keras.saving.load_model(self.path, safe_mode=True, compile=False)

    def prepare(self, example: np.ndarray) -> np.ndarray:
        return example

    def predict_one(self, example: np.ndarray) -> np.ndarray:
        return np.asarray(self._model(np.asarray(example, np.float32)[None], training=False))[0]


def load_exported_predictor(path: str | Path) -> SavedModelPredictor | TFLitePredictor | KerasFilePredictor | None:
    """A predictor for an exported artifact, or ``None`` when ``path`` is not one.

    Recognised: a SavedModel directory with ``saved_model.pb`` and ``metadata.json`` (a
    version directory written by :func:`export_run`), a ``.tflite`` file, or a ``.keras``
    file, each with ``metadata.json`` or ``labels.txt`` beside it for the class names.
    The predictor has ``.labels`` and ``.predict_one(example) -> (C,) probabilities``,
    where ``example`` is (H, W, 3) float pixels 0..255 of any size, or a (samples,) waveform.

    Raises:
        ExportError: the artifact is recognised but its labels cannot be found.
    """
    p = Path(path)
    if p.is_dir() and (p / "saved_model.pb").is_file() and (p / METADATA_FILE).is_file():
        meta = _read_json(p / METADATA_FILE)
        spec = meta.get("artifacts", {}).get("savedmodel", {}).get("input", {})
        return SavedModelPredictor(str(p), _labels_beside(p / "saved_model.pb"), input_name=spec.get("name", "image"))
    if p.is_file() and p.suffix == ".tflite":
        return TFLitePredictor(str(p), _labels_beside(p))
    if p.is_file() and p.suffix == ".keras" and ((p.parent / METADATA_FILE).is_file() or (p.parent / LABELS_FILE).is_file()):
        return KerasFilePredictor(str(p), _labels_beside(p))
    return None


def _labels_beside(artifact: Path) -> list[str]:
    meta_path = artifact.parent / METADATA_FILE
    if meta_path.is_file():
        labels = _read_json(meta_path).get("labels")
        if isinstance(labels, list) and labels:
            return [str(v) for v in labels]
    labels_path = artifact.parent / LABELS_FILE
    if labels_path.is_file():
        return [line for line in labels_path.read_text(encoding="utf-8").splitlines() if line]
    raise ExportError(
        f"no class names for {str(artifact)!r}: expected {METADATA_FILE} or {LABELS_FILE} beside it "
        "(copy them along with the model file)"
    )


def _make_interpreter(path: str, num_threads: int) -> tuple[Any, str]:
    """A LiteRT interpreter, or TensorFlow's deprecated ``tf.lite.Interpreter`` without it."""
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter(model_path=path, num_threads=num_threads), "ai_edge_litert"
    except ImportError:
        import tensorflow as tf

        with warnings.catch_warnings():
            # tf.lite.Interpreter warns it is deprecated; it is the documented fallback here.
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter(model_path=path, num_threads=num_threads), "tf.lite (deprecated)"


def _fit_length(waveform: np.ndarray, length: int) -> np.ndarray:
    """The centre ``length`` samples of a (samples,) waveform, zero-padded equally on both
    sides when it is shorter (the single crop of ``tlkit.data.audio.fixed_crops``)."""
    wave = np.asarray(waveform, np.float32).reshape(-1)
    if wave.shape[0] < length:
        left = (length - wave.shape[0]) // 2
        return np.pad(wave, (left, length - wave.shape[0] - left))
    start = (wave.shape[0] - length) // 2
    return wave[start : start + length]


# --------------------------------------------------------------------------- export


@dataclass
class _Source:
    """The run being exported, resolved once."""

    run_dir: Path
    name: str
    model: Any
    labels: list[str]
    modality: str
    input_name: str
    fixed_shape: tuple[int, ...]  # one example, no batch axis
    sample_rate: int | None
    status: dict[str, Any]
    config: dict[str, Any]
    notes: list[str]
    has_savedmodel_backbone: bool


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
) -> ExportReport:
    """Exports a finished run in several formats, verifies each, and writes a new version.

    Args:
        run_dir: a finished run directory (with ``model.keras``, ``labels.json``,
            ``splits.json``, ``run.json``).
        formats: names from :data:`FORMATS` (a list or a comma-separated string);
            ``None`` exports every format that applies (``keras`` is skipped for models
            whose backbone is a SavedModel layer, which cannot load in safe mode).
        out: the directory holding the version folders; default ``saved_models/<name>``
            (relative to the working directory) with ``<name>`` the run's name.
        calibration_samples: training examples used to calibrate the int8 model.
        parity_samples: held-out (val, then test) examples each artifact is checked on.
        min_agreement: top-1 agreement each format must reach: one number for all, or a
            mapping format -> number; missing formats use :data:`DEFAULT_MIN_AGREEMENT`.
        int8_io: the int8 TFLite model takes and returns int8 tensors (quantized with the
            scale / zero point in ``metadata.json``) instead of float32.
        representative_data: replaces the calibration examples drawn from the training
            split: each item one example shaped like the TFLite input without its batch
            axis, (H, W, 3) float32 pixels 0..255 at the run's image size (or (samples,)).
        bias_correction: before converting ``tflite-dynamic`` and ``tflite-int8``, shift
            the bias (or the following BatchNorm's mean) of every Keras convolution and
            Dense layer by the mean error its int8-rounded weights cause on the
            calibration examples (see :func:`_bias_corrections`). The Keras model itself
            is left unchanged. ``False`` converts the weights as they are.

    Returns:
        An :class:`ExportReport`; the artifacts are in ``report.out_dir``.

    Raises:
        ExportError: a conversion failed, or an artifact's top-1 agreement with the
            Keras model is below its threshold. Nothing is left on disk in that case.
        ConfigError: ``run_dir`` is not a finished run, or a format name is unknown.
    """
    if calibration_samples < 1 or parity_samples < 1:
        raise ConfigError(
            f"calibration_samples and parity_samples must be >= 1, got {calibration_samples} and {parity_samples}"
        )
    source = _load_source(Path(run_dir))
    wanted, skipped = _resolve_formats(formats, source)
    thresholds = _thresholds(min_agreement)
    base = (Path(out) if out is not None else Path("saved_models") / _safe_name(source.name)).absolute()
    made_base = not base.exists()
    base.mkdir(parents=True, exist_ok=True)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    report = ExportReport(
        run_dir=str(source.run_dir.resolve()), name=source.name, version=_next_version(base),
        out_dir="", skipped=skipped, created=created, versions=_versions(), notes=source.notes,
    )
    tmp = base / f".tmp-export-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        parity, report.parity_split = _parity_examples(source, parity_samples)
        meta = _base_metadata(source, report)
        (tmp / LABELS_FILE).write_text("\n".join(source.labels) + "\n", encoding="utf-8")
        references: dict[str, list[np.ndarray]] = {}
        failures: list[str] = []
        below_threshold = False
        cached: list[list[np.ndarray]] = []

        def calibration() -> list[np.ndarray]:
            """The calibration examples, read once and shared by every quantized format."""
            if not cached:
                if representative_data is not None:
                    examples = [np.asarray(x, np.float32) for x in representative_data]
                else:
                    examples = _calibration_examples(source, calibration_samples)
                _check_calibration(examples, source.fixed_shape)
                cached.append(examples)
                report.calibration_samples = len(examples)
            return cached[0]

        for fmt in wanted:
            try:
                artifact, info = _write_artifact(fmt, source, tmp, calibration, int8_io, bias_correction)
                result, runtime = _verify(fmt, artifact, tmp, source, parity, references, thresholds[fmt], info)
            except TlkitError as exc:
                failures.append(f"{fmt}: {exc}")
                continue
            except Exception as exc:  # converters raise many kinds; report them all as one
                failures.append(f"{fmt}: {type(exc).__name__}: {_first_line(exc)}")
                continue
            if runtime:
                report.tflite_runtime = runtime
            report.results.append(result)
            info["parity"] = {
                "max_abs_diff": result.max_abs_diff, "top1_agreement": result.top1_agreement,
                "samples": result.samples, "split": report.parity_split, "latency_ms": result.latency_ms,
                "min_agreement": result.min_agreement,
            }
            meta["artifacts"][fmt] = info
            if not result.passed:
                below_threshold = True
                lead = next((n for n in result.notes.split("; ") if "disagreement" in n), "")
                failures.append(
                    f"{fmt}: top-1 agreement {result.top1_agreement:.3f} with the Keras model is below "
                    f"{result.min_agreement:.3f} (max |dp| {result.max_abs_diff:.3g}, {result.samples} examples)"
                    + (f"\n    {lead}" if lead else "")
                )
        if failures:
            table = report.table() if report.results else "(no artifact was verified)"
            hint = (
                "\nIf the measured agreement is acceptable, lower the threshold with --min-agreement FORMAT=VALUE."
                if below_threshold else ""
            )
            raise ExportError(
                f"export of run {str(source.run_dir)!r} failed; nothing was written to {str(base)!r}:\n  "
                + "\n  ".join(failures) + f"\n{table}{hint}"
            )
        meta["notes"] = report.notes
        _write_json(tmp / METADATA_FILE, meta)
        final = _commit(tmp, base, report)
        report.out_dir = str(final)
        return report
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            if made_base and not any(base.iterdir()):
                with contextlib.suppress(OSError):
                    base.rmdir()  # a first export that failed leaves no empty model folder either


def _commit(tmp: Path, base: Path, report: ExportReport) -> Path:
    """Renames ``tmp`` to the next free version number (never onto an existing version)."""
    for _ in range(100):
        version = _next_version(base)
        report.version = version
        report.out_dir = str(base / str(version))
        _write_json(tmp / REPORT_FILE, report.to_dict())
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
    versions = [int(p.name) for p in base.iterdir() if p.is_dir() and p.name.isdigit()] if base.is_dir() else []
    return max(versions, default=0) + 1


def _resolve_formats(formats: Sequence[str] | str | None, source: _Source) -> tuple[list[str], dict[str, str]]:
    if formats is None:
        requested = list(FORMATS)
    else:
        requested = [f.strip() for f in (formats.split(",") if isinstance(formats, str) else formats) if f.strip()]
    unknown = sorted(set(requested) - set(FORMATS))
    if unknown or not requested:
        raise ConfigError(f"unknown export format(s) {unknown or requested}; choose from {', '.join(FORMATS)}")
    skipped: dict[str, str] = {}
    wanted = [f for f in FORMATS if f in requested]
    if "keras" in wanted and source.has_savedmodel_backbone:
        wanted.remove("keras")
        skipped["keras"] = (
            "the backbone is a SavedModel layer (TFSMLayer), which Keras refuses to load with "
            "safe_mode=True; deploy the SavedModel or a TFLite file instead"
        )
    return wanted, skipped


def _thresholds(min_agreement: float | Mapping[str, float] | None) -> dict[str, float]:
    thresholds = dict(DEFAULT_MIN_AGREEMENT)
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


# --------------------------------------------------------------------------- the run


def _register_tlkit_layers() -> None:
    """Imports the modules that register tlkit's serializable layers."""
    import tlkit.backbones.hub  # noqa: F401
    import tlkit.frontends  # noqa: F401
    import tlkit.layers  # noqa: F401
    import tlkit.model  # noqa: F401  (AttentionPooling)

    try:
        import tlkit.backbones.whisper  # noqa: F401
    except ImportError:  # an optional backbone family; only its own runs need it
        pass


def _load_source(run: Path) -> _Source:
    import keras

    model_path = run / "model.keras"
    if not (run / "config.json").is_file() or not model_path.is_file():
        raise ConfigError(
            f"{str(run)!r} is not a finished tlkit run (needs config.json and model.keras); "
            "finish it with `tlkit train` first"
        )
    config = _read_json(run / "config.json")
    status = _read_json(run / "run.json") if (run / "run.json").is_file() else {}
    labels = [str(v) for v in _read_json(run / "labels.json")]
    _register_tlkit_layers()
    notes: list[str] = []
    try:
        model = keras.saving.load_model(model_path, safe_mode=True, compile=False)
    except ValueError as exc:
        if "TFSMLayer" not in str(exc):
            raise ExportError(f"cannot load {str(model_path)!r} with safe_mode=True: {_first_line(exc)}") from exc
        # The run's own backbone is a SavedModel layer, which safe mode refuses by rule.
        # Load it unsafely only when nothing else in the file needs it (no Lambda layers).
        unsafe = _unsafe_entries(model_path)
        if unsafe:
            raise ExportError(
                f"{str(model_path)!r} holds a SavedModel backbone and also {unsafe}; refusing to load it "
                "with safe_mode=False"
            ) from exc
        model = keras.saving.load_model(model_path, safe_mode=False, compile=False)
        notes.append(
            "model.keras loaded with safe_mode=False because its backbone is a SavedModel layer "
            "(the file holds no Lambda layers)"
        )
    from keras.layers import TFSMLayer

    has_sm = any(isinstance(layer, TFSMLayer) for layer in _all_layers(model))
    input_name = model.inputs[0].name if model.inputs else "image"
    modality = "audio" if input_name == "waveform" or len(model.inputs[0].shape) == 2 else "image"
    sample_rate = (status.get("sample_rate") or _sample_rate(model, config)) if modality == "audio" else None
    if modality == "image":
        size = status.get("image_size") or _model_image_size(model)
        fixed: tuple[int, ...] = (int(size[0]), int(size[1]), 3)
    else:
        if not sample_rate:
            raise ExportError(
                f"run {str(run)!r} holds an audio model but its sample rate is unknown (no sample_rate in "
                "run.json, no front-end layer with one, backbone not in the registry); register the backbone first"
            )
        seconds = float(status.get("clip_seconds") or config.get("data", {}).get("clip_seconds", 5.0))
        fixed = (max(1, int(round(seconds * sample_rate))),)
    return _Source(
        run_dir=run, name=str(config.get("name") or run.name), model=model, labels=labels, modality=modality,
        input_name="image" if modality == "image" else "waveform", fixed_shape=fixed, sample_rate=sample_rate,
        status=status, config=config, notes=notes, has_savedmodel_backbone=has_sm,
    )


def _unsafe_entries(model_path: Path) -> list[str]:
    """What in a ``.keras`` file, besides SavedModel layers, would run code on load."""
    with zipfile.ZipFile(model_path) as archive:
        config = json.loads(archive.read("config.json").decode("utf-8"))
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("class_name") == "Lambda":
                found.add("Lambda layers")
            if node.get("class_name") == "__lambda__":
                found.add("serialized Python lambdas")
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(config)
    return sorted(found)


def _all_layers(layer: Any) -> list[Any]:
    found = []
    for sub in getattr(layer, "layers", []):
        found.append(sub)
        found.extend(_all_layers(sub))
    return found


def _model_image_size(model: Any) -> tuple[int, int]:
    try:
        resize = model.get_layer("resize")
        return int(resize.height), int(resize.width)
    except ValueError as exc:
        raise ExportError("the run has no image_size in run.json and its model has no 'resize' layer") from exc


def _sample_rate(model: Any, config: dict[str, Any]) -> int | None:
    for layer in _all_layers(model):
        rate = getattr(layer, "sample_rate", None)
        if rate:
            return int(rate)
    try:
        from tlkit.backbones.registry import get as get_spec

        spec = get_spec(config.get("backbone", {}).get("name", ""))
        return spec.sample_rate or getattr(spec.preprocessing, "sample_rate", None)
    except TlkitError:
        return None


def _parity_examples(source: _Source, count: int) -> tuple[list[np.ndarray], str]:
    """Up to ``count`` raw held-out examples: val then test (training examples only if none)."""
    from tlkit.run import load_split

    held_out = []
    names = []
    for split in ("val", "test"):
        examples, _ = load_split(source.run_dir, split)
        if examples:
            names.append(split)
        held_out.extend(examples)
    where = "+".join(names)
    if not held_out:
        held_out, _ = load_split(source.run_dir, "train")
        where = "train"
        source.notes.append("the run has no val/test examples; parity was measured on training examples")
    if not held_out:
        raise ExportError(f"run {str(source.run_dir)!r} lists no examples in splits.json to check parity on")
    chosen = _sample(held_out, count)
    return [_load_raw(e.path, source) for e in chosen], where


def _calibration_examples(source: _Source, count: int) -> list[np.ndarray]:
    """Up to ``count`` training examples fitted to the fixed TFLite input (no batch axis)."""
    from tlkit.run import load_split

    train, _ = load_split(source.run_dir, "train")
    if not train:
        raise ExportError(f"run {str(source.run_dir)!r} has an empty training split; int8 calibration needs examples")
    return [_fit_fixed(_load_raw(e.path, source), source.fixed_shape) for e in _sample(train, count)]


def _sample(items: list[Any], count: int) -> list[Any]:
    if len(items) <= count:
        return list(items)
    order = np.random.default_rng(0).permutation(len(items))[:count]
    return [items[i] for i in sorted(order)]


def _load_raw(path: str, source: _Source) -> np.ndarray:
    """A file as the model's raw input: (H, W, 3) float32 0..255, or (samples,) float32."""
    import tensorflow as tf

    if not Path(path).is_file():
        raise ExportError(f"example {path!r} listed in the run's splits.json is missing; was the data moved?")
    if source.modality == "image":
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return image.numpy().astype(np.float32)
    try:
        from tlkit.data.audio import load_audio
    except ImportError:  # pragma: no cover - a tlkit without the audio data module: WAV only
        audio, rate = tf.audio.decode_wav(tf.io.read_file(path))
        if int(rate) != source.sample_rate:
            raise ExportError(f"{path!r} is sampled at {int(rate)} Hz; the model expects {source.sample_rate} Hz")
        return tf.reduce_mean(audio, axis=-1).numpy().astype(np.float32)
    return load_audio(path, int(source.sample_rate or 0))


def _fit_fixed(example: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """One raw example at a fixed input shape (no batch axis): images resized, audio cropped."""
    if len(shape) == 3:
        if tuple(example.shape[:2]) == tuple(shape[:2]):
            return example
        import tensorflow as tf

        # The same op and options as keras.layers.Resizing (bilinear, no antialias), so the
        # resize before a TFLite model gives what the Keras model computes inside.
        return tf.image.resize(example[None], shape[:2], method="bilinear").numpy()[0]
    return _fit_length(example, shape[0])


# --------------------------------------------------------------------------- artifacts


def _write_artifact(
    fmt: str,
    source: _Source,
    tmp: Path,
    calibration: Callable[[], list[np.ndarray]],
    int8_io: bool,
    bias_correction: bool,
) -> tuple[str, dict[str, Any]]:
    """Writes one artifact into ``tmp``; returns its relative path and its metadata entry."""
    if fmt == "savedmodel":
        _write_savedmodel(source, tmp)
        return ".", {"path": ".", "signature": SIGNATURE, "input": _raw_input_spec(source, "uint8"),
                     "outputs": _savedmodel_outputs(source)}
    if fmt == "keras":
        source.model.save(tmp / KERAS_FILE)
        return KERAS_FILE, {
            "path": KERAS_FILE, "input": _raw_input_spec(source, "float32"),
            "outputs": {"probabilities": {"dtype": "float32", "shape": [None, len(source.labels)]}},
            "load": "import tlkit; keras.saving.load_model(path, safe_mode=True)",
        }
    correct = bias_correction and fmt in _INT8_WEIGHTS_MIN_ELEMENTS
    examples = calibration() if fmt == "tflite-int8" or correct else None
    name = TFLITE_FILES[fmt]
    changes: list[tuple[Any, np.ndarray]] = []
    status: Any = "off"
    if correct:
        assert examples is not None
        try:
            changes = _bias_corrections(source.model, examples, _INT8_WEIGHTS_MIN_ELEMENTS[fmt])
            status = {"layers": len(changes), "examples": len(examples)}
        except Exception as exc:  # an optional refinement: an unusual model converts uncorrected
            status = f"not applied ({type(exc).__name__}: {_first_line(exc)})"
    with _applied(changes):
        data = _convert_tflite(source, fmt, examples if fmt == "tflite-int8" else None, int8_io)
    (tmp / name).write_bytes(data)
    info = {"path": name, "quantization": _QUANTIZATION[fmt], **_tflite_io(tmp / name, source)}
    if fmt in _INT8_WEIGHTS_MIN_ELEMENTS:
        info["bias_correction"] = status
    return name, info


_QUANTIZATION = {
    "tflite-fp32": "none (float32)",
    "tflite-fp16": "float16 weights, float32 compute on CPU",
    "tflite-dynamic": "dynamic range: int8 weights, activations quantized on the fly",
    "tflite-int8": "full integer: int8 weights and activations, calibrated on training examples",
}


# The formats whose weights the converter rounds to int8, each with the smallest weight
# tensor it rounds: the dynamic-range quantizer leaves tensors under 1024 elements in float.
_INT8_WEIGHTS_MIN_ELEMENTS = {"tflite-dynamic": 1024, "tflite-int8": 0}
_CORRECTION_BATCH = 16


@contextlib.contextmanager
def _applied(changes: list[tuple[Any, np.ndarray]]) -> Any:
    """Adds each ``delta`` to its variable for the block; the original values are put back on exit."""
    originals = [(variable, variable.numpy()) for variable, _ in changes]
    try:
        for variable, delta in changes:
            variable.assign(variable.numpy() + delta.astype(variable.numpy().dtype))
        yield
    finally:
        for variable, value in originals:
            variable.assign(value)


@contextlib.contextmanager
def _bias_corrected(model: Any, examples: list[np.ndarray], min_elements: int) -> Any:
    """:func:`_bias_corrections` applied to ``model`` for the block; yields the layer count."""
    changes = _bias_corrections(model, examples, min_elements)
    with _applied(changes):
        yield len(changes)


def _bias_corrections(model: Any, examples: list[np.ndarray], min_elements: int) -> list[tuple[Any, np.ndarray]]:
    """Bias correction for int8 weights: ``(variable, delta)`` pairs that remove the mean error.

    The TFLite converter rounds each kernel to int8 per output channel (symmetric,
    ``scale = max|w| / 127``; a following BatchNorm is folded in first, which scales each
    channel and so leaves the rounding unchanged). That rounding error ``dW`` is small
    per weight, but its effect on a layer's output, ``x * dW``, has a non-zero mean
    wherever the inputs do: ReLU6 outputs are positive, and images with flat regions
    (backgrounds, scanned digits) feed the same values at every position. Such a shift is
    the same at every position, so global pooling keeps all of it, and it adds up
    through the network. Here each layer's mean shift ``E[x * dW]`` per output channel is
    measured on the calibration examples (inputs from the float model) and subtracted
    from the layer's bias, or added to the moving mean of the BatchNorm that directly
    follows a layer without bias (Nagel et al. 2019, "Data-Free Quantization Through
    Weight Equalization and Bias Correction", empirical variant).

    Covered: Keras ``Conv1D``, ``Conv2D``, ``DepthwiseConv1D``, ``DepthwiseConv2D`` and
    ``Dense`` layers (channels last, float32 kernels of at least ``min_elements``, one
    call site), also inside nested functional models. Anything else (a SavedModel
    backbone, shared layers) is left as it is.
    """
    import keras

    per_level = _correction_targets(model, min_elements)
    if not any(targets for _, targets, _ in per_level):
        return []
    sums: dict[int, np.ndarray] = {}
    counts: dict[int, int] = {}
    for start in range(0, len(examples), _CORRECTION_BATCH):
        batch = np.stack(examples[start:start + _CORRECTION_BATCH]).astype(np.float32)
        _accumulate_errors(model, batch, per_level, sums, counts, keras)
    changes: list[tuple[Any, np.ndarray]] = []
    for _, targets, _ in per_level:
        for layer, error, bn in targets:
            if id(layer) not in sums:
                continue
            mean = sums[id(layer)] / max(counts[id(layer)], 1)
            if bn is not None:
                changes.append((bn.moving_mean, mean))  # BN subtracts it: (x + e) - (mean + e)
            else:
                changes.append((layer.bias, -mean))
    return changes


def _correction_targets(model: Any, min_elements: int) -> list[tuple[Any, list[tuple[Any, np.ndarray, Any]], list[Any]]]:
    """Per functional (sub)model: ``(model, [(layer, kernel error, BatchNorm or None)], sub-models)``."""
    import keras

    try:
        from keras.src.models.functional import Functional
    except ImportError:  # pragma: no cover - Keras moved it: correct the top level only
        Functional = ()  # type: ignore[assignment]  # noqa: N806

    conv = (keras.layers.Conv1D, keras.layers.Conv2D)
    depthwise = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
    levels: list[tuple[Any, list[tuple[Any, np.ndarray, Any]], list[Any]]] = []

    def walk(m: Any) -> None:
        if len(getattr(m, "inputs", None) or []) != 1:
            return
        targets: list[tuple[Any, np.ndarray, Any]] = []
        children: list[Any] = []
        for layer in m.layers:
            if len(getattr(layer, "_inbound_nodes", [])) != 1:
                continue  # an input layer, or a layer called more than once
            if Functional and isinstance(layer, Functional):
                children.append(layer)
                continue
            if type(layer) not in (*conv, *depthwise, keras.layers.Dense):
                continue
            if getattr(layer, "quantization_mode", None) or str(layer.kernel.dtype) != "float32":
                continue
            if getattr(layer, "data_format", "channels_last") != "channels_last":
                continue
            kernel = np.asarray(layer.kernel.numpy(), np.float64)
            if kernel.size < min_elements:
                continue
            bn = _following_batchnorm(layer, keras)
            if not layer.use_bias and bn is None:
                continue
            if layer.use_bias:
                bn = None
            # Per output channel: the last axis, or (channels, multiplier) for depthwise.
            keep = 2 if isinstance(layer, depthwise) else 1
            axes = tuple(range(kernel.ndim - keep))
            scale = np.max(np.abs(kernel), axis=axes, keepdims=True) / 127.0
            rounded = np.where(scale > 0, np.round(kernel / np.where(scale > 0, scale, 1.0)) * scale, 0.0)
            targets.append((layer, (rounded - kernel).astype(np.float32), bn))
        levels.append((m, targets, children))
        for child in children:
            walk(child)

    walk(model)
    return levels


def _following_batchnorm(layer: Any, keras: Any) -> Any:
    """The BatchNormalization (over the channel axis) that alone consumes a linear layer's output."""
    if getattr(getattr(layer, "activation", None), "__name__", "") != "linear":
        return None
    outbound = getattr(layer, "_outbound_nodes", [])
    if len(outbound) != 1:
        return None
    bn = outbound[0].operation
    if not isinstance(bn, keras.layers.BatchNormalization) or len(getattr(bn, "_inbound_nodes", [])) != 1:
        return None
    rank = len(layer.output.shape)
    return bn if bn.axis in (-1, rank - 1) else None


def _accumulate_errors(
    m: Any,
    batch: Any,
    per_level: list[tuple[Any, list[tuple[Any, np.ndarray, Any]], list[Any]]],
    sums: dict[int, np.ndarray],
    counts: dict[int, int],
    keras: Any,
) -> None:
    """Adds, per target layer of ``m`` (and of its sub-models), the summed output error of one batch."""
    level = next((entry for entry in per_level if entry[0] is m), None)
    if level is None:
        return
    _, targets, children = level
    layers = [t[0] for t in targets] + children
    if not layers:
        return
    probe = keras.Model(m.inputs[0], [layer._inbound_nodes[0].input_tensors[0] for layer in layers])
    values = probe(batch, training=False)
    values = values if isinstance(values, (list, tuple)) else [values]
    for (layer, error, _), x in zip(targets, values[: len(targets)]):
        if isinstance(layer, keras.layers.Dense):
            y = keras.ops.matmul(x, error)
        elif isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)):
            y = keras.ops.depthwise_conv(x, error, strides=layer.strides, padding=layer.padding,
                                         data_format="channels_last", dilation_rate=layer.dilation_rate)
        else:
            y = layer.convolution_op(x, error)
        y = np.asarray(keras.ops.convert_to_numpy(y), np.float64)
        flat = y.reshape(-1, y.shape[-1])
        sums[id(layer)] = sums.get(id(layer), 0.0) + flat.sum(axis=0)
        counts[id(layer)] = counts.get(id(layer), 0) + flat.shape[0]
    for child, x in zip(children, values[len(targets):]):
        _accumulate_errors(child, x, per_level, sums, counts, keras)


def _check_calibration(calibration: list[np.ndarray], shape: tuple[int, ...]) -> None:
    if not calibration:
        raise ExportError("the int8 calibration set is empty; give at least one representative example")
    for index, example in enumerate(calibration):
        if tuple(example.shape) != shape:
            what = "float32 pixels 0..255 at the run's image_size" if len(shape) == 3 else "waveform samples"
            raise ExportError(
                f"representative example {index} has shape {tuple(example.shape)}; the int8 model's input "
                f"needs {shape} ({what}), one example per item without a batch axis"
            )
        if not np.all(np.isfinite(example)):
            raise ExportError(f"representative example {index} holds NaN or infinite values")


def _raw_input_spec(source: _Source, image_dtype: str) -> dict[str, Any]:
    if source.modality == "image":
        return {"name": "image", "dtype": image_dtype, "shape": [None, None, None, 3], "range": [0, 255],
                "layout": "RGB, channels last, any height and width (resized inside the model)"}
    return {"name": "waveform", "dtype": "float32", "shape": [None, None], "range": [-1.0, 1.0],
            "sample_rate": source.sample_rate, "layout": "mono"}


def _savedmodel_outputs(source: _Source) -> dict[str, Any]:
    k = min(MAX_TOP_K, len(source.labels))
    return {
        "probabilities": {"dtype": "float32", "shape": [None, len(source.labels)]},
        "labels": {"dtype": "string", "shape": [None, k], "meaning": f"top {k} class names, best first"},
        "scores": {"dtype": "float32", "shape": [None, k], "meaning": "their probabilities"},
    }


def _serving_module(source: _Source) -> Any:
    """A ``tf.Module`` whose ``serve`` takes raw input and returns probabilities and top labels."""
    import tensorflow as tf

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


def _write_savedmodel(source: _Source, directory: Path) -> None:
    import tensorflow as tf

    module = _serving_module(source)
    tf.saved_model.save(module, str(directory), signatures={SIGNATURE: module.serve})


def _convert_tflite(source: _Source, fmt: str, calibration: list[np.ndarray] | None, int8_io: bool) -> bytes:
    """The TFLite flatbuffer of the model at the fixed input size (batch 1, float32 input)."""
    import tensorflow as tf

    model = source.model

    class Fixed(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="tlkit_tflite")
            self.model = model

        @tf.function(input_signature=[tf.TensorSpec([1, *source.fixed_shape], tf.float32, name=source.input_name)])
        def serve(self, raw: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"probabilities": self.model(raw, training=False)}

    module = Fixed()
    function = module.serve.get_concrete_function()
    try:
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    except ImportError:  # pragma: no cover - TF moved it; the converter's own freezing path follows
        converter = tf.lite.TFLiteConverter.from_concrete_functions([function])
    else:
        # Freeze the weights into constants first. Handing the converter the live function
        # (its SavedModel path) left some models with READ_VARIABLE ops reading uninitialised
        # variables: wrong outputs in fp32 and no weight quantization.
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [convert_variables_to_constants_v2(function)], module
        )
    if fmt != "tflite-fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if fmt == "tflite-fp16":
        converter.target_spec.supported_types = [tf.float16]
    if fmt == "tflite-int8":
        assert calibration is not None

        def representative() -> Iterable[list[np.ndarray]]:
            for example in calibration:
                yield [example[None].astype(np.float32)]

        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if int8_io:
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
    try:
        with warnings.catch_warnings():
            # Emitted for float-input models under Optimize.DEFAULT; the inputs stay float on purpose.
            warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
            return converter.convert()
    except Exception as exc:
        raise ExportError(f"TFLite conversion failed: {type(exc).__name__}: {_first_line(exc)}") from exc


def _tflite_io(path: Path, source: _Source) -> dict[str, Any]:
    interpreter, _ = _make_interpreter(str(path), 1)
    entry: dict[str, Any] = {}
    for key, details in (("input", interpreter.get_input_details()[0]), ("output", interpreter.get_output_details()[0])):
        dtype = np.dtype(details["dtype"]).name
        spec: dict[str, Any] = {"name": source.input_name if key == "input" else "probabilities",
                                "dtype": dtype, "shape": [int(v) for v in details["shape"]]}
        if key == "input":
            spec["range"] = [0, 255] if source.modality == "image" else [-1.0, 1.0]
            spec["layout"] = (
                "RGB, channels last, resized to this size (bilinear, as keras.layers.Resizing)"
                if source.modality == "image" else f"mono, {source.sample_rate} Hz, centre crop or centred zero-padding"
            )
        if dtype.startswith(("int", "uint")):
            scale, zero_point = details["quantization"]
            spec["quantization"] = {"scale": float(scale), "zero_point": int(zero_point),
                                    "real_value": "(q - zero_point) * scale"}
        entry[key] = spec
    return entry


# --------------------------------------------------------------------------- parity


def _verify(
    fmt: str,
    artifact: str,
    tmp: Path,
    source: _Source,
    examples: list[np.ndarray],
    references: dict[str, list[np.ndarray]],
    threshold: float,
    info: dict[str, Any],
) -> tuple[FormatResult, str]:
    """Reloads one artifact, runs it on the parity examples and compares with the Keras model."""
    # Labels for the reload come from the files beside the artifact, as a user's would.
    _write_json(tmp / METADATA_FILE, {"labels": source.labels, "artifacts": {fmt: info}})
    predictor = _reload(fmt, tmp / artifact, source)
    if list(predictor.labels) != source.labels:
        raise ExportError(f"reloaded labels {predictor.labels} differ from the run's {source.labels}")
    key = "fixed" if fmt.startswith("tflite") else "raw"
    if key not in references:
        references[key] = [_keras_probabilities(source.model, predictor.prepare(x)) for x in examples]
    expected = references[key]
    predictor.predict_one(examples[0])  # warm-up, not timed
    got, times = [], []
    for example in examples:
        start = time.perf_counter()
        got.append(np.asarray(predictor.predict_one(example), np.float32))
        times.append(time.perf_counter() - start)
    want = np.stack(expected)
    have = np.stack(got)
    if have.shape != want.shape:
        raise ExportError(f"the reloaded {fmt} model returns shape {have.shape[1:]}, expected {want.shape[1:]}")
    agreement = float(np.mean(have.argmax(1) == want.argmax(1)))
    runtime = getattr(predictor, "runtime", "")
    correction = info.get("bias_correction")
    if isinstance(correction, dict):
        correction = f"bias correction: {correction['layers']} layers, {correction['examples']} examples"
    elif correction and correction != "off":
        correction = f"bias correction {correction}"
    else:
        correction = ""
    parts = (f"runtime {runtime}" if runtime else "", correction, _disagreement_note(want, have))
    notes = "; ".join(part for part in parts if part)
    return FormatResult(
        format=fmt, path=artifact, size_bytes=_size(tmp / artifact if artifact != "." else tmp, fmt),
        max_abs_diff=float(np.max(np.abs(have - want))), top1_agreement=agreement,
        latency_ms=float(np.median(times) * 1000.0), min_agreement=threshold, samples=len(examples),
        passed=agreement >= threshold, notes=notes,
    ), runtime


def _disagreement_note(want: np.ndarray, have: np.ndarray) -> str:
    """Where the artifact picks another class: how far the Keras model's top-1 led its runner-up there.

    Examples on which the Keras model is itself torn between two classes flip under any
    small perturbation; a disagreement on a clear lead points at the artifact instead.
    """
    if want.shape[1] < 2:
        return ""
    flipped = np.flatnonzero(have.argmax(1) != want.argmax(1))
    if not flipped.size:
        return ""
    top2 = np.sort(want, axis=1)[:, -2:]
    lead = top2[:, 1] - top2[:, 0]
    shown = ", ".join(f"{v:.3f}" for v in np.sort(lead[flipped])[:10])
    more = f" (+{flipped.size - 10} more)" if flipped.size > 10 else ""
    return (
        f"{flipped.size} disagreement(s) where the Keras top-1 probability led the runner-up by {shown}{more} "
        f"(median lead over all {len(lead)} examples {float(np.median(lead)):.3f})"
    )


def _reload(fmt: str, path: Path, source: _Source) -> Any:
    if fmt == "savedmodel":
        return SavedModelPredictor(str(path), _labels_beside(path / "saved_model.pb"), input_name=source.input_name)
    if fmt == "keras":
        return KerasFilePredictor(str(path), _labels_beside(path))
    return TFLitePredictor(str(path), _labels_beside(path))


def _keras_probabilities(model: Any, example: np.ndarray) -> np.ndarray:
    return np.asarray(model(np.asarray(example, np.float32)[None], training=False), np.float32)[0]


def _size(path: Path, fmt: str) -> int:
    if fmt != "savedmodel":
        return path.stat().st_size
    parts = [path / "saved_model.pb", path / "fingerprint.pb", path / "variables", path / "assets"]
    total = 0
    for part in parts:
        if part.is_file():
            total += part.stat().st_size
        elif part.is_dir():
            total += sum(f.stat().st_size for f in part.rglob("*") if f.is_file())
    return total


# --------------------------------------------------------------------------- metadata


def _base_metadata(source: _Source, report: ExportReport) -> dict[str, Any]:
    return {
        "name": source.name,
        "labels": source.labels,
        "modality": source.modality,
        "created": report.created,
        "source_run": {
            "path": report.run_dir,
            "name": source.name,
            "backbone": source.status.get("backbone") or source.config.get("backbone", {}).get("name"),
            "image_size": source.status.get("image_size"),
            "test_metrics": source.status.get("test_metrics", {}),
            "multi_label": bool(source.config.get("head", {}).get("multi_label", False)),
        },
        "sample_rate": source.sample_rate,
        "artifacts": {},
        "versions": report.versions,
    }


def _versions() -> dict[str, str]:
    import keras
    import tensorflow as tf

    import tlkit

    return {"tlkit": tlkit.__version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1), encoding="utf-8")


def _safe_name(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return cleaned or "model"


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n:.1f} GB"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


# --------------------------------------------------------------------------- CLI


def _parse_min_agreement(text: str | None) -> float | dict[str, float] | None:
    if text is None:
        return None
    if "=" not in text:
        try:
            return float(text)
        except ValueError as exc:
            raise ConfigError(f"--min-agreement {text!r}: give a number or FORMAT=NUMBER,...") from exc
    values: dict[str, float] = {}
    for part in text.split(","):
        fmt, _, value = part.partition("=")
        try:
            values[fmt.strip()] = float(value)
        except ValueError as exc:
            raise ConfigError(f"--min-agreement {part!r}: expected FORMAT=NUMBER, e.g. tflite-int8=0.85") from exc
    return values


def _cmd_export(args: argparse.Namespace) -> int:
    report = export_run(
        args.run_dir, args.formats, args.out, calibration_samples=args.calibration_samples,
        parity_samples=args.parity_samples, min_agreement=_parse_min_agreement(args.min_agreement),
        int8_io=args.int8_io, bias_correction=not args.no_bias_correction,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
        return 0
    print(report.table())
    print(f"\nparity on {report.results[0].samples if report.results else 0} {report.parity_split} examples; "
          f"latency = one example, median, this machine")
    print(f"wrote {report.out_dir} (version {report.version})")
    return 0


def add_cli(sub: Any) -> None:
    """Registers ``tlkit export``."""
    p = sub.add_parser(
        "export", help="export a run as SavedModel, .keras and TFLite (fp32/fp16/dynamic/int8), each verified"
    )
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--formats", default=None, metavar="LIST",
                   help=f"comma-separated, from {','.join(FORMATS)} (default: all that apply)")
    p.add_argument("--out", default=None, metavar="DIR", help="directory holding the version folders (default saved_models/<name>)")
    p.add_argument("--calibration-samples", type=int, default=100, metavar="N",
                   help="training examples to calibrate the int8 model on (default 100)")
    p.add_argument("--parity-samples", type=int, default=50, metavar="N",
                   help="held-out examples each artifact is checked on (default 50)")
    p.add_argument("--min-agreement", default=None, metavar="X|FORMAT=X,...",
                   help="top-1 agreement each format must reach: a number, or FORMAT=NUMBER,... "
                        "(defaults: 0.99; 0.9 for tflite-dynamic and tflite-int8)")
    p.add_argument("--int8-io", action="store_true", help="the int8 TFLite model takes and returns int8 tensors")
    p.add_argument("--no-bias-correction", action="store_true",
                   help="convert tflite-dynamic/int8 without correcting the mean error of int8 weights")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cmd_export)
