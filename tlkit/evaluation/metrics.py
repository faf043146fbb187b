"""Classification metrics of predicted probabilities: :func:`compute_metrics` and its parts.

ROC-AUC, average precision and the ROC curve behind Youden's J are scikit-learn's
(:mod:`sklearn.metrics`); counts, rates and Wilson intervals are computed here from the
decisions of :mod:`tlkit.evaluation.decisions`. ``tests/test_evaluate.py`` checks every
number against scikit-learn on the same predictions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from tlkit.errors import DataError
from tlkit.evaluation.calibration import DEFAULT_BINS, ece_from_bins, nll, reliability_bins
from tlkit.evaluation.decisions import decide, describe_threshold, indicator, per_class, positive_index, task_of


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
    truth = indicator(y_true, len(names), multi_label)
    if len(truth) != len(probs):
        raise DataError(f"{len(truth)} labels but {len(probs)} predictions")
    n, c = probs.shape
    task = task_of(c, multi_label)
    metrics: dict[str, Any] = {"task": task, "count": int(n), "class_names": names}

    pos = positive_index(positive, names) if task == "binary" else None
    decided = decide(probs, task, threshold, pos)  # (N, C) 0/1
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
        metrics["decision"] = f"p >= {describe_threshold(threshold, 0.5)} per label"
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
            metrics["decision"] = f"{names[pos]} when p({names[pos]}) >= {describe_threshold(threshold, 0.5)}"
        else:
            metrics["decision"] = "arg-max"
    precision = _divide(tp, tp + fp)
    recall = _divide(tp, tp + fn)
    f1 = _divide(2 * tp, 2 * tp + fp + fn)
    roc = [_defined(roc_auc_score, truth[:, i], probs[:, i]) for i in range(c)]
    pr = [_defined(average_precision_score, truth[:, i], probs[:, i]) for i in range(c)]
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
            given = per_class(threshold, i, c) if threshold is not None else None
            if given is not None:
                t, source = given, "given"
            elif operating_threshold is not None:
                t, source = per_class(operating_threshold, i, c), threshold_source or "given"
            else:
                t, source = youden_threshold(truth[:, i], probs[:, i]), "Youden's J on the evaluated data (optimistic)"
            points[names[i]] = operating_point(truth[:, i], probs[:, i], t, source)
        metrics["operating_point"] = points[names[pos]] if task == "binary" else points

    metrics["nll"] = nll(truth, probs, multi_label)
    metrics["brier"] = float(((probs - truth) ** 2).sum(1).mean()) if not multi_label else \
        float(((probs - truth) ** 2).mean())
    bins = reliability_bins(truth, probs, n_bins, multi_label)
    metrics["calibration"] = {"ece": ece_from_bins(bins), "n_bins": n_bins, "bins": bins}
    return metrics


def top_k_accuracy(y_true: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Fraction of examples whose true class is among the ``k`` highest probabilities.

    ``y_true``: (N,) class indices. ``probabilities``: (N, C). Ties rank the lower class
    index first, as arg-max does, so top-1 equals accuracy (scikit-learn's
    ``top_k_accuracy_score`` ranks the higher index first, which is why this is not it).
    """
    probs = np.asarray(probabilities)
    labels = np.asarray(y_true).astype(int)
    true_score = probs[np.arange(len(labels)), labels][:, None]
    index = np.arange(probs.shape[1])[None, :]
    rank = (probs > true_score).sum(1) + ((probs == true_score) & (index < labels[:, None])).sum(1)
    return float((rank < k).mean()) if len(labels) else float("nan")


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
    # Every distinct score is a threshold (no point dropped), the first one +inf.
    fpr, tpr, thresholds = roc_curve(y, np.asarray(scores, np.float64), drop_intermediate=False)
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


def operating_points(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{class name: operating point}`` of :func:`compute_metrics` output (empty for multi-class)."""
    op = metrics.get("operating_point")
    if not op:
        return {}
    return {metrics["positive_class"]: op} if metrics["task"] == "binary" else op


def _divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ratio, 0 where the denominator is 0 (scikit-learn's zero_division default)."""
    numerator = np.asarray(numerator, np.float64)
    denominator = np.asarray(denominator, np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def _defined(score: Callable[..., float], y: np.ndarray, scores: np.ndarray) -> float | None:
    """A scikit-learn ranking score of one column; ``None`` where the column holds one class only."""
    positives = int(np.asarray(y).astype(bool).sum())
    if positives == 0 or positives == len(y):
        return None
    return float(score(y, scores))


def _mean_defined(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None
