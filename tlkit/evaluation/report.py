"""What an evaluation wrote: :class:`EvaluationReport`, ``report.md`` and ``metrics.json``.

The output folder of an evaluation (the run directory unless ``out`` is given)::

    report.md            tables, and relative links to every plot below
    metrics.json         every number of the report (see :func:`~tlkit.evaluation.compute_metrics`)
    misclassified.csv    path, true and predicted label, confidence; most confident first
    evaluation/*.png     the registered plots (:mod:`tlkit.evaluation.plots`) and Grad-CAM overlays
    .tlkit-evaluation    (not in a run directory) what tlkit evaluate writes here

tlkit never overwrites a file it did not write. A run directory is tlkit's own folder, so
an evaluation into it (the default) replaces the previous evaluation's files. Any other
folder (``--out``) is claimed by :func:`claim_output_folder` before anything is written:
``.tlkit-evaluation`` lists the three files above and the ``evaluation/`` folder, and an
evaluation refuses (ConfigError naming the file) when one of them exists without being
listed there (a ``report.md`` of your own, an ``evaluation/`` folder with your files). A
later evaluation into the same folder replaces tlkit's files as in a run directory.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.errors import ConfigError
from tlkit.evaluation.metrics import operating_points
from tlkit.evaluation.tables import (
    TASK_OVERVIEW_HEADERS,
    accuracy_name,
    baselines_section,
    confusion_lines,
    fmt,
    images,
    link,
    md_table,
    operating_point_lines,
    per_class_lines,
    summary_table,
    task_overview_rows,
)
from tlkit.fileio import read_json, write_json
from tlkit.text import format_table

REPORT_FILE = "report.md"
METRICS_FILE = "metrics.json"
MISCLASSIFIED_FILE = "misclassified.csv"
FIGURES_DIR = "evaluation"
MARKER_FILE = ".tlkit-evaluation"
_WRITTEN_FILES = (REPORT_FILE, METRICS_FILE, MISCLASSIFIED_FILE)

#: Plots with a place of their own in report.md; any other plot goes under "More plots".
_PLACED = ("confusion_matrix", "confusion_matrix_normalized", "roc", "precision_recall", "reliability",
           "training_curves", "gradcam_right", "gradcam_wrong")


@dataclass
class EvaluationReport:
    """What :func:`~tlkit.evaluation.evaluate_run` computed and wrote.

    Attributes:
        metrics: the contents of ``metrics.json`` (see :func:`~tlkit.evaluation.compute_metrics`).
        out_dir: where ``report.md``, ``metrics.json`` and ``misclassified.csv`` are.
        report: ``report.md``. metrics_json: ``metrics.json``. misclassified_csv: the CSV.
        plots: plot name -> PNG path (``confusion_matrix``, ``roc``, ...).
        gradcam: Grad-CAM overlay PNGs (grids and single overlays).
        calibration: ``calibration.json`` when ``calibrate=True``.
        notes: things the report warns about (skipped plots, optimistic thresholds, ...).
    """

    metrics: dict[str, Any]
    out_dir: Path
    report: Path
    metrics_json: Path
    misclassified_csv: Path
    plots: dict[str, Path] = field(default_factory=dict)
    gradcam: list[Path] = field(default_factory=list)
    calibration: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def paths(self) -> list[Path]:
        """Every file written."""
        written = [self.report, self.metrics_json, self.misclassified_csv, *self.plots.values(), *self.gradcam]
        return written + ([self.calibration] if self.calibration else [])

    def summary(self, max_classes: int = 30) -> str:
        """A plain-text summary table (per class and averages) for the terminal.

        With more than ``max_classes`` classes only the ones with the lowest F1 are listed.
        """
        m = self.metrics
        if "tasks" in m:  # a multi-task run: one line per task (report.md has a section per task)
            table = format_table(TASK_OVERVIEW_HEADERS, task_overview_rows(m["tasks"]))
            return f"{table}\n\neach task scored on the test rows labelled for it\nreport: {self.report}"
        auc = m["task"] != "multiclass" or any(v.get("roc_auc") is not None for v in m["per_class"].values())
        headers = ["class", "precision", "recall", "f1", "support"] + (["roc_auc"] if auc else [])
        rows = []
        classes = list(m["per_class"].items())
        if len(classes) > max_classes:  # the weakest classes are the ones worth a look
            classes = sorted(classes, key=lambda item: item[1]["f1"])[:max_classes]
        for name, v in classes:
            row = [name, fmt(v["precision"]), fmt(v["recall"]), fmt(v["f1"]), v["support"]]
            rows.append(row + ([fmt(v.get("roc_auc"))] if auc else []))
        for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
            v = m[key]
            row = [label, fmt(v["precision"]), fmt(v["recall"]), fmt(v["f1"]), m["support_total"]]
            rows.append(row + ([fmt(v.get("roc_auc"))] if auc else []))
        lines = [format_table(headers, rows), ""]
        if len(m["per_class"]) > max_classes:
            lines.insert(
                1, f"(the {max_classes} classes with the lowest F1 of {len(m['per_class'])}; all are in the report)"
            )
        lines.append(f"{accuracy_name(m)} {fmt(m['accuracy'])} on {m['count']} examples "
                     f"(95% CI {fmt(m['accuracy_ci95'][0])}-{fmt(m['accuracy_ci95'][1])})")
        for k, v in m.get("top_k_accuracy", {}).items():
            lines.append(f"top-{k} accuracy {fmt(v)}")
        if m.get("roc_auc") is not None:
            lines.append(f"ROC-AUC {fmt(m['roc_auc'])}, PR-AUC {fmt(m.get('pr_auc'))}")
        op = m.get("operating_point")
        if op and m["task"] == "binary":
            lines.append(
                f"at threshold {op['threshold']:.3f} ({op['threshold_source']}): sensitivity "
                f"{fmt(op['sensitivity'])}, specificity {fmt(op['specificity'])}"
            )
        cal = m["calibration"]
        line = f"expected calibration error {fmt(cal['ece'])}"
        if cal.get("temperature") is not None:
            line += (f" after temperature scaling (T = {cal['temperature']:.3f}; "
                     f"before: {fmt(cal['ece_uncalibrated'])})")
        lines.append(line)
        lines.append(f"report: {self.report}")
        return "\n".join(lines)


def read_metrics(folder: str | Path) -> dict[str, Any]:
    """The ``metrics.json`` an evaluation wrote into ``folder`` (a run directory or ``--out``);
    ``{}`` when there is none.

    Raises:
        ConfigError: the file exists but cannot be read.
    """
    path = Path(folder) / METRICS_FILE
    try:
        return read_json(path, default={})
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{str(path)!r} cannot be read ({exc}); re-run `tlkit evaluate`") from exc


def output_conflicts(out: str | Path, *, run_directory: bool = False) -> list[Path]:
    """The files in ``out`` an evaluation would overwrite although tlkit did not write them.

    ``[]`` for a run directory (``run_directory``: the caller knows ``out`` is one), a new
    or empty folder, or one whose ``.tlkit-evaluation`` lists them (see the module docstring).
    """
    folder = Path(out)
    if not folder.exists() or run_directory:
        return []
    try:
        marker = read_json(folder / MARKER_FILE, default={})
    except (OSError, ValueError):
        marker = {}
    marker = marker if isinstance(marker, dict) else {}
    files, folders = set(marker.get("files", ())), set(marker.get("folders", ()))
    conflicts = [folder / name for name in _WRITTEN_FILES if (folder / name).exists() and name not in files]
    figures = folder / FIGURES_DIR
    if figures.exists() and FIGURES_DIR not in folders:
        conflicts += sorted(p for p in figures.rglob("*") if not p.is_dir()) if figures.is_dir() else [figures]
    return conflicts


def check_output_folder(out: str | Path, *, run_directory: bool = False) -> None:
    """Raises unless an evaluation may write into ``out`` (see :func:`output_conflicts`).

    Raises:
        ConfigError: names the first file tlkit did not write, and the fix.
    """
    conflicts = output_conflicts(out, run_directory=run_directory)
    if conflicts:
        more = f" (and {len(conflicts) - 1} more)" if len(conflicts) > 1 else ""
        raise ConfigError(
            f"{str(conflicts[0])!r}{more} exists and was not written by tlkit evaluate ({MARKER_FILE} in "
            f"{str(out)!r} does not list it); tlkit does not overwrite files it did not write. Choose a new or "
            "empty --out folder, or move those files away"
        )


def claim_output_folder(out: str | Path, *, run_directory: bool = False) -> Path:
    """Checks ``out`` (:func:`check_output_folder`), creates ``out/evaluation/`` and, outside a
    run directory, writes ``.tlkit-evaluation`` before any report file; returns the figures folder."""
    check_output_folder(out, run_directory=run_directory)
    folder = Path(out)
    figures = folder / FIGURES_DIR
    figures.mkdir(parents=True, exist_ok=True)
    if not run_directory:
        write_json(folder / MARKER_FILE, {
            "written_by": "tlkit evaluate",
            "note": "tlkit evaluate may replace the files and folders listed here, and nothing else in this folder",
            "files": list(_WRITTEN_FILES), "folders": [FIGURES_DIR],
        })
    return figures


def jsonable(value: Any) -> Any:
    """``value`` with paths as strings, numpy scalars as Python numbers and NaN / inf as ``None``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    return value


def report_markdown(
    metrics: dict[str, Any], out: Path, run: Path, plots: dict[str, Path], gradcam: dict[str, Any],
    wrong: list[dict[str, Any]], calibration: Path | None, notes: list[str], model_file: Path | None = None,
    shift: dict[str, Any] | None = None,
) -> str:
    """The text of ``report.md``: summary, per-class table, operating point, every plot, mistakes.

    Links are relative to ``out``; ``model_file`` is the run's model (linked when given).
    """
    m = metrics
    task = {"binary": "binary (single-label)", "multiclass": "multi-class (single-label)",
            "multilabel": "multi-label"}[m["task"]]
    lines = [f"# Evaluation of `{run.name}`", ""]
    lines += [
        f"- **Data:** {m['data']['source']}: {m['count']} examples, {len(m['class_names'])} classes ({task})",
        *([f"- **Model:** `{link(model_file, out)}`"] if model_file is not None else []),
        f"- **Decision rule:** {m['decision']}",
        f"- **Written:** {time.strftime('%Y-%m-%d %H:%M')} by `tlkit evaluate`; all numbers are in "
        f"[{METRICS_FILE}]({METRICS_FILE})",
        "",
    ]
    lines += ["## Summary", "", summary_table(m), ""]
    if notes:
        lines += ["**Read with care:**", ""] + [f"- {note}" for note in notes] + [""]
    lines += _shift_section(shift)

    lines += ["## Per-class metrics", "", *per_class_lines(m)]

    if operating_points(m):
        lines += ["## Operating point", "", *operating_point_lines(m)]

    lines += baselines_section(m)
    lines += ["## Confusion matrix", ""]
    lines += [*images(plots, out, "confusion_matrix", "confusion_matrix_normalized"), ""]
    lines += confusion_lines(m)

    lines += ["## ROC and precision-recall curves", "", *images(plots, out, "roc", "precision_recall"), ""]
    lines += _calibration_section(m, out, plots, calibration)

    lines += ["## Training curves", ""]
    if "training_curves" in plots:
        lines += [*images(plots, out, "training_curves"), "",
                  "Dashed vertical lines mark the start of each fine-tuning stage.", ""]
    else:
        lines += ["No training history found.", ""]

    more = [name for name in plots if name not in _PLACED]
    if more:
        lines += ["## More plots", "", *images(plots, out, *more), ""]
    lines += _gradcam_section(gradcam, out, plots)

    lines += ["## Misclassified examples", ""]
    if wrong:
        lines += [f"{len(wrong)} of {m['count']} examples are misclassified; all of them, most confident first, are "
                  f"in [{MISCLASSIFIED_FILE}]({MISCLASSIFIED_FILE}). Confident mistakes are often label errors: check "
                  "those files first.", ""]
        rows = [(f"`{r['path']}`", r["true_label"], r["predicted_label"] or "(none)", fmt(r["confidence"]))
                for r in wrong[:15]]
        lines += [md_table(("file", "true", "predicted", "confidence"), rows), ""]
    else:
        lines += [f"No example is misclassified ([{MISCLASSIFIED_FILE}]({MISCLASSIFIED_FILE}) is empty).", ""]
    return "\n".join(lines)


def _shift_section(shift: dict[str, Any] | None) -> list[str]:
    """``## Shift from the training data`` (:func:`tlkit.shift.measure_shift` on the model's features)."""
    if not shift:
        return []
    lines = ["## Shift from the training data", ""]
    if shift.get("error"):
        return lines + [f"Not measured: {shift['error']}", ""]
    lines += [f"**{shift['verdict']}**", "",
              f"A domain classifier on the model's pooled features tells these {shift['n_target']} examples from "
              f"{shift['n_source']} training examples with cross-validated ROC-AUC **{fmt(shift['auc'])}** (0.5: "
              f"indistinguishable); RBF-kernel MMD² {shift['mmd']:.3g}, permutation p = {shift['p_value']:.3g}. "
              "`tlkit shift` gives the full table; docs/adaptation.md says how to adapt.", ""]
    if shift.get("classes"):
        rows = [(c["class"], fmt(c["auc"]), c["n_source"], c["n_target"]) for c in shift["classes"][:8]]
        lines += [md_table(("class", "domain AUC", "training", "evaluated"), rows), ""]
    if shift.get("examples"):
        rows = [(f"`{e['path']}`", e["label"] or "-", fmt(e["p_target"])) for e in shift["examples"]]
        lines += ["Evaluated examples least like the training data:", "",
                  md_table(("file", "label", "P(evaluated)"), rows), ""]
    return lines


def _calibration_section(m: dict[str, Any], out: Path, plots: dict[str, Path], calibration: Path | None) -> list[str]:
    cal = m["calibration"]
    lines = ["## Calibration", "",
             f"Expected calibration error (ECE, {cal['n_bins']} bins): **{fmt(cal['ece'])}**. It is the average gap "
             "between how confident the model is and how often it is right; a model that says 0.9 should be "
             "right 9 times in 10.", ""]
    if cal.get("temperature") is not None and calibration is not None:
        multi_label = m["task"] == "multilabel"
        lines += [
            f"Temperature scaling was fitted on the validation split: **T = {cal['temperature']:.3f}** "
            f"(ECE before: {fmt(cal['ece_uncalibrated'])}; every metric above uses the calibrated probabilities). "
            f"It is stored in [{link(calibration, out)}]({link(calibration, out)}) "
            "(`{\"temperature\": T}`). Apply it to the model's probabilities `p`:",
            "",
            "```python",
            "import tlkit",
            "from tlkit.evaluation import apply_temperature",
            "T = tlkit.RunDir(\"RUN_DIR\").temperature()",
            f"calibrated = apply_temperature(p, T, multi_label={multi_label})",
            "# i.e. " + ("sigmoid(logit(p) / T)" if multi_label else "softmax(log(p) / T)"),
            "```",
            "",
        ]
    elif cal.get("folded_temperature") is not None:
        lines += [f"The model's probabilities are calibrated: `tlkit train` fitted temperature scaling on the "
                  f"validation split (**T = {cal['folded_temperature']:.3f}**) and folded it into the model's "
                  "`logits` layer, so every metric above, `tlkit predict` and every export use the calibrated "
                  "probabilities with nothing to apply.", ""]
    else:
        lines += ["Not calibrated; run `tlkit evaluate RUN --calibrate` to fit a temperature on the validation "
                  "split.", ""]
    return lines + [*images(plots, out, "reliability"), ""]


def _gradcam_section(gradcam: dict[str, Any], out: Path, plots: dict[str, Path]) -> list[str]:
    if not gradcam.get("method"):
        return []
    lines = ["## Where the model looks", "",
             f"Method: **{gradcam['method']}**"
             + (f" on layer `{gradcam['layer']}`" if gradcam.get("layer") else "")
             + (f" ({gradcam['note']})" if gradcam.get("note") else "")
             + ". Warm colours mark the regions that raised the score of the explained class. A model that "
             "looks at labels, rulers or borders instead of the finding has learnt a shortcut.", ""]
    for kind, title in (("right", "Most confident correct predictions"), ("wrong", "Most confident mistakes")):
        key = f"gradcam_{kind}"
        if key not in plots:
            continue
        lines += [f"### {title}", "", f"![{title}]({link(plots[key], out)})", ""]
        rows = [(f"[{link(e['file'], out)}]({link(e['file'], out)})", f"`{e['path']}`", e["true"], e["explained"],
                 fmt(e["confidence"])) for e in gradcam["examples"][kind]]
        lines += [md_table(("overlay", "file", "true", "explained class", "confidence"), rows), ""]
    return lines
