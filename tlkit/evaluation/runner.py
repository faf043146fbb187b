"""Evaluating a finished run end to end: predictions, metrics, plots, calibration, report.

``tlkit evaluate RUN_DIR`` (or :func:`evaluate_run`) scores a run on its test split, or on
another class folder / CSV manifest (``--data``), and writes the files of
:mod:`tlkit.evaluation.report`; ``--calibrate`` also writes ``calibration.json`` into the
run directory. The run is read only through :class:`tlkit.rundir.RunDir`.

A multi-task run is scored task by task, each on the test rows labelled for it
(:mod:`tlkit.evaluation.tasks`). Image runs are read at the run's image size; audio runs are scored per whole clip (the mean
of ``eval_crops`` crops, as in training) and get no Grad-CAM.

The *operating point* (sensitivity, specificity, PPV, NPV) of binary and multi-label models
is reported at ``threshold``, or, without it, at the threshold maximising Youden's J
(sensitivity + specificity - 1) on the run's validation split (on the evaluated data itself
only when there is no validation split, which is optimistic and said so in the report).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from tlkit.data.audio import load_audio, load_audio_splits, predict_clips
from tlkit.data.images import Example, encode_labels, load_splits, make_dataset
from tlkit.errors import ConfigError, DataError, TlkitError
from tlkit.evaluation.calibration import (
    DEFAULT_BINS,
    apply_temperature,
    at_search_edge,
    expected_calibration_error,
    fit_temperature,
)
from tlkit.evaluation.decisions import decide, indicator, positive_index, task_of
from tlkit.evaluation.gradcam import write_gradcam
from tlkit.evaluation.metrics import compute_metrics, youden_threshold
from tlkit.evaluation.mistakes import outcomes, write_misclassified
from tlkit.evaluation.plots import PlotContext, draw_plots
from tlkit.evaluation.report import (
    METRICS_FILE,
    MISCLASSIFIED_FILE,
    REPORT_FILE,
    EvaluationReport,
    check_output_folder,
    claim_output_folder,
    jsonable,
    link,
    report_markdown,
)
from tlkit.evaluation.tasks import evaluate_multitask, refuse_unsupported
from tlkit.fileio import atomic_write_text, write_json
from tlkit.rundir import InputContract, RunDir
from tlkit.shift import measure_shift
from tlkit.text import first_line

#: examples -> ``(targets (N, C), probabilities (N, C))``.
Predict = Callable[[list[Example]], tuple[np.ndarray, np.ndarray]]
#: a class folder or CSV manifest -> its examples (only classes the model knows).
ReadData = Callable[[Path], list[Example]]


def evaluate_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    *,
    out: str | Path | None = None,
    threshold: float | None = None,
    calibrate: bool = False,
    gradcam: int = 6,
    positive: str | None = None,
    batch_size: int = 32,
) -> EvaluationReport:
    """Evaluates a finished run and writes the report files (see the module docstring).

    Args:
        run_dir: a finished run directory (with ``model.keras``).
        data: a class folder or CSV manifest to evaluate instead of the run's test split.
        out: where to write (default ``run_dir``); plots go to ``<out>/evaluation/``.
        threshold: decision threshold / operating point of binary and multi-label models.
        calibrate: fit a temperature on the validation split, store it as
            ``<run_dir>/calibration.json`` and report calibrated probabilities.
        gradcam: Grad-CAM overlays of this many most confident right and wrong examples
            each (0 disables them).
        positive: binary models: the name of the positive class (default: the second).
        batch_size: prediction batch size.

    Image runs read images at the run's ``image_size``; audio runs score each whole clip by
    the mean probabilities of ``eval_crops`` evenly spaced crops, as training's test
    evaluation does (no Grad-CAM; see :func:`tlkit.explain.audio_saliency`).

    Returns:
        An :class:`~tlkit.evaluation.EvaluationReport`.

    Raises:
        ConfigError / DataError: not a finished run, unknown classes in ``data``, an empty
            test split without ``data``, ``calibrate`` without a validation split, or an
            ``out`` folder holding a file tlkit did not write (see
            :mod:`tlkit.evaluation.report`: tlkit never overwrites one).
    """
    run = RunDir(run_dir)
    out_dir = Path(out) if out is not None else run.path
    check_output_folder(out_dir, run_directory=_is_run_directory(out_dir, run.path))  # before the slow part
    if run.is_multitask:  # every task on its own labelled test rows (tlkit.evaluation.tasks)
        refuse_unsupported(calibrate, data)
        notes: list[str] = []
        return evaluate_multitask(run, run.load_model(), out=out_dir, run_directory=_is_run_directory(out_dir, run.path),
                                  threshold=threshold, positive=positive, batch_size=batch_size,
                                  history=_history(run, notes), notes=notes)
    model = run.load_model()
    labels = run.labels()
    contract = run.input_contract(model)
    multi_label = run.multi_label(model)
    if contract.is_audio:
        predict, read_data = _audio_predictor(model, labels, contract, batch_size)
    else:
        predict, read_data = _image_predictor(model, labels, contract.image_size or (224, 224), batch_size)
    if data is None:
        examples = run.split("test")
        source = "the run's test split"
        if not examples:
            raise DataError(f"run {str(run.path)!r} has an empty test split; pass --data FOLDER_OR_MANIFEST")
    else:
        examples = read_data(Path(data))
        source = str(data)
    shift = _training_shift(run, model, contract, examples) if data is not None else None

    targets, probabilities = predict(examples)
    try:
        val_examples = run.split("val")
    except ConfigError:  # a run directory without (readable) splits.json
        val_examples = []
    needs_val = calibrate or (threshold is None and (multi_label or len(labels) == 2))
    val = predict(val_examples) if needs_val and val_examples else None
    if calibrate and val is None:
        raise DataError(
            f"run {str(run.path)!r} has no validation split to fit a temperature on; train with val_fraction > 0 "
            "or evaluate without --calibrate"
        )
    audio_note = "Grad-CAM overlays are drawn for image models; for audio use tlkit.explain.audio_saliency"
    return evaluate_predictions(
        targets, probabilities, labels,
        out=out_dir,
        multi_label=multi_label, threshold=threshold, calibrate=calibrate, positive=positive,
        validation=val, paths=[e.path for e in examples], run_dir=run.path, source=source,
        model=model if gradcam > 0 and not contract.is_audio else None, image_size=contract.image_size,
        gradcam=gradcam, extra_notes=[audio_note] if contract.is_audio and gradcam > 0 else None, shift=shift,
    )


def _training_shift(run: RunDir, model: keras.Model, contract: InputContract, examples: list[Example]
                    ) -> dict[str, Any]:
    """The shift from the run's training split to the evaluated data, on the model's own pooled
    features (:func:`tlkit.shift.measure_shift`); ``{"error": ...}`` when it cannot be measured."""
    try:
        report = measure_shift(run.split("train"), examples, backbone=model, image_size=contract.image_size,
                               sample_rate=contract.sample_rate, clip_seconds=contract.clip_seconds or 5.0,
                               max_per_domain=500, permutations=200, top=5)
    except (TlkitError, ValueError) as exc:
        return {"error": first_line(exc)}
    return report.to_dict()


def _image_predictor(
    model: keras.Model, labels: list[str], size: tuple[int, int], batch_size: int
) -> tuple[Predict, ReadData]:
    """Images decoded and resized to ``size`` as in training, predicted in batches."""

    def predict(items: list[Example]) -> tuple[np.ndarray, np.ndarray]:
        ds = make_dataset(items, labels, size, batch_size, cache=False)
        return encode_labels(items, labels), np.asarray(model.predict(ds, verbose=0), np.float32)

    def read_data(path: Path) -> list[Example]:
        if path.suffix.lower() == ".csv":
            splits = load_splits(manifest=path, val_fraction=0, test_fraction=0)
        else:
            splits = load_splits(path, val_fraction=0, test_fraction=0)
        return _known_classes(splits.train, splits.class_names, labels, path)

    return predict, read_data


def _audio_predictor(
    model: keras.Model, labels: list[str], contract: InputContract, batch_size: int
) -> tuple[Predict, ReadData]:
    """Whole clips at the run's rate, each the mean of ``eval_crops`` crops, as in training's test scores."""
    rate = int(contract.sample_rate or 16000)
    clip = contract.clip_samples or rate
    crops = contract.eval_crops
    decoded: dict[str, np.ndarray] = {}

    def predict(items: list[Example]) -> tuple[np.ndarray, np.ndarray]:
        waves = [decoded[e.path] if e.path in decoded else load_audio(e.path, rate) for e in items]
        probabilities = predict_clips(
            lambda batch: model(batch, training=False), waves, clip, crops=crops, batch_size=batch_size
        )
        return encode_labels(items, labels), np.asarray(probabilities, np.float32)

    def read_data(path: Path) -> list[Example]:
        if path.suffix.lower() == ".csv":
            splits = load_audio_splits(manifest=path, sample_rate=rate, val_fraction=0, test_fraction=0)
        else:
            splits = load_audio_splits(path, sample_rate=rate, val_fraction=0, test_fraction=0)
        decoded.update(splits.waveforms)
        return _known_classes(splits.train, splits.class_names, labels, path)

    return predict, read_data


def _known_classes(examples: list[Example], found: Sequence[str], labels: Sequence[str], path: Path) -> list[Example]:
    unknown = sorted(set(found) - set(labels))
    if unknown:
        raise DataError(
            f"{str(path)!r} has classes the model does not know: {unknown}; the model's classes are {list(labels)}"
        )
    if not examples:
        raise DataError(f"{str(path)!r} has no readable examples")
    return examples


def evaluate_predictions(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    *,
    out: str | Path,
    multi_label: bool = False,
    threshold: float | None = None,
    calibrate: bool = False,
    positive: str | None = None,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    paths: Sequence[str] | None = None,
    run_dir: str | Path | None = None,
    source: str = "",
    model: Any = None,
    image_size: tuple[int, int] | None = None,
    gradcam: int = 0,
    extra_notes: Sequence[str] | None = None,
    shift: dict[str, Any] | None = None,
) -> EvaluationReport:
    """Writes the report files for predictions made elsewhere (any modality).

    Args:
        y_true: (N,) indices or (N, C) one-hot / multi-hot. probabilities: (N, C).
        out: output folder (plots in ``<out>/evaluation/``).
        validation: ``(y_true, probabilities)`` of a validation split, for ``calibrate`` and
            for the Youden operating point when ``threshold`` is ``None``.
        paths: N file paths (for ``misclassified.csv`` and Grad-CAM); default row numbers.
        run_dir: the run (its ``history.json`` is plotted, ``calibration.json`` written there;
            default ``out``).
        model, image_size, gradcam: an image model, the size images are read at, and how
            many overlays of each kind to draw (0: none).
        extra_notes: caveats to print in the report.
        shift: a :meth:`tlkit.shift.ShiftReport.to_dict` from the training data to these data
            (``metrics.json`` key ``"shift"`` and a report section).
    Other arguments as :func:`evaluate_run`.

    Raises:
        ConfigError: ``out`` (not a run directory) holds a ``report.md``, ``metrics.json``,
            ``misclassified.csv`` or ``evaluation/`` file that tlkit did not write.
    """
    started = time.time()
    out_dir = Path(out)
    figures = claim_output_folder(out_dir, run_directory=_is_run_directory(out_dir, run_dir))
    run = RunDir(run_dir if run_dir is not None else out_dir)
    names = [str(n) for n in class_names]
    raw = np.asarray(probabilities, np.float32)
    truth = indicator(y_true, len(names), multi_label)
    row_paths = list(paths) if paths is not None else [f"#{i}" for i in range(len(raw))]
    notes: list[str] = list(extra_notes or ())
    task = task_of(len(names), multi_label)
    if threshold is not None and task == "multiclass":
        notes.append("--threshold has no effect on a multi-class (softmax) model; decisions are arg-max")
        threshold = None

    temperature = None
    calibration_path = None
    probs = raw
    if calibrate:
        if validation is None:
            raise DataError("calibration needs validation predictions (the run's val split)")
        val_truth, val_probs = validation
        temperature = fit_temperature(val_truth, val_probs, multi_label)
        if at_search_edge(temperature):
            notes.append(
                f"the fitted temperature {temperature:.3g} is at the edge of its search range: the validation split "
                f"({len(val_truth)} examples) is too small or perfectly separated to calibrate on"
            )
        probs = apply_temperature(raw, temperature, multi_label)
        validation = (val_truth, apply_temperature(val_probs, temperature, multi_label))
        calibration_path = run.write_calibration(
            temperature, method="temperature scaling", fitted_on="validation split",
            validation_count=len(val_truth), multi_label=multi_label,
            apply="p = sigmoid(logit(p_model) / T)" if multi_label else "p = softmax(log(p_model) / T)",
            created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        )

    pos = positive_index(positive, names) if task == "binary" else None
    operating, source_note = None, None
    if threshold is None and task != "multiclass":
        if validation is not None and len(validation[0]):
            val_truth = indicator(validation[0], len(names), multi_label)
            val_probs = np.asarray(validation[1], np.float64)
            thresholds = [youden_threshold(val_truth[:, i], val_probs[:, i]) for i in range(len(names))]
            operating = thresholds[pos] if task == "binary" else thresholds
            source_note = "Youden's J on the validation split"
        else:
            notes.append(
                "no validation split: the operating-point threshold was optimised (Youden's J) on the evaluated "
                "data itself, so its sensitivity and specificity are optimistic"
            )
    metrics = compute_metrics(
        truth, probs, names, multi_label, threshold, positive=pos, operating_threshold=operating,
        threshold_source=source_note,
    )
    metrics["data"] = {"source": source, "count": len(truth)}
    if shift is not None:
        metrics["shift"] = shift
    if temperature is not None:
        metrics["calibration"]["temperature"] = temperature
        metrics["calibration"]["ece_uncalibrated"] = expected_calibration_error(truth, raw, DEFAULT_BINS, multi_label)
        metrics["calibration"]["file"] = str(calibration_path)
    small = [n for n, v in metrics["per_class"].items() if v["support"] < 10]
    if small:
        notes.append(
            f"{len(small)} class(es) have fewer than 10 evaluated examples ({', '.join(small[:8])}"
            f"{', ...' if len(small) > 8 else ''}); their per-class numbers are very uncertain"
        )
    stored = run.file(RunDir.CALIBRATION)
    record = run.calibration() if stored.is_file() else {}
    folded = record if record.get("folded_into_model") else record.get("folded")
    if folded:  # tlkit train folded a temperature into the model: these probabilities are calibrated
        metrics["calibration"]["folded_temperature"] = float(folded["temperature"])
    metrics["calibration"]["probabilities"] = (
        "the model's outputs, with a temperature folded in by training" if folded and not calibrate
        else "temperature-scaled by this evaluation" if calibrate else "the model's outputs (uncalibrated)")
    metrics["threshold_applies_to"] = metrics["calibration"]["probabilities"]  # decisions and operating points
    transfer = run.status().get("transfer") if run.file(RunDir.STATUS).is_file() else None
    if transfer:  # the baselines tlkit train measured on the run's own split, for the report
        metrics["transfer"] = transfer
    if not calibrate and stored.is_file() and run.temperature() is not None:
        notes.append(
            f"{link(stored, out_dir)} exists but these numbers use the model's raw probabilities; "
            "pass --calibrate to refit and apply it"
        )

    history = _history(run, notes)
    context = PlotContext(metrics, truth, probs, raw, temperature, history)
    plots, plot_notes = draw_plots(context, figures)
    notes.extend(plot_notes)

    decided = decide(probs.astype(np.float64), task, threshold, pos)
    outcome = outcomes(truth, probs, decided, multi_label)
    misclassified_csv = out_dir / MISCLASSIFIED_FILE
    wrong_rows = write_misclassified(misclassified_csv, truth, probs, decided, names, row_paths, multi_label, outcome)
    metrics["misclassified"] = len(wrong_rows)

    gradcam_files: list[Path] = []
    gradcam_info: dict[str, Any] = {}
    if model is not None and gradcam > 0 and paths is not None:
        try:
            gradcam_files, gradcam_info = write_gradcam(
                model, row_paths, truth, outcome, names, multi_label, image_size or (224, 224), gradcam, figures
            )
            for key in ("gradcam_right", "gradcam_wrong"):
                if key in gradcam_info:
                    plots[key] = gradcam_info[key]
        except TlkitError as exc:
            notes.append(f"Grad-CAM skipped: {exc}")
    metrics["explanations"] = {k: v for k, v in gradcam_info.items() if k in ("method", "layer", "note")}
    metrics["notes"] = notes
    metrics["seconds"] = round(time.time() - started, 2)

    metrics_json = write_json(out_dir / METRICS_FILE, jsonable(metrics))
    model_file = run.file(RunDir.MODEL)
    report = atomic_write_text(out_dir / REPORT_FILE, report_markdown(
        metrics, out_dir, run.path, plots, gradcam_info, wrong_rows, calibration_path, notes,
        model_file=model_file if model_file.is_file() else None, shift=shift,
    ))
    return EvaluationReport(
        metrics=jsonable(metrics), out_dir=out_dir, report=report, metrics_json=metrics_json,
        misclassified_csv=misclassified_csv, plots=plots, gradcam=gradcam_files, calibration=calibration_path,
        notes=notes,
    )


def _is_run_directory(out: Path, run_dir: str | Path | None) -> bool:
    """``out`` is tlkit's own: the evaluated run's directory, or any run directory."""
    if run_dir is not None and out.resolve() == Path(run_dir).resolve():
        return True
    return RunDir.is_run(out)


def _history(run: RunDir, notes: list[str]) -> dict[str, Any] | None:
    """The run's training history for the plots, or ``None`` with a note saying why not."""
    if not run.file(RunDir.HISTORY).is_file():
        notes.append(f"no {RunDir.HISTORY} in {run.path}; training curves skipped")
        return None
    try:
        history = run.history()
    except ConfigError as exc:
        notes.append(f"{RunDir.HISTORY} could not be read ({exc}); training curves skipped")
        return None
    if not isinstance(history, dict) or not history.get("epochs"):
        notes.append(f"{RunDir.HISTORY} has no epochs; training curves skipped")
        return None
    return history
