"""Evaluation a careful reviewer can check: metrics, plots, calibration, Grad-CAM, label errors.

``tlkit evaluate RUN_DIR`` (or :func:`evaluate_run`) scores a finished run on its test split,
or on another class folder / CSV manifest (``--data``), and writes files a person opens::

    report.md            tables, and relative links to every plot below
    metrics.json         every number of the report (see :func:`compute_metrics`)
    misclassified.csv    path, true and predicted label, confidence; most confident first
    evaluation/*.png     confusion matrices (counts, row-normalised), training curves with
                         stage boundaries, reliability diagram, ROC and precision-recall
                         curves, Grad-CAM overlays of the most confident right and wrong cases
    calibration.json     (``--calibrate``, always in the run directory) ``{"temperature": T}``

Image runs are read at the run's image size; audio runs are scored per whole clip (the mean
of ``eval_crops`` crops, as in training) and get no Grad-CAM.

Metrics are computed here with numpy; ``tests/test_evaluate.py`` checks them against
scikit-learn on the same predictions.

Decisions: single-label models predict the arg-max class. A binary model with
``--threshold T`` predicts the positive class when ``p(positive) >= T``; a multi-label model
predicts every label with ``p >= T`` (default 0.5). The *operating point* (sensitivity,
specificity, PPV, NPV) of binary and multi-label models is reported at ``--threshold``, or,
without it, at the threshold maximising Youden's J (sensitivity + specificity - 1) on the
run's validation split (on the evaluated data itself only when there is no validation
split, which is optimistic and said so in the report).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlkit.data.images import Example, decode_and_resize, encode_labels, load_splits, make_dataset
from tlkit.errors import ConfigError, DataError, TlkitError

__all__ = [
    "EvaluationReport",
    "apply_temperature",
    "average_precision",
    "compute_metrics",
    "evaluate_predictions",
    "evaluate_run",
    "expected_calibration_error",
    "fit_temperature",
    "operating_point",
    "precision_recall_curve",
    "reliability_bins",
    "roc_auc",
    "roc_curve",
    "top_k_accuracy",
    "wilson_interval",
    "youden_threshold",
]

EVALUATION_DIR = "evaluation"
CALIBRATION_FILE = "calibration.json"
DEFAULT_BINS = 15
_EPS = 1e-12


@dataclass
class EvaluationReport:
    """What :func:`evaluate_run` computed and wrote.

    Attributes:
        metrics: the contents of ``metrics.json`` (see :func:`compute_metrics`).
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
        from tlkit.text import format_table

        m = self.metrics
        auc = m["task"] != "multiclass" or any(v.get("roc_auc") is not None for v in m["per_class"].values())
        headers = ["class", "precision", "recall", "f1", "support"] + (["roc_auc"] if auc else [])
        rows = []
        classes = list(m["per_class"].items())
        if len(classes) > max_classes:  # the weakest classes are the ones worth a look
            classes = sorted(classes, key=lambda item: item[1]["f1"])[:max_classes]
        for name, v in classes:
            row = [name, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), v["support"]]
            rows.append(row + ([_fmt(v.get("roc_auc"))] if auc else []))
        for label, key in (("macro avg", "macro_avg"), ("weighted avg", "weighted_avg")):
            v = m[key]
            row = [label, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), m["support_total"]]
            rows.append(row + ([_fmt(v.get("roc_auc"))] if auc else []))
        lines = [format_table(headers, rows), ""]
        if len(m["per_class"]) > max_classes:
            lines.insert(
                1, f"(the {max_classes} classes with the lowest F1 of {len(m['per_class'])}; all are in the report)"
            )
        lines.append(f"{_accuracy_name(m)} {_fmt(m['accuracy'])} on {m['count']} examples "
                     f"(95% CI {_fmt(m['accuracy_ci95'][0])}-{_fmt(m['accuracy_ci95'][1])})")
        for k, v in m.get("top_k_accuracy", {}).items():
            lines.append(f"top-{k} accuracy {_fmt(v)}")
        if m.get("roc_auc") is not None:
            lines.append(f"ROC-AUC {_fmt(m['roc_auc'])}, PR-AUC {_fmt(m.get('pr_auc'))}")
        op = m.get("operating_point")
        if op and m["task"] == "binary":
            lines.append(
                f"at threshold {op['threshold']:.3f} ({op['threshold_source']}): sensitivity "
                f"{_fmt(op['sensitivity'])}, specificity {_fmt(op['specificity'])}"
            )
        cal = m["calibration"]
        line = f"expected calibration error {_fmt(cal['ece'])}"
        if cal.get("temperature") is not None:
            line += (f" after temperature scaling (T = {cal['temperature']:.3f}; "
                     f"before: {_fmt(cal['ece_uncalibrated'])})")
        lines.append(line)
        lines.append(f"report: {self.report}")
        return "\n".join(lines)


# --- metrics -----------------------------------------------------------------------------


def compute_metrics(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    multi_label: bool = False,
    threshold: float | Sequence[float] | None = None,
    *,
    positive: int | str | None = None,
    operating_threshold: float | Sequence[float] | None = None,
    threshold_source: str | None = None,
    n_bins: int = DEFAULT_BINS,
) -> dict[str, Any]:
    """Classification metrics of predicted probabilities, as a JSON-able dict.

    Args:
        y_true: single-label: (N,) class indices or (N, C) one-hot; multi-label: (N, C) 0/1.
        probabilities: (N, C) model outputs (softmax rows, or independent sigmoids).
        class_names: C names, in output order.
        multi_label: sigmoid outputs, several labels per example.
        threshold: decision threshold of binary models (on ``p(positive)``) and multi-label
            models (a float, or one per class); also their operating point. ``None``:
            arg-max (single-label) or 0.5 (multi-label) decisions, and the operating
            point from ``operating_threshold`` or Youden's J on these data.
        positive: binary only: the positive class (index or name); default index 1.
        operating_threshold: operating point when ``threshold`` is ``None`` (e.g. Youden's J
            fitted on a validation split), described by ``threshold_source``.
        n_bins: equal-width confidence bins for the calibration error.

    Returns:
        ``task`` ("binary", "multiclass", "multilabel"), ``count``, ``accuracy`` (subset
        accuracy for multi-label) and its Wilson 95% interval ``accuracy_ci95``,
        ``top_k_accuracy`` ({k: value} for k in 2, 3, 5 below C; single-label),
        ``per_class`` {name: precision, recall, f1, support, roc_auc, pr_auc}, ``macro_avg``
        (unweighted mean over all C classes) and ``weighted_avg`` (weighted by support),
        ``roc_auc`` / ``pr_auc`` (the positive class's for binary; macro over classes where
        defined otherwise; one-vs-rest for multi-class), ``confusion_matrix`` (C, C) rows
        true, columns predicted (multi-label: {name: [[tn, fp], [fn, tp]]}),
        ``operating_point`` (binary: one dict; multi-label: one per class) with threshold,
        sensitivity, specificity, PPV, NPV, counts and Wilson intervals, ``nll``, ``brier``
        and ``calibration`` {ece, n_bins, bins}. Undefined values (an AUC of a class with no
        positive example) are ``None``.
    """
    probs = np.asarray(probabilities, np.float64)
    names = [str(n) for n in class_names]
    if probs.ndim != 2 or probs.shape[1] != len(names):
        raise DataError(f"probabilities have shape {probs.shape}; expected (N, {len(names)}) for classes {names}")
    truth = _indicator(y_true, len(names), multi_label)
    if len(truth) != len(probs):
        raise DataError(f"{len(truth)} labels but {len(probs)} predictions")
    n, c = probs.shape
    if multi_label:
        task = "multilabel"
    elif c == 2:
        task = "binary"
    else:
        task = "multiclass"
    metrics: dict[str, Any] = {"task": task, "count": int(n), "class_names": names}

    pos = _positive_index(positive, names) if task == "binary" else None
    decided = _decide(probs, task, threshold, pos)  # (N, C) 0/1
    if multi_label:
        tp = (decided * truth).sum(0)
        fp = (decided * (1 - truth)).sum(0)
        fn = ((1 - decided) * truth).sum(0)
        tn = ((1 - decided) * (1 - truth)).sum(0)
        support = truth.sum(0)
        exact = (decided == truth).all(1)
        metrics["accuracy"] = float(exact.mean()) if n else None
        metrics["accuracy_ci95"] = list(wilson_interval(int(exact.sum()), n))
        metrics["label_accuracy"] = float((decided == truth).mean()) if n else None
        metrics["hamming_loss"] = float((decided != truth).mean()) if n else None
        metrics["confusion_matrix"] = {
            name: [[int(tn[i]), int(fp[i])], [int(fn[i]), int(tp[i])]] for i, name in enumerate(names)
        }
        metrics["decision"] = f"p >= {_describe_threshold(threshold, 0.5)} per label"
    else:
        true_index = truth.argmax(1)
        predicted = decided.argmax(1)
        confusion = np.bincount(true_index * c + predicted, minlength=c * c).reshape(c, c)
        tp = np.diag(confusion).astype(np.float64)
        fp = confusion.sum(0) - tp
        fn = confusion.sum(1) - tp
        support = confusion.sum(1).astype(np.float64)
        correct = int(tp.sum())
        metrics["accuracy"] = correct / n if n else None
        metrics["accuracy_ci95"] = list(wilson_interval(correct, n))
        metrics["top_k_accuracy"] = {str(k): top_k_accuracy(true_index, probs, k) for k in (2, 3, 5) if k < c}
        metrics["confusion_matrix"] = confusion.astype(int).tolist()
        if task == "binary" and threshold is not None:
            metrics["decision"] = f"{names[pos]} when p({names[pos]}) >= {_describe_threshold(threshold, 0.5)}"
        else:
            metrics["decision"] = "arg-max"
    precision = _divide(tp, tp + fp)
    recall = _divide(tp, tp + fn)
    f1 = _divide(2 * tp, 2 * tp + fp + fn)
    roc = [_safe_auc(truth[:, i], probs[:, i], roc_auc) for i in range(c)]
    pr = [_safe_auc(truth[:, i], probs[:, i], average_precision) for i in range(c)]
    metrics["per_class"] = {
        name: {
            "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
            "support": int(support[i]), "roc_auc": roc[i], "pr_auc": pr[i],
        }
        for i, name in enumerate(names)
    }
    total = float(support.sum())
    metrics["support_total"] = int(total)
    metrics["macro_avg"] = {
        "precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean()),
        "roc_auc": _mean_defined(roc), "pr_auc": _mean_defined(pr),
    }
    weights = support / total if total else np.zeros_like(support)
    metrics["weighted_avg"] = {
        "precision": float((precision * weights).sum()), "recall": float((recall * weights).sum()),
        "f1": float((f1 * weights).sum()),
    }
    if task == "binary":
        metrics["positive_class"] = names[pos]
        metrics["roc_auc"], metrics["pr_auc"] = roc[pos], pr[pos]
    else:
        metrics["roc_auc"], metrics["pr_auc"] = metrics["macro_avg"]["roc_auc"], metrics["macro_avg"]["pr_auc"]

    if task in ("binary", "multilabel"):
        columns = [pos] if task == "binary" else list(range(c))
        points = {}
        for i in columns:
            given = _per_class(threshold, i, c) if threshold is not None else None
            if given is not None:
                t, source = given, "given"
            elif operating_threshold is not None:
                t, source = _per_class(operating_threshold, i, c), threshold_source or "given"
            else:
                t, source = youden_threshold(truth[:, i], probs[:, i]), "Youden's J on the evaluated data (optimistic)"
            points[names[i]] = operating_point(truth[:, i], probs[:, i], t, source)
        metrics["operating_point"] = points[names[pos]] if task == "binary" else points

    metrics["nll"] = _nll(truth, probs, multi_label)
    metrics["brier"] = float(((probs - truth) ** 2).sum(1).mean()) if not multi_label else \
        float(((probs - truth) ** 2).mean())
    bins = reliability_bins(truth, probs, n_bins, multi_label)
    metrics["calibration"] = {"ece": _ece_from_bins(bins), "n_bins": n_bins, "bins": bins}
    return metrics


def top_k_accuracy(y_true: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Fraction of examples whose true class is among the ``k`` highest probabilities.

    ``y_true``: (N,) class indices. ``probabilities``: (N, C). Ties rank the lower class
    index first, as arg-max does, so top-1 equals accuracy.
    """
    probs = np.asarray(probabilities)
    labels = np.asarray(y_true).astype(int)
    true_score = probs[np.arange(len(labels)), labels][:, None]
    index = np.arange(probs.shape[1])[None, :]
    rank = (probs > true_score).sum(1) + ((probs == true_score) & (index < labels[:, None])).sum(1)
    return float((rank < k).mean()) if len(labels) else float("nan")


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve of binary labels (N,) 0/1 against scores (N,).

    Returns:
        ``(fpr, tpr, thresholds)``, each (M,), from the highest threshold down; point ``i``
        predicts positive when ``score >= thresholds[i]``. The first point is (0, 0) at
        threshold +inf.
    """
    fps, tps, thresholds = _cumulative_counts(y_true, scores)
    positives, negatives = tps[-1] if len(tps) else 0, fps[-1] if len(fps) else 0
    tpr = np.concatenate([[0.0], tps / positives if positives else np.full(len(tps), np.nan)])
    fpr = np.concatenate([[0.0], fps / negatives if negatives else np.full(len(fps), np.nan)])
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoidal, ties handled as one point): y_true (N,) 0/1, scores (N,)."""
    fpr, tpr, _ = roc_curve(y_true, scores)
    return float(np.trapezoid(tpr, fpr))


def precision_recall_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision, recall, thresholds)`` (M,) each, from the highest threshold down."""
    fps, tps, thresholds = _cumulative_counts(y_true, scores)
    positives = tps[-1] if len(tps) else 0
    precision = tps / np.maximum(tps + fps, 1)
    recall = tps / positives if positives else np.full(len(tps), np.nan)
    return precision, recall, thresholds


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """PR-AUC as average precision ``sum_n (R_n - R_{n-1}) P_n`` (no interpolation)."""
    precision, recall, _ = precision_recall_curve(y_true, scores)
    steps = np.diff(np.concatenate([[0.0], recall]))
    return float((steps * precision).sum())


def youden_threshold(y_true: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold maximising Youden's J = sensitivity + specificity - 1.

    ``y_true`` (N,) 0/1, ``scores`` (N,). Among equally good thresholds the highest wins.
    Every threshold between that score and the next lower one makes the same decisions on
    these data, so the midpoint is returned: the decision boundary then sits in the gap,
    not on the last positive example it was fitted to. With only one class present, 0.5.
    """
    y = np.asarray(y_true).astype(bool)
    if y.all() or not y.any():
        return 0.5
    fpr, tpr, thresholds = roc_curve(y, scores)
    best = int(np.argmax((tpr - fpr)[1:])) + 1  # skip the +inf point
    if best + 1 < len(thresholds):
        return float((thresholds[best] + thresholds[best + 1]) / 2)
    return float(thresholds[best])


def operating_point(y_true: np.ndarray, scores: np.ndarray, threshold: float, source: str = "given") -> dict[str, Any]:
    """Sensitivity, specificity, PPV, NPV and counts when ``scores >= threshold`` is positive.

    ``y_true`` (N,) 0/1, ``scores`` (N,). Intervals are Wilson 95% intervals.
    """
    y = np.asarray(y_true).astype(bool)
    predicted = np.asarray(scores) >= threshold
    tp, fp = int((predicted & y).sum()), int((predicted & ~y).sum())
    fn, tn = int((~predicted & y).sum()), int((~predicted & ~y).sum())
    sensitivity = tp / (tp + fn) if tp + fn else None
    specificity = tn / (tn + fp) if tn + fp else None
    return {
        "threshold": float(threshold), "threshold_source": source,
        "sensitivity": sensitivity, "specificity": specificity,
        "ppv": tp / (tp + fp) if tp + fp else None, "npv": tn / (tn + fn) if tn + fn else None,
        "youden_j": None if sensitivity is None or specificity is None else sensitivity + specificity - 1,
        "tp": tp, "fp": fp, "tn": tn, "fn": fn,
        "sensitivity_ci95": list(wilson_interval(tp, tp + fn)),
        "specificity_ci95": list(wilson_interval(tn, tn + fp)),
    }


def wilson_interval(successes: int, total: int, z: float = 1.959964) -> tuple[float | None, float | None]:
    """Wilson score interval of a proportion (95% by default); ``(None, None)`` when ``total`` is 0."""
    if total <= 0:
        return (None, None)
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


# --- calibration -------------------------------------------------------------------------


def reliability_bins(
    y_true: np.ndarray, probabilities: np.ndarray, n_bins: int = DEFAULT_BINS, multi_label: bool = False
) -> list[dict[str, Any]]:
    """Confidence vs accuracy in ``n_bins`` equal-width bins ``(lower, upper]`` (the first holds 0).

    Single-label: the confidence is the top probability, and accuracy whether the arg-max
    is right. Multi-label: every (example, label) probability against that label's truth.

    Args:
        y_true: (N,) indices, or (N, C) one-hot / multi-hot. probabilities: (N, C).

    Returns:
        One dict per bin: ``lower``, ``upper``, ``count``, ``confidence`` (mean),
        ``accuracy`` (observed frequency); the means are ``None`` for empty bins.
    """
    confidence, correct = _confidence_and_outcome(y_true, probabilities, multi_label)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    hit_sum = np.bincount(index, weights=correct, minlength=n_bins)
    bins = []
    for b in range(n_bins):
        filled = count[b] > 0
        bins.append({
            "lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(count[b]),
            "confidence": float(conf_sum[b] / count[b]) if filled else None,
            "accuracy": float(hit_sum[b] / count[b]) if filled else None,
        })
    return bins


def expected_calibration_error(
    y_true: np.ndarray, probabilities: np.ndarray, n_bins: int = DEFAULT_BINS, multi_label: bool = False
) -> float:
    """ECE = sum over bins of (bin count / N) * |accuracy - confidence| (see :func:`reliability_bins`).

    0 is perfectly calibrated; 0.1 means confidences are off by ten points on average.
    """
    return _ece_from_bins(reliability_bins(y_true, probabilities, n_bins, multi_label))


def apply_temperature(probabilities: np.ndarray, temperature: float, multi_label: bool = False) -> np.ndarray:
    """Temperature-scaled probabilities, computed from the model's probabilities.

    Single-label: ``softmax(log(p) / T)``, identical to ``softmax(logits / T)`` since
    ``log(p)`` differs from the logits by a per-row constant. Multi-label:
    ``sigmoid(logit(p) / T)``. ``T > 1`` softens over-confident outputs. The arg-max of a
    single-label model, and the ranking of scores of a binary or multi-label model, are unchanged.

    Args:
        probabilities: (N, C) or (C,). temperature: T > 0.

    Returns:
        The same shape, float32.
    """
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}")
    probs = np.asarray(probabilities, np.float64)
    if multi_label:
        clipped = np.clip(probs, _EPS, 1 - _EPS)
        logits = np.log(clipped) - np.log1p(-clipped)
        return (1.0 / (1.0 + np.exp(-logits / temperature))).astype(np.float32)
    logits = np.log(np.clip(probs, _EPS, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=-1, keepdims=True)).astype(np.float32)


def fit_temperature(
    y_true: np.ndarray, probabilities: np.ndarray, multi_label: bool = False, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The temperature T minimising the negative log-likelihood of ``y_true`` (fit on validation data).

    Args:
        y_true: (N,) indices or (N, C) one-hot / multi-hot. probabilities: (N, C).
        bounds: search range of T (golden-section search over log T; the NLL is unimodal in T).

    Returns:
        T as a float; apply it with :func:`apply_temperature`.
    """
    probs = np.asarray(probabilities, np.float64)
    truth = _indicator(y_true, probs.shape[1], multi_label)
    if not len(truth):
        raise DataError("cannot fit a temperature on zero examples")

    def loss(log_t: float) -> float:
        return _nll(truth, apply_temperature(probs, math.exp(log_t), multi_label).astype(np.float64), multi_label)

    low, high = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = low + (1 - ratio) * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    for _ in range(80):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = low + (1 - ratio) * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return float(math.exp((low + high) / 2))


# --- a run, end to end ---------------------------------------------------------------------


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
        An :class:`EvaluationReport`.

    Raises:
        ConfigError / DataError: not a finished run, unknown classes in ``data``, an empty
            test split without ``data``, ``calibrate`` without a validation split.
    """
    from tlkit.run import load_run_model, load_split

    run = Path(run_dir)
    model, labels = load_run_model(run)
    status = json.loads((run / "run.json").read_text(encoding="utf-8")) if (run / "run.json").is_file() else {}
    audio = status.get("modality") == "audio" or model.inputs[0].name == "waveform" or len(model.inputs[0].shape) == 2
    multi_label = _is_multi_label(model, run)
    if audio:
        predict, read_data = _audio_predictor(model, labels, status, batch_size)
        size = None
    else:
        size = _run_image_size(run, model)
        predict, read_data = _image_predictor(model, labels, size, batch_size)
    if data is None:
        examples, _ = load_split(run, "test")
        source = "the run's test split"
        if not examples:
            raise DataError(f"run {str(run)!r} has an empty test split; pass --data FOLDER_OR_MANIFEST")
    else:
        examples = read_data(Path(data))
        source = str(data)

    targets, probabilities = predict(examples)
    try:
        val_examples, _ = load_split(run, "val")
    except (OSError, KeyError, ValueError):  # a run directory without (readable) splits.json
        val_examples = []
    needs_val = calibrate or (threshold is None and (multi_label or len(labels) == 2))
    val = predict(val_examples) if needs_val and val_examples else None
    if calibrate and val is None:
        raise DataError(
            f"run {str(run)!r} has no validation split to fit a temperature on; train with val_fraction > 0 "
            "or evaluate without --calibrate"
        )
    return evaluate_predictions(
        targets, probabilities, labels,
        out=Path(out) if out is not None else run,
        multi_label=multi_label, threshold=threshold, calibrate=calibrate, positive=positive,
        validation=val, paths=[e.path for e in examples], run_dir=run, source=source,
        model=model if gradcam > 0 and not audio else None, image_size=size, gradcam=gradcam,
        extra_notes=["Grad-CAM overlays are drawn for image models; for audio use tlkit.explain.audio_saliency"]
        if audio and gradcam > 0 else None,
    )


_Predict = Any  # Callable[[list[Example]], tuple[np.ndarray, np.ndarray]]: examples -> (targets, probabilities)


def _image_predictor(model: Any, labels: list[str], size: tuple[int, int], batch_size: int) -> tuple[_Predict, Any]:
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


def _audio_predictor(model: Any, labels: list[str], status: dict[str, Any], batch_size: int) -> tuple[_Predict, Any]:
    """Audio runs: whole clips scored as in training's test evaluation (mean of ``eval_crops`` crops)."""
    from tlkit.data.audio import load_audio, load_audio_splits, predict_clips

    rate = int(status.get("sample_rate") or 16000)
    clip = max(1, int(round(float(status.get("clip_seconds") or 5.0) * rate)))
    crops = int(status.get("eval_crops") or 3)
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
    Other arguments as :func:`evaluate_run`.
    """
    started = time.time()
    out_dir = Path(out)
    figures = out_dir / EVALUATION_DIR
    figures.mkdir(parents=True, exist_ok=True)
    run = Path(run_dir) if run_dir is not None else out_dir
    names = [str(n) for n in class_names]
    raw = np.asarray(probabilities, np.float32)
    truth = _indicator(y_true, len(names), multi_label)
    row_paths = list(paths) if paths is not None else [f"#{i}" for i in range(len(raw))]
    notes: list[str] = list(extra_notes or ())
    task = "multilabel" if multi_label else "binary" if len(names) == 2 else "multiclass"
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
        if min(abs(math.log(temperature / 0.05)), abs(math.log(temperature / 20.0))) < 1e-3:
            notes.append(
                f"the fitted temperature {temperature:.3g} is at the edge of its search range: the validation split "
                f"({len(val_truth)} examples) is too small or perfectly separated to calibrate on"
            )
        probs = apply_temperature(raw, temperature, multi_label)
        validation = (val_truth, apply_temperature(val_probs, temperature, multi_label))
        calibration_path = run / CALIBRATION_FILE
        calibration_path.write_text(json.dumps({
            "temperature": temperature, "method": "temperature scaling", "fitted_on": "validation split",
            "validation_count": int(len(val_truth)), "multi_label": multi_label,
            "apply": ("p = sigmoid(logit(p_model) / T)" if multi_label else "p = softmax(log(p_model) / T)"),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }, indent=1), encoding="utf-8")

    pos = _positive_index(positive, names) if task == "binary" else None
    operating, source_note = None, None
    if threshold is None and task != "multiclass":
        if validation is not None and len(validation[0]):
            val_truth = _indicator(validation[0], len(names), multi_label)
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
    metrics["data"] = {"source": source, "count": int(len(truth))}
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
    if not calibrate and (run / CALIBRATION_FILE).is_file():
        notes.append(
            f"{_link(run / CALIBRATION_FILE, out_dir)} exists but these numbers use the model's raw probabilities; "
            "pass --calibrate to refit and apply it"
        )

    plots: dict[str, Path] = {}
    drawings = {
        "confusion_matrix": lambda path: _plot_confusion(metrics, path, normalised=False),
        "confusion_matrix_normalized": lambda path: _plot_confusion(metrics, path, normalised=True),
        "roc": lambda path: _plot_roc(truth, probs, metrics, path),
        "precision_recall": lambda path: _plot_precision_recall(truth, probs, metrics, path),
        "reliability": lambda path: _plot_reliability(
            truth, raw, probs if temperature is not None else None, multi_label, temperature, path
        ),
    }
    for name, draw in drawings.items():
        path = figures / f"{name}.png"
        draw(path)
        plots[name] = path
    history_file = run / "history.json"
    if history_file.is_file():
        try:
            history = json.loads(history_file.read_text(encoding="utf-8"))
            if history.get("epochs"):
                _plot_training(history, figures / "training_curves.png")
                plots["training_curves"] = figures / "training_curves.png"
            else:
                notes.append("history.json has no epochs; training curves skipped")
        except (ValueError, KeyError, TypeError) as exc:
            notes.append(f"history.json could not be read ({exc}); training curves skipped")
    else:
        notes.append(f"no history.json in {run}; training curves skipped")

    decided = _decide(probs.astype(np.float64), task, threshold, pos)
    outcome = _outcomes(truth, probs, decided, multi_label)
    misclassified_csv = out_dir / "misclassified.csv"
    wrong_rows = _write_misclassified(misclassified_csv, truth, probs, decided, names, row_paths, multi_label, outcome)
    metrics["misclassified"] = len(wrong_rows)

    gradcam_files: list[Path] = []
    gradcam_info: dict[str, Any] = {}
    if model is not None and gradcam > 0 and paths is not None:
        try:
            gradcam_files, gradcam_info = _write_gradcam(
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

    metrics_json = out_dir / "metrics.json"
    metrics_json.write_text(json.dumps(_jsonable(metrics), indent=1), encoding="utf-8")
    report = out_dir / "report.md"
    report.write_text(
        _report_markdown(metrics, out_dir, run, plots, gradcam_info, wrong_rows, calibration_path, notes),
        encoding="utf-8",
    )
    return EvaluationReport(
        metrics=_jsonable(metrics), out_dir=out_dir, report=report, metrics_json=metrics_json,
        misclassified_csv=misclassified_csv, plots=plots, gradcam=gradcam_files, calibration=calibration_path,
        notes=notes,
    )


# --- helpers: metrics ------------------------------------------------------------------------


def _indicator(y_true: Any, num_classes: int, multi_label: bool) -> np.ndarray:
    """(N,) indices or (N, C) one-hot / multi-hot -> (N, C) float64 0/1."""
    y = np.asarray(y_true)
    if y.ndim == 1 and not multi_label:
        labels = y.astype(int)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise DataError(f"class indices must be in [0, {num_classes}), got {labels.min()}..{labels.max()}")
        return np.eye(num_classes, dtype=np.float64)[labels]
    if y.ndim == 1 and multi_label and num_classes == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[1] != num_classes:
        raise DataError(f"labels have shape {y.shape}; expected (N,) indices or (N, {num_classes}) indicators")
    return (y > 0.5).astype(np.float64)


def _positive_index(positive: int | str | None, names: Sequence[str]) -> int:
    if positive is None:
        return 1
    if isinstance(positive, (int, np.integer)):
        if not 0 <= int(positive) < len(names):
            raise ConfigError(f"positive class index {positive} is out of range for classes {list(names)}")
        return int(positive)
    if positive not in names:
        raise ConfigError(f"positive class {positive!r} is not one of the classes {list(names)}")
    return list(names).index(positive)


def _per_class(threshold: float | Sequence[float], index: int, count: int) -> float:
    values = np.asarray(threshold, np.float64).reshape(-1)
    if values.size == 1:
        return float(values[0])
    if values.size != count:
        raise ConfigError(f"got {values.size} thresholds for {count} classes; give one, or one per class")
    return float(values[index])


def _describe_threshold(threshold: float | Sequence[float] | None, default: float) -> str:
    if threshold is None:
        return f"{default:g}"
    values = np.asarray(threshold, np.float64).reshape(-1)
    return f"{values[0]:g}" if values.size == 1 else "the per-class thresholds"


def _decide(probs: np.ndarray, task: str, threshold: Any, pos: int | None) -> np.ndarray:
    """(N, C) 0/1 decisions: arg-max, the binary threshold rule, or per-label thresholds."""
    n, c = probs.shape
    if task == "multilabel":
        limits = np.array([_per_class(0.5 if threshold is None else threshold, i, c) for i in range(c)])
        return (probs >= limits[None, :]).astype(np.float64)
    if task == "binary" and threshold is not None:
        positive = probs[:, pos] >= _per_class(threshold, 0, 1)
        predicted = np.where(positive, pos, 1 - pos)
    else:
        predicted = probs.argmax(1)
    return np.eye(c, dtype=np.float64)[predicted] if n else np.zeros((0, c))


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ratio, 0 where the denominator is 0 (scikit-learn's zero_division default)."""
    numerator = np.asarray(numerator, np.float64)
    denominator = np.asarray(denominator, np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _safe_auc(y: np.ndarray, scores: np.ndarray, metric: Any) -> float | None:
    positives = int(np.asarray(y).astype(bool).sum())
    if positives == 0 or positives == len(y):
        return None
    return metric(y, scores)


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _nll(truth: np.ndarray, probs: np.ndarray, multi_label: bool) -> float:
    clipped = np.clip(np.asarray(probs, np.float64), _EPS, 1 - _EPS)
    if multi_label:
        return float(-(truth * np.log(clipped) + (1 - truth) * np.log(1 - clipped)).mean())
    return float(-(truth * np.log(clipped)).sum(1).mean())


def _confidence_and_outcome(y_true: Any, probabilities: Any, multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probabilities, np.float64)
    truth = _indicator(y_true, probs.shape[1], multi_label)
    if multi_label:
        return np.clip(probs.ravel(), 0.0, 1.0), truth.ravel()
    predicted = probs.argmax(1)
    return np.clip(probs.max(1), 0.0, 1.0), (truth.argmax(1) == predicted).astype(np.float64)


def _ece_from_bins(bins: Sequence[dict[str, Any]]) -> float:
    total = sum(b["count"] for b in bins)
    if not total:
        return float("nan")
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def _cumulative_counts(y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False and true positives above each distinct score, highest score first."""
    y = np.asarray(y_true).astype(bool).ravel()
    s = np.asarray(scores, np.float64).ravel()
    if not len(s):
        return np.zeros(0), np.zeros(0), np.zeros(0)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each run of equal scores
    tps = np.cumsum(y)[last].astype(np.float64)
    fps = (last + 1) - tps
    return fps, tps, s[last]


def _is_multi_label(model: Any, run: Path) -> bool:
    names = [layer.name for layer in model.layers]
    if "probabilities" in names:
        activation = getattr(model.get_layer("probabilities"), "activation", None)
        name = getattr(activation, "__name__", "")
        if name in ("sigmoid", "softmax"):
            return name == "sigmoid"
    try:
        from tlkit.run import load_run_config

        return bool(load_run_config(run).head.multi_label)
    except (TlkitError, OSError, ValueError):
        return False


def _run_image_size(run: Path, model: Any) -> tuple[int, int]:
    status = run / "run.json"
    if status.is_file():
        size = json.loads(status.read_text(encoding="utf-8")).get("image_size")
        if size:
            return (int(size[0]), int(size[1]))
    if "resize" in [layer.name for layer in model.layers]:
        resize = model.get_layer("resize")
        return (int(resize.height), int(resize.width))
    return (224, 224)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return str(value)
    return f"{float(value):.{digits}f}"


def _accuracy_name(metrics: dict[str, Any]) -> str:
    return "subset accuracy (all labels right)" if metrics["task"] == "multilabel" else "accuracy"


# --- helpers: mistakes and Grad-CAM ---------------------------------------------------------


@dataclass
class _Outcome:
    """Per example: right or wrong, the class to explain, and the model's confidence in its decision."""

    correct: np.ndarray  # (N,) bool
    explained: np.ndarray  # (N,) int
    confidence: np.ndarray  # (N,) float


def _outcomes(truth: np.ndarray, probs: np.ndarray, decided: np.ndarray, multi_label: bool) -> _Outcome:
    probs = np.asarray(probs, np.float64)
    if not multi_label:
        predicted = decided.argmax(1)
        correct = predicted == truth.argmax(1)
        return _Outcome(correct, predicted, probs[np.arange(len(probs)), predicted])
    # Multi-label: confidence in a decision is p for a "yes", 1 - p for a "no". A wrong row is
    # explained by its most confident wrong decision; a right row by its top label.
    decision_confidence = np.where(decided > 0, probs, 1 - probs)
    wrong = decided != truth
    worst = np.where(wrong, decision_confidence, -1.0)
    correct = ~wrong.any(1)
    explained = np.where(correct, probs.argmax(1), worst.argmax(1))
    confidence = np.where(correct, probs.max(1), worst.max(1))
    return _Outcome(correct, explained, confidence)


def _write_misclassified(
    path: Path, truth: np.ndarray, probs: np.ndarray, decided: np.ndarray, names: Sequence[str],
    row_paths: Sequence[str], multi_label: bool, outcome: _Outcome,
) -> list[dict[str, Any]]:
    """Writes ``misclassified.csv`` (most confident mistakes first); returns its rows."""
    rows = []
    for i in np.flatnonzero(~outcome.correct):
        true_labels = "|".join(names[j] for j in np.flatnonzero(truth[i]))
        predicted = "|".join(names[j] for j in np.flatnonzero(decided[i]))
        row: dict[str, Any] = {"path": row_paths[i], "true_label": true_labels, "predicted_label": predicted,
                               "confidence": float(outcome.confidence[i])}
        if multi_label:
            row["worst_label"] = names[int(outcome.explained[i])]
        else:
            row["true_label_probability"] = float(probs[i, int(truth[i].argmax())])
        rows.append(row)
    rows.sort(key=lambda r: -r["confidence"])
    columns = ["path", "true_label", "predicted_label", "confidence"]
    columns.append("worst_label" if multi_label else "true_label_probability")
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    return rows


def _write_gradcam(
    model: Any, row_paths: Sequence[str], truth: np.ndarray, outcome: _Outcome, names: Sequence[str],
    multi_label: bool, image_size: tuple[int, int], count: int, figures: Path,
) -> tuple[list[Path], dict[str, Any]]:
    """Grad-CAM overlays of the ``count`` most confident right and wrong examples."""
    import tensorflow as tf
    from PIL import Image

    from tlkit.explain import explain_images, overlay

    folder = figures / "gradcam"
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    info: dict[str, Any] = {"examples": {}}
    order = np.argsort(-outcome.confidence, kind="stable")
    for kind, wanted in (("right", True), ("wrong", False)):
        chosen = [int(i) for i in order if bool(outcome.correct[i]) == wanted][:count]
        if not chosen:
            continue
        images = np.stack([decode_and_resize(tf.constant(row_paths[i]), image_size).numpy() for i in chosen])
        explanation = explain_images(model, images, class_index=outcome.explained[chosen])
        info.update(method=explanation.method, layer=explanation.layer, note=explanation.note)
        entries = []
        for rank, (i, image, heat) in enumerate(zip(chosen, images, explanation.heatmaps), start=1):
            blended = overlay(image, heat)
            pair = np.concatenate([np.clip(image, 0, 255).astype(np.uint8), blended], axis=1)
            file = folder / f"{kind}_{rank:02d}.png"
            scale = max(1, math.ceil(192 / min(pair.shape[:2])))  # small inputs are unreadable at 1:1
            picture = Image.fromarray(pair)
            if scale > 1:
                picture = picture.resize((pair.shape[1] * scale, pair.shape[0] * scale), Image.Resampling.NEAREST)
            picture.save(file)
            written.append(file)
            entries.append({
                "file": file, "path": row_paths[i], "true": "|".join(names[j] for j in np.flatnonzero(truth[i])),
                "explained": names[int(outcome.explained[i])], "confidence": float(outcome.confidence[i]),
                "image": image, "overlay": blended,
            })
        grid = figures / f"gradcam_{kind}.png"
        _plot_gradcam_grid(entries, kind, explanation.method, multi_label, grid)
        written.append(grid)
        info[f"gradcam_{kind}"] = grid
        info["examples"][kind] = [{k: v for k, v in e.items() if k not in ("image", "overlay")} for e in entries]
    return written, info


# --- helpers: plots (matplotlib, Agg canvas, no pyplot state) ---------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    fig.savefig(path, format="png", bbox_inches="tight")


def _plot_confusion(metrics: dict[str, Any], path: Path, normalised: bool) -> None:
    names = metrics["class_names"]
    if metrics["task"] == "multilabel":
        _plot_multilabel_confusion(metrics, path, normalised)
        return
    counts = np.asarray(metrics["confusion_matrix"], np.float64)
    c = len(names)
    rows = counts.sum(1, keepdims=True)
    values = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0) if normalised else counts
    side = min(max(4.5, 0.45 * c + 2.5), 26.0)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot()
    top = 1.0 if normalised else max(float(values.max()), 1.0)
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=top)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fontsize = 10 if c <= 10 else 8 if c <= 25 else 6
    ax.set_xticks(range(c), labels=names, rotation=45 if c <= 25 else 90, ha="right", fontsize=fontsize)
    ax.set_yticks(range(c), labels=names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix, rows normalised (diagonal = recall)"
                 if normalised else "confusion matrix (counts)", fontsize=10)
    if c <= 30:
        for i in range(c):
            for j in range(c):
                text = f"{values[i, j]:.2f}" if normalised else f"{int(values[i, j])}"
                colour = "white" if values[i, j] > top / 2 else "black"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=fontsize)
    _save(fig, path)


def _plot_multilabel_confusion(metrics: dict[str, Any], path: Path, normalised: bool) -> None:
    names = metrics["class_names"][:36]
    columns = min(len(names), 6)
    rows = math.ceil(len(names) / columns)
    fig = _figure(2.4 * columns, 2.4 * rows + 0.4)
    for k, name in enumerate(names):
        ax = fig.add_subplot(rows, columns, k + 1)
        counts = np.asarray(metrics["confusion_matrix"][name], np.float64)
        totals = counts.sum(1, keepdims=True)
        values = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0) if normalised else counts
        top = 1.0 if normalised else max(float(values.max()), 1.0)
        ax.imshow(values, cmap="Blues", vmin=0.0, vmax=top)
        for i in range(2):
            for j in range(2):
                text = f"{values[i, j]:.2f}" if normalised else f"{int(values[i, j])}"
                ax.text(j, i, text, ha="center", va="center", color="white" if values[i, j] > top / 2 else "black")
        ax.set_xticks([0, 1], labels=["no", "yes"], fontsize=8)
        ax.set_yticks([0, 1], labels=["no", "yes"], fontsize=8)
        ax.set_title(name, fontsize=9)
        if k % columns == 0:
            ax.set_ylabel("true", fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
    extra = " (first 36 labels)" if len(metrics["class_names"]) > 36 else ""
    fig.suptitle(("per-label confusion, rows normalised" if normalised else "per-label confusion (counts)") + extra,
                 fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def _curve_columns(metrics: dict[str, Any]) -> list[int]:
    names = metrics["class_names"]
    if metrics["task"] == "binary":
        return [names.index(metrics["positive_class"])]
    return list(range(len(names)))


def _operating_points(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    op = metrics.get("operating_point")
    if not op:
        return {}
    return {metrics["positive_class"]: op} if metrics["task"] == "binary" else op


def _plot_roc(truth: np.ndarray, probs: np.ndarray, metrics: dict[str, Any], path: Path) -> None:
    names = metrics["class_names"]
    columns = _curve_columns(metrics)
    points = _operating_points(metrics)
    fig = _figure(6.5, 6.0)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="chance")
    drawn = 0
    for i in columns:
        auc = metrics["per_class"][names[i]]["roc_auc"]
        if auc is None:
            continue
        fpr, tpr, _ = roc_curve(truth[:, i], probs[:, i])
        line = ax.plot(fpr, tpr, linewidth=1.5 if len(columns) <= 12 else 0.8, label=f"{names[i]} (AUC {auc:.3f})")
        point = points.get(names[i])
        if point and point["sensitivity"] is not None and point["specificity"] is not None:
            ax.plot([1 - point["specificity"]], [point["sensitivity"]], marker="o", color=line[0].get_color())
        drawn += 1
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    kind = {"binary": "", "multiclass": ", one-vs-rest", "multilabel": ", per label"}[metrics["task"]]
    ax.set_title(f"ROC curves{kind}" + ("; dots = operating point" if points else ""), fontsize=10)
    if drawn == 0:
        ax.text(0.5, 0.5, "undefined: every class needs positive and negative examples", ha="center")
    if drawn <= 12:
        ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _plot_precision_recall(truth: np.ndarray, probs: np.ndarray, metrics: dict[str, Any], path: Path) -> None:
    names = metrics["class_names"]
    columns = _curve_columns(metrics)
    fig = _figure(6.5, 6.0)
    ax = fig.add_subplot()
    drawn = 0
    for i in columns:
        ap = metrics["per_class"][names[i]]["pr_auc"]
        if ap is None:
            continue
        precision, recall, _ = precision_recall_curve(truth[:, i], probs[:, i])
        line = ax.step(np.r_[0.0, recall], np.r_[precision[0], precision], where="pre",
                       linewidth=1.5 if len(columns) <= 12 else 0.8, label=f"{names[i]} (AP {ap:.3f})")
        if len(columns) == 1:
            prevalence = truth[:, i].mean()
            ax.axhline(prevalence, color=line[0].get_color(), linestyle=":", linewidth=1,
                       label=f"prevalence {prevalence:.3f}")
        drawn += 1
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (PPV)")
    ax.set_title("precision-recall curves", fontsize=10)
    if drawn and drawn <= 12:
        ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _plot_reliability(
    truth: np.ndarray, raw: np.ndarray, calibrated: np.ndarray | None, multi_label: bool,
    temperature: float | None, path: Path,
) -> None:
    fig = _figure(6.0, 7.0)
    grid = fig.add_gridspec(2, 1, height_ratios=(3, 1), hspace=0.08)
    ax = fig.add_subplot(grid[0])
    hist = fig.add_subplot(grid[1], sharex=ax)
    before = reliability_bins(truth, raw, DEFAULT_BINS, multi_label)
    width = 1.0 / DEFAULT_BINS
    centres = np.array([(b["lower"] + b["upper"]) / 2 for b in before])
    accuracy = np.array([b["accuracy"] if b["count"] else 0.0 for b in before])
    ax.bar(centres, accuracy, width=width * 0.95, color="tab:blue", alpha=0.7, edgecolor="black", linewidth=0.5,
           label=f"model (ECE {_ece_from_bins(before):.3f})")
    confidence = np.array([b["confidence"] if b["count"] else np.nan for b in before])
    ax.bar(centres, confidence - accuracy, bottom=accuracy, width=width * 0.95, color="none", edgecolor="tab:red",
           hatch="//", linewidth=0.8, label="gap to the mean confidence of the bin")
    if calibrated is not None:
        after = reliability_bins(truth, calibrated, DEFAULT_BINS, multi_label)
        xs = [b["confidence"] for b in after if b["count"]]
        ys = [b["accuracy"] for b in after if b["count"]]
        ax.plot(xs, ys, marker="o", color="tab:green",
                label=f"after temperature scaling, T = {temperature:.2f} (ECE {_ece_from_bins(after):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed frequency of the label" if multi_label else "accuracy")
    ax.set_title("reliability diagram", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.tick_params(labelbottom=False)
    hist.bar(centres, [b["count"] for b in before], width=width * 0.95, color="grey")
    hist.set_ylabel("count")
    hist.set_xlabel("predicted probability of each label" if multi_label else "confidence (top probability)")
    _save(fig, path)


def _plot_training(history: dict[str, Any], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    records = history["epochs"]
    epochs = np.array([r["epoch"] for r in records], np.float64)
    stages = history.get("stages") or []
    panels = [("loss", ("loss", "val_loss")), ("accuracy", ("accuracy", "val_accuracy")), ("learning rate", ("lr",))]
    panels = [(title, keys) for title, keys in panels if any(k in r for r in records for k in keys)]
    fig = _figure(8.0, 2.6 * len(panels) + 0.6)
    axes = [fig.add_subplot(len(panels), 1, k + 1) for k in range(len(panels))]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            xs = [e for e, r in zip(epochs, records) if r.get(key) is not None and math.isfinite(float(r[key]))]
            ys = [float(r[key]) for r in records if r.get(key) is not None and math.isfinite(float(r[key]))]
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=key)
        if title == "learning rate" and all(float(r.get("lr", 0)) > 0 for r in records if "lr" in r):
            ax.set_yscale("log")
        ax.set_ylabel(title)
        for stage in stages[1:]:
            ax.axvline(stage["first_epoch"] - 0.5, color="black", linestyle="--", linewidth=1, alpha=0.6)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if title != "learning rate":
            ax.legend(fontsize=8, loc="best")
    for stage in stages:
        middle = (stage["first_epoch"] + stage["last_epoch"]) / 2
        axes[0].text(middle, 1.02, f"stage {stage['name']}", transform=axes[0].get_xaxis_transform(),
                     ha="center", va="bottom", fontsize=9)
    axes[-1].set_xlabel("epoch (across stages; dashed lines = stage boundaries)")
    fig.tight_layout()
    _save(fig, path)


def _plot_gradcam_grid(entries: list[dict[str, Any]], kind: str, method: str, multi_label: bool, path: Path) -> None:
    columns = min(len(entries), 3)
    rows = math.ceil(len(entries) / columns)
    fig = _figure(4.4 * columns, 2.9 * rows + 0.4)
    verb = "explained" if multi_label else "predicted"
    for k, entry in enumerate(entries):
        ax = fig.add_subplot(rows, columns, k + 1)
        image = np.clip(entry["image"], 0, 255).astype(np.uint8)
        ax.imshow(np.concatenate([image, entry["overlay"]], axis=1))
        ax.set_title(f"true {entry['true']}, {verb} {entry['explained']}\nconfidence {entry['confidence']:.3f}",
                     fontsize=8)
        ax.axis("off")
    label = "most confident correct predictions" if kind == "right" else "most confident mistakes"
    fig.suptitle(f"{method}: {label} (left: image, right: heatmap)", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


# --- helpers: the report ------------------------------------------------------------------


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _link(path: Path, base: Path) -> str:
    import os

    return Path(os.path.relpath(path, base)).as_posix()


def _ci(interval: Sequence[Any]) -> str:
    low, high = interval
    return "-" if low is None else f"{low:.3f}-{high:.3f}"


def _report_markdown(
    metrics: dict[str, Any], out: Path, run: Path, plots: dict[str, Path], gradcam: dict[str, Any],
    wrong: list[dict[str, Any]], calibration: Path | None, notes: list[str],
) -> str:
    m = metrics
    task = {"binary": "binary (single-label)", "multiclass": "multi-class (single-label)",
            "multilabel": "multi-label"}[m["task"]]
    lines = [f"# Evaluation of `{run.name}`", ""]
    lines += [
        f"- **Data:** {m['data']['source']}: {m['count']} examples, {len(m['class_names'])} classes ({task})",
        *([f"- **Model:** `{_link(run / 'model.keras', out)}`"] if (run / "model.keras").is_file() else []),
        f"- **Decision rule:** {m['decision']}",
        f"- **Written:** {time.strftime('%Y-%m-%d %H:%M')} by `tlkit evaluate`; all numbers are in "
        f"[metrics.json](metrics.json)",
        "",
    ]
    summary = [(_accuracy_name(m), _fmt(m["accuracy"]), _ci(m["accuracy_ci95"]))]
    summary += [(f"top-{k} accuracy", _fmt(v), "") for k, v in m.get("top_k_accuracy", {}).items()]
    summary += [
        ("macro F1", _fmt(m["macro_avg"]["f1"]), ""), ("weighted F1", _fmt(m["weighted_avg"]["f1"]), ""),
        ("ROC-AUC" + (f" ({m['positive_class']})" if m["task"] == "binary" else " (macro)"), _fmt(m["roc_auc"]), ""),
        ("PR-AUC / average precision" + (f" ({m['positive_class']})" if m["task"] == "binary" else " (macro)"),
         _fmt(m["pr_auc"]), ""),
        ("expected calibration error", _fmt(m["calibration"]["ece"]), ""),
        ("negative log-likelihood", _fmt(m["nll"]), ""), ("Brier score", _fmt(m["brier"]), ""),
    ]
    if m["task"] == "multilabel":
        summary.insert(1, ("label accuracy (1 - Hamming loss)", _fmt(m["label_accuracy"]), ""))
    lines += ["## Summary", "", _md_table(("metric", "value", "95% CI"), summary), ""]
    if notes:
        lines += ["**Read with care:**", ""] + [f"- {note}" for note in notes] + [""]

    lines += ["## Per-class metrics", ""]
    rows = [
        (name, _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), v["support"], _fmt(v["roc_auc"]),
         _fmt(v["pr_auc"]))
        for name, v in m["per_class"].items()
    ]
    rows.append(("**macro avg**", _fmt(m["macro_avg"]["precision"]), _fmt(m["macro_avg"]["recall"]),
                 _fmt(m["macro_avg"]["f1"]), m["support_total"], _fmt(m["macro_avg"]["roc_auc"]),
                 _fmt(m["macro_avg"]["pr_auc"])))
    rows.append(("**weighted avg**", _fmt(m["weighted_avg"]["precision"]), _fmt(m["weighted_avg"]["recall"]),
                 _fmt(m["weighted_avg"]["f1"]), m["support_total"], "", ""))
    lines += [_md_table(("class", "precision", "recall", "F1", "support", "ROC-AUC", "PR-AUC"), rows), ""]
    lines += ["Support is the number of evaluated examples of the class. ROC-AUC and PR-AUC are "
              + ("one-vs-rest. " if m["task"] == "multiclass" else "per class. ")
              + "The macro average weighs every class equally; the weighted one by support.", ""]

    points = _operating_points(m)
    if points:
        lines += ["## Operating point", ""]
        rows = [
            (name, f"{p['threshold']:.3f}", p["threshold_source"],
             f"{_fmt(p['sensitivity'])} ({_ci(p['sensitivity_ci95'])})",
             f"{_fmt(p['specificity'])} ({_ci(p['specificity_ci95'])})", _fmt(p["ppv"]), _fmt(p["npv"]),
             p["tp"], p["fp"], p["tn"], p["fn"])
            for name, p in points.items()
        ]
        lines += [_md_table(("class", "threshold", "chosen by", "sensitivity (95% CI)", "specificity (95% CI)",
                             "PPV", "NPV", "TP", "FP", "TN", "FN"), rows), ""]
        lines += ["A case counts as positive when its probability is at or above the threshold. Choose your own "
                  "with `tlkit evaluate RUN --threshold T` (pick it on validation data, not on this test set).", ""]

    lines += ["## Confusion matrix", ""]
    lines += [f"![confusion matrix, counts]({_link(plots['confusion_matrix'], out)})",
              f"![confusion matrix, normalised]({_link(plots['confusion_matrix_normalized'], out)})", ""]
    if m["task"] != "multilabel" and len(m["class_names"]) <= 12:
        header = ["true \\ predicted", *m["class_names"]]
        rows = [(name, *counts) for name, counts in zip(m["class_names"], m["confusion_matrix"])]
        lines += [_md_table(header, rows), ""]

    lines += ["## ROC and precision-recall curves", "",
              f"![ROC curves]({_link(plots['roc'], out)})",
              f"![precision-recall curves]({_link(plots['precision_recall'], out)})", ""]

    cal = m["calibration"]
    lines += ["## Calibration", "",
              f"Expected calibration error (ECE, {cal['n_bins']} bins): **{_fmt(cal['ece'])}**. It is the average gap "
              "between how confident the model is and how often it is right; a model that says 0.9 should be "
              "right 9 times in 10.", ""]
    if cal.get("temperature") is not None:
        lines += [
            f"Temperature scaling was fitted on the validation split: **T = {cal['temperature']:.3f}** "
            f"(ECE before: {_fmt(cal['ece_uncalibrated'])}; every metric above uses the calibrated probabilities). "
            f"It is stored in [{_link(calibration, out)}]({_link(calibration, out)}) "
            "(`{\"temperature\": T}`). Apply it to the model's probabilities `p`:",
            "",
            "```python",
            "import json, tlkit.evaluate",
            "T = json.load(open(\"RUN_DIR/calibration.json\"))[\"temperature\"]",
            f"calibrated = tlkit.evaluate.apply_temperature(p, T, multi_label={m['task'] == 'multilabel'})",
            "# i.e. " + ("sigmoid(logit(p) / T)" if m["task"] == "multilabel" else "softmax(log(p) / T)"),
            "```",
            "",
        ]
    else:
        lines += ["Not calibrated; run `tlkit evaluate RUN --calibrate` to fit a temperature on the validation "
                  "split.", ""]
    lines += [f"![reliability diagram]({_link(plots['reliability'], out)})", ""]

    lines += ["## Training curves", ""]
    if "training_curves" in plots:
        lines += [f"![training curves]({_link(plots['training_curves'], out)})", "",
                  "Dashed vertical lines mark the start of each fine-tuning stage.", ""]
    else:
        lines += ["No training history found.", ""]

    if gradcam.get("method"):
        lines += ["## Where the model looks", "",
                  f"Method: **{gradcam['method']}**"
                  + (f" on layer `{gradcam['layer']}`" if gradcam.get("layer") else "")
                  + (f" ({gradcam['note']})" if gradcam.get("note") else "")
                  + ". Warm colours mark the regions that raised the score of the explained class. A model that "
                  "looks at labels, rulers or borders instead of the finding has learnt a shortcut.", ""]
        for kind, title in (("right", "Most confident correct predictions"), ("wrong", "Most confident mistakes")):
            key = f"gradcam_{kind}"
            if key not in plots:
                continue
            lines += [f"### {title}", "", f"![{title}]({_link(plots[key], out)})", ""]
            rows = [(f"[{_link(e['file'], out)}]({_link(e['file'], out)})", f"`{e['path']}`", e["true"], e["explained"],
                     _fmt(e["confidence"])) for e in gradcam["examples"][kind]]
            lines += [_md_table(("overlay", "file", "true", "explained class", "confidence"), rows), ""]

    lines += ["## Misclassified examples", ""]
    if wrong:
        lines += [f"{len(wrong)} of {m['count']} examples are misclassified; all of them, most confident first, are "
                  "in [misclassified.csv](misclassified.csv). Confident mistakes are often label errors: check "
                  "those files first.", ""]
        rows = [(f"`{r['path']}`", r["true_label"], r["predicted_label"] or "(none)", _fmt(r["confidence"]))
                for r in wrong[:15]]
        lines += [_md_table(("file", "true", "predicted", "confidence"), rows), ""]
    else:
        lines += ["No example is misclassified ([misclassified.csv](misclassified.csv) is empty).", ""]
    return "\n".join(lines)


# --- command line -------------------------------------------------------------------------


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        raise ConfigError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.gradcam < 0:
        raise ConfigError(f"--gradcam must be >= 0, got {args.gradcam}")
    report = evaluate_run(
        args.run_dir, args.data, out=args.out, threshold=args.threshold, calibrate=args.calibrate,
        gradcam=args.gradcam, positive=args.positive, batch_size=args.batch_size,
    )
    print(report.summary())
    return 0


def add_cli(sub: Any) -> None:
    """Registers ``tlkit evaluate``."""
    p = sub.add_parser(
        "evaluate", help="evaluate a run: metrics, plots, calibration, Grad-CAM and a report.md",
        description="Writes report.md, metrics.json, misclassified.csv and evaluation/*.png into the run "
                    "directory (or --out) and prints a summary.",
    )
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--data", help="a class folder or CSV manifest instead of the run's test split")
    p.add_argument("--out", help="write the report here instead of the run directory")
    p.add_argument("--threshold", type=float,
                   help="binary / multi-label decision threshold and operating point (default: arg-max / 0.5 "
                        "decisions, operating point by Youden's J on the validation split)")
    p.add_argument("--positive", help="binary models: the positive class (default: the second class)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit temperature scaling on the validation split; saves RUN_DIR/calibration.json")
    p.add_argument("--gradcam", type=int, default=6, metavar="N",
                   help="Grad-CAM overlays of the N most confident right and wrong examples (0: none; default 6)")
    p.add_argument("--batch-size", type=int, default=32)
    p.set_defaults(func=_cmd_evaluate)
