"""Evaluating a multi-task run: every task scored on its own labelled test rows.

``tlkit evaluate RUN_DIR`` on a multi-task run (``labels.json`` with ``"tasks"``, see
:mod:`tlkit.task_outputs`) predicts the run's test split once and then, per task, scores only
the rows that carry a label for that task: a row whose label for a task is missing is never
counted for it (``data.missing`` says how many were left out). Each task gets the metrics of
:func:`~tlkit.evaluation.compute_metrics` (accuracy with its Wilson interval, per-class table,
confusion matrix, operating point of binary and multi-label tasks at Youden's J on that task's
labelled validation rows), the temperature training folded into its head, and the baselines
``tlkit train`` measured for it (``run.json`` ``"transfer"."tasks"``).

Written, as for a single-task run: ``metrics.json`` ``{"tasks": {task: {...}}, "data", ...}``,
``report.md`` with one section per task, ``misclassified.csv`` (a ``task`` column first) and
``evaluation/<task>_confusion_matrix.png`` per task (plus the training curves).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

import tlkit.evaluation.tables as tables
from tlkit.artifacts import join_outputs
from tlkit.data.audio import load_audio, predict_clips
from tlkit.data.images import Example, make_batches
from tlkit.errors import ConfigError, DataError
from tlkit.evaluation.decisions import decide, positive_index, task_of
from tlkit.evaluation.metrics import compute_metrics, youden_threshold
from tlkit.evaluation.mistakes import misclassified_rows, outcomes, write_rows
from tlkit.evaluation.plots import PLOTS, PlotContext
from tlkit.evaluation.report import (
    METRICS_FILE,
    MISCLASSIFIED_FILE,
    REPORT_FILE,
    EvaluationReport,
    claim_output_folder,
    jsonable,
)
from tlkit.fileio import atomic_write_text, write_json
from tlkit.rundir import InputContract, RunDir
from tlkit.task_outputs import TaskLayout, TaskOutput, run_layout

_MISCLASSIFIED_COLUMNS = ("task", "path", "true_label", "predicted_label", "confidence", "worst_label",
                          "true_label_probability")


def evaluate_multitask(
    run: RunDir,
    model: keras.Model,
    *,
    out: Path,
    run_directory: bool,
    threshold: float | None = None,
    positive: str | None = None,
    batch_size: int = 32,
    history: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> EvaluationReport:
    """Scores every task of a multi-task run on its labelled test rows and writes the report files.

    Args:
        run: the run; ``model`` its loaded model (``{task: probabilities}`` outputs).
        out: where to write; ``run_directory``: ``out`` is a run directory (tlkit's own folder).
        threshold: decision threshold and operating point of binary and multi-label tasks.
        positive: binary tasks: the positive class's name, for every binary task that has it
            (default: the second class).
        history: the run's training history for the training curves (``None``: none drawn).
        notes: caveats gathered so far (extended and written into the report).

    Raises:
        DataError: the test split is empty, or a test row has a class its task does not know.
    """
    started = time.time()
    figures = claim_output_folder(out, run_directory=run_directory)
    notes = list(notes or [])
    task_labels = run.task_labels() or {}
    layout = run_layout(task_labels, model, run.status())
    examples = run.split("test")
    if not examples:
        raise DataError(f"run {str(run.path)!r} has an empty test split; a multi-task run is evaluated on it")
    predict = _predictor(model, layout, run.input_contract(model), batch_size)
    probabilities = layout.split(predict(examples))
    needs_val = threshold is None and any(task_of(len(h.labels), h.multi_label) != "multiclass" for h in layout.heads)
    val_examples = run.split("val") if needs_val else []
    val = layout.split(predict(val_examples)) if val_examples else None
    status = run.status()
    calibration = (run.calibration().get("tasks") or {}) if run.file(RunDir.CALIBRATION).is_file() else {}
    per_task: dict[str, Any] = {}
    plots: dict[str, Path] = {}
    wrong: list[dict[str, Any]] = []
    for head in layout.heads:
        rows, truth = task_truth(examples, head)
        if not rows:
            notes.append(f"task {head.name!r}: no test row is labelled for it; it is not scored")
            per_task[head.name] = {"count": 0, "data": {"source": "the run's test split", "count": 0,
                                                         "missing": len(examples)}}
            continue
        probs = probabilities[head.name][rows]
        m, decided, pos = _task_metrics(head, truth, probs, threshold, positive,
                                        None if val is None else (task_truth(val_examples, head), val[head.name]))
        m["data"] = {"source": "the run's test split", "count": len(rows), "missing": len(examples) - len(rows)}
        folded = calibration.get(head.name) or {}
        if folded.get("temperature") is not None:
            m["calibration"]["folded_temperature"] = float(folded["temperature"])
        transfer = task_baselines(status, head.name)
        if transfer:
            m["transfer"] = transfer
        outcome = outcomes(truth, probs, decided, head.multi_label)
        paths = [examples[i].path for i in rows]
        task_wrong = [{"task": head.name, **r} for r in misclassified_rows(truth, probs, decided, list(head.labels),
                                                                            paths, head.multi_label, outcome)]
        m["misclassified"] = len(task_wrong)
        wrong += task_wrong
        per_task[head.name] = m
        try:
            path = figures / f"{head.name}_confusion_matrix.png"
            PLOTS["confusion_matrix"].draw(PlotContext(m, truth, probs, probs), path)
            plots[f"{head.name}_confusion_matrix"] = path
        except (ValueError, KeyError, TypeError) as exc:
            notes.append(f"task {head.name!r}: confusion matrix plot skipped: {exc}")
    if history and history.get("epochs") and "training_curves" in PLOTS:
        path = figures / PLOTS["training_curves"].file
        PLOTS["training_curves"].draw(PlotContext({"task": "multiclass"}, np.zeros((0, 1)), np.zeros((0, 1)),
                                                  np.zeros((0, 1)), None, history), path)
        plots["training_curves"] = path
    wrong.sort(key=lambda r: -r["confidence"])
    misclassified_csv = out / MISCLASSIFIED_FILE
    write_rows(misclassified_csv, wrong, _MISCLASSIFIED_COLUMNS)
    metrics: dict[str, Any] = {
        "tasks": per_task, "task_order": layout.names,
        "data": {"source": "the run's test split", "count": len(examples)},
        "misclassified": len(wrong), "notes": notes, "seconds": round(time.time() - started, 2),
    }
    metrics_json = write_json(out / METRICS_FILE, jsonable(metrics))
    model_file = run.file(RunDir.MODEL)
    report = atomic_write_text(out / REPORT_FILE, multitask_markdown(
        jsonable(metrics), out, run.path, plots, wrong, notes, model_file if model_file.is_file() else None))
    return EvaluationReport(metrics=jsonable(metrics), out_dir=out, report=report, metrics_json=metrics_json,
                            misclassified_csv=misclassified_csv, plots=plots, notes=notes)


def task_truth(examples: Sequence[Example], head: TaskOutput) -> tuple[list[int], np.ndarray]:
    """The rows of ``examples`` labelled for ``head``'s task and their (n, C_task) 0/1 indicators.

    Raises:
        DataError: a row's label is not one of the task's classes.
    """
    index = {name: i for i, name in enumerate(head.labels)}
    rows: list[int] = []
    truth: list[np.ndarray] = []
    for i, example in enumerate(examples):
        try:
            labels = example.task_labels(head.name)
        except KeyError:
            labels = ()
        if not labels:
            continue  # missing for this task: never scored
        unknown = [label for label in labels if label not in index]
        if unknown:
            raise DataError(f"{example.path!r}: task {head.name!r} label(s) {unknown} are not among its classes "
                            f"{list(head.labels)}")
        row = np.zeros(len(head.labels), np.float32)
        row[[index[label] for label in labels]] = 1.0
        rows.append(i)
        truth.append(row)
    return rows, np.asarray(truth, np.float32).reshape(len(rows), len(head.labels))


def task_baselines(status: dict[str, Any], task: str) -> dict[str, Any] | None:
    """The baselines ``tlkit train`` measured for one task: ``run.json`` ``"transfer"."tasks".<task>``
    (``"baselines"`` with the same layout, or keyed by task directly, is read too)."""
    for key in ("transfer", "baselines"):
        entry = status.get(key) or {}
        if isinstance(entry, dict):
            found = (entry.get("tasks") or {}).get(task) if isinstance(entry.get("tasks"), dict) else entry.get(task)
            if isinstance(found, dict) and found.get("rows"):
                return found
    return None


def _task_metrics(
    head: TaskOutput, truth: np.ndarray, probs: np.ndarray, threshold: float | None, positive: str | None,
    validation: tuple[tuple[list[int], np.ndarray], np.ndarray] | None,
) -> tuple[dict[str, Any], np.ndarray, int | None]:
    """One task's metrics, its decisions (n, C) and the positive class index (binary)."""
    names = list(head.labels)
    task = task_of(len(names), head.multi_label)
    pos = positive_index(positive if positive in names else None, names) if task == "binary" else None
    given = threshold if task != "multiclass" else None
    operating, source = None, None
    if given is None and task != "multiclass" and validation is not None:
        (rows, val_truth), val_probs = validation
        if rows:
            scores = np.asarray(val_probs, np.float64)[rows]
            thresholds = [youden_threshold(val_truth[:, i], scores[:, i]) for i in range(len(names))]
            operating = thresholds[pos] if task == "binary" and pos is not None else thresholds
            source = "Youden's J on the task's labelled validation rows"
    m = compute_metrics(truth, probs, names, head.multi_label, given, positive=pos, operating_threshold=operating,
                        threshold_source=source)
    return m, decide(np.asarray(probs, np.float64), task, given, pos), pos


def _predictor(model: keras.Model, layout: TaskLayout, contract: InputContract, batch_size: int) -> Any:
    """examples -> (N, C_total) probabilities, the tasks joined in layout order; images read at the run's
    size as in training, audio clips scored as the mean over their crops."""
    if contract.is_audio:
        rate = int(contract.sample_rate or 16000)
        clip = contract.clip_samples or rate

        def predict_audio(items: list[Example]) -> np.ndarray:
            waves = [load_audio(e.path, rate) for e in items]
            return predict_clips(lambda batch: join_outputs(model(batch, training=False), layout), waves, clip,
                                 crops=contract.eval_crops, batch_size=batch_size)

        return predict_audio
    size = contract.image_size or (224, 224)

    def predict_images(items: list[Example]) -> np.ndarray:
        batches = make_batches(items, [], size, batch_size, cache=False, targets=np.zeros((len(items), 1), np.float32))
        return layout.join(model.predict(batches.batched(), verbose=0))

    return predict_images


def multitask_markdown(
    metrics: dict[str, Any], out: Path, run: Path, plots: dict[str, Path], wrong: list[dict[str, Any]],
    notes: list[str], model_file: Path | None = None,
) -> str:
    """``report.md`` of a multi-task run: an overview table, then one section per task."""
    tasks = metrics["tasks"]
    lines = [f"# Evaluation of `{run.name}` (multi-task)", "",
             f"- **Data:** {metrics['data']['source']}: {metrics['data']['count']} examples, "
             f"{len(tasks)} tasks ({', '.join(f'`{t}`' for t in tasks)})",
             *([f"- **Model:** `{tables.link(model_file, out)}`"] if model_file is not None else []),
             "- **Missing labels:** each task is scored on the test rows labelled for it only; a row without a "
             "label for a task is never counted for that task.",
             f"- **Written:** {time.strftime('%Y-%m-%d %H:%M')} by `tlkit evaluate`; all numbers are in "
             f"[{METRICS_FILE}]({METRICS_FILE})", ""]
    overview = [(f"`{row[0]}`", *row[1:]) for row in tables.task_overview_rows(tasks)]
    lines += ["## Tasks", "", tables.md_table(tables.TASK_OVERVIEW_HEADERS, overview), ""]
    if notes:
        lines += ["**Read with care:**", ""] + [f"- {note}" for note in notes] + [""]
    for task, m in tasks.items():
        lines += [f"## Task `{task}`", ""]
        if not m.get("count"):
            lines += ["No test row is labelled for this task; nothing to score.", ""]
            continue
        kind = {"binary": "binary", "multiclass": "multi-class", "multilabel": "multi-label"}[m["task"]]
        lines += [f"{m['data']['count']} labelled test rows ({m['data']['missing']} without a label for this task, "
                  f"not scored), {len(m['class_names'])} classes ({kind}); decision rule: {m['decision']}.", ""]
        if m["calibration"].get("folded_temperature") is not None:
            lines += [f"Probabilities calibrated by training (temperature {m['calibration']['folded_temperature']:.3f}"
                      f" folded into `{task}_logits`).", ""]
        lines += [tables.summary_table(m), "", f"### Per-class metrics (`{task}`)", "", *tables.per_class_lines(m)]
        if m.get("operating_point"):
            lines += [f"### Operating point (`{task}`)", "", *tables.operating_point_lines(m)]
        lines += [line.replace("## Against the baselines", f"### Against the baselines (`{task}`)")
                  for line in tables.baselines_section(m)]
        lines += [f"### Confusion matrix (`{task}`)", "", *tables.images(plots, out, f"{task}_confusion_matrix"), "",
                  *tables.confusion_lines(m)]
        task_wrong = [r for r in wrong if r["task"] == task][:10]
        if task_wrong:
            lines += [f"Most confident mistakes of `{task}` (all in [{MISCLASSIFIED_FILE}]({MISCLASSIFIED_FILE})):",
                      "", tables.md_table(("file", "true", "predicted", "confidence"),
                                   [(f"`{r['path']}`", r["true_label"], r["predicted_label"] or "(none)",
                                     tables.fmt(r["confidence"])) for r in task_wrong]), ""]
    if "training_curves" in plots:
        lines += ["## Training curves", "", *tables.images(plots, out, "training_curves"), ""]
    return "\n".join(lines)


def refuse_unsupported(calibrate: bool, data: Any) -> None:
    """Raises for the options a multi-task evaluation does not take.

    Raises:
        ConfigError: ``calibrate`` (training fits and folds one temperature per task) or ``data``.
    """
    if calibrate:
        raise ConfigError("--calibrate is not available for a multi-task run: tlkit train fits one temperature per "
                          "task on the validation split and folds it into that task's head (calibration.json "
                          "\"tasks\"); evaluate without --calibrate")
    if data is not None:
        raise ConfigError("--data is not available for a multi-task run yet; it is evaluated on its own test split "
                          "(splits.json), whose rows carry every task's labels")
