"""The Markdown pieces of an evaluation report, shared by ``report.md`` of single-task and
multi-task runs (:mod:`tlkit.evaluation.report`, :mod:`tlkit.evaluation.tasks`): number
formatting, tables of one model's (or one task's) metrics, plot links."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.evaluation.metrics import operating_points
from tlkit.evaluation.plots import PLOTS


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table: ``-`` for undefined, integers as they are, else ``digits`` decimals."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    return f"{float(value):.{digits}f}"


def link(path: Path, base: Path) -> str:
    """``path`` relative to ``base``, with ``/`` separators (for links in report.md)."""
    return Path(os.path.relpath(path, base)).as_posix()


def accuracy_name(metrics: dict[str, Any]) -> str:
    return "subset accuracy (all labels right)" if metrics["task"] == "multilabel" else "accuracy"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def ci(interval: Sequence[Any]) -> str:
    low, high = interval
    return "-" if low is None else f"{low:.3f}-{high:.3f}"


def images(plots: dict[str, Path], out: Path, *names: str) -> list[str]:
    """Markdown image links of the drawn plots among ``names`` (captions from the registry)."""
    return [f"![{PLOTS[name].title if name in PLOTS else name}]({link(plots[name], out)})"
            for name in names if name in plots]


def summary_table(m: dict[str, Any]) -> str:
    """The summary table of one model's (or one task's) metrics: accuracy with its interval, F1, AUCs,
    calibration error, log-likelihood and Brier score."""
    summary = [(accuracy_name(m), fmt(m["accuracy"]), ci(m["accuracy_ci95"]))]
    summary += [(f"top-{k} accuracy", fmt(v), "") for k, v in m.get("top_k_accuracy", {}).items()]
    which = f" ({m['positive_class']})" if m["task"] == "binary" else " (macro)"
    summary += [
        ("macro F1", fmt(m["macro_avg"]["f1"]), ""), ("weighted F1", fmt(m["weighted_avg"]["f1"]), ""),
        ("ROC-AUC" + which, fmt(m["roc_auc"]), ""), ("PR-AUC / average precision" + which, fmt(m["pr_auc"]), ""),
        ("expected calibration error", fmt(m["calibration"]["ece"]), ""),
        ("negative log-likelihood", fmt(m["nll"]), ""), ("Brier score", fmt(m["brier"]), ""),
    ]
    if m["task"] == "multilabel":
        summary.insert(1, ("label accuracy (1 - Hamming loss)", fmt(m["label_accuracy"]), ""))
    return md_table(("metric", "value", "95% CI"), summary)


def per_class_lines(m: dict[str, Any]) -> list[str]:
    """The per-class table (precision, recall, F1, support, AUCs, and the averages) and its legend."""
    rows = [
        (name, fmt(v["precision"]), fmt(v["recall"]), fmt(v["f1"]), v["support"], fmt(v["roc_auc"]), fmt(v["pr_auc"]))
        for name, v in m["per_class"].items()
    ]
    macro, weighted = m["macro_avg"], m["weighted_avg"]
    rows.append(("**macro avg**", fmt(macro["precision"]), fmt(macro["recall"]), fmt(macro["f1"]), m["support_total"],
                 fmt(macro["roc_auc"]), fmt(macro["pr_auc"])))
    rows.append(("**weighted avg**", fmt(weighted["precision"]), fmt(weighted["recall"]), fmt(weighted["f1"]),
                 m["support_total"], "", ""))
    return [md_table(("class", "precision", "recall", "F1", "support", "ROC-AUC", "PR-AUC"), rows), "",
            "Support is the number of evaluated examples of the class. ROC-AUC and PR-AUC are "
            + ("one-vs-rest. " if m["task"] == "multiclass" else "per class. ")
            + "The macro average weighs every class equally; the weighted one by support.", ""]


def operating_point_lines(m: dict[str, Any]) -> list[str]:
    """The operating-point table of binary and multi-label metrics (``[]`` for multi-class)."""
    points = operating_points(m)
    if not points:
        return []
    rows = [
        (name, f"{p['threshold']:.3f}", p["threshold_source"],
         f"{fmt(p['sensitivity'])} ({ci(p['sensitivity_ci95'])})",
         f"{fmt(p['specificity'])} ({ci(p['specificity_ci95'])})", fmt(p["ppv"]), fmt(p["npv"]),
         p["tp"], p["fp"], p["tn"], p["fn"])
        for name, p in points.items()
    ]
    return [md_table(("class", "threshold", "chosen by", "sensitivity (95% CI)", "specificity (95% CI)",
                      "PPV", "NPV", "TP", "FP", "TN", "FN"), rows), "",
            "A case counts as positive when its probability is at or above the threshold. Choose your own "
            "with `tlkit evaluate RUN --threshold T` (pick it on validation data, not on this test set).", ""]


def confusion_lines(m: dict[str, Any]) -> list[str]:
    """The confusion matrix as a table (single-label, up to 12 classes; else ``[]``)."""
    if m["task"] == "multilabel" or len(m["class_names"]) > 12:
        return []
    header = ["true \\ predicted", *m["class_names"]]
    rows = [(name, *counts) for name, counts in zip(m["class_names"], m["confusion_matrix"])]
    return [md_table(header, rows), ""]


def baselines_section(m: dict[str, Any]) -> list[str]:
    """The baselines ``tlkit train`` measured on the run's own split (``run.json`` "transfer")."""
    transfer = m.get("transfer")
    if not transfer:
        return []
    rows = [(r["model"], r["kind"], fmt(r.get("val_accuracy")), fmt(r.get("test_accuracy"))) for r in transfer["rows"]]
    lines = ["## Against the baselines", "",
             "Measured by `tlkit train` on this run's split: logistic regression without pretrained weights "
             "(the no-transfer baseline), the linear probe of the frozen pretrained backbone, and the model.", "",
             md_table(("model", "kind", "val accuracy", "test accuracy"), rows), ""]
    lines += [f"**Warning.** {w}" for w in transfer.get("warnings", [])]
    return lines + ([""] if transfer.get("warnings") else [])


TASK_OVERVIEW_HEADERS = ("task", "scored rows", "missing label", "accuracy", "95% CI", "macro F1")


def task_overview_rows(tasks: dict[str, dict[str, Any]]) -> list[tuple[Any, ...]]:
    """One row per task of a multi-task ``metrics.json``: rows scored, rows without its label,
    accuracy with its Wilson interval, macro F1 (headers :data:`TASK_OVERVIEW_HEADERS`)."""
    return [(task, m["data"]["count"], m["data"]["missing"], fmt(m.get("accuracy")),
             ci(m["accuracy_ci95"]) if m.get("accuracy_ci95") else "-", fmt((m.get("macro_avg") or {}).get("f1")))
            for task, m in tasks.items()]
