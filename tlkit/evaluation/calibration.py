"""Calibration: reliability bins, expected calibration error, temperature scaling.

Bins are scikit-learn's (:func:`sklearn.calibration.calibration_curve`, ``strategy="uniform"``);
the temperature is fitted by :func:`scipy.optimize.minimize_scalar` on the negative
log-likelihood of a validation split (Guo et al., ICML 2017).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.calibration import calibration_curve

from tlkit.errors import ConfigError, DataError
from tlkit.evaluation.decisions import EPS, indicator

DEFAULT_BINS = 15
#: Search range of the temperature; a fit at either end means the data cannot calibrate it.
TEMPERATURE_BOUNDS = (0.05, 20.0)


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
    # The bin of each value, by calibration_curve's own rule, for the counts it does not return.
    count = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=n_bins)
    filled = np.flatnonzero(count)
    accuracy = np.full(n_bins, np.nan)
    mean_confidence = np.full(n_bins, np.nan)
    if len(confidence):
        accuracy[filled], mean_confidence[filled] = calibration_curve(
            correct, confidence, n_bins=n_bins, strategy="uniform"
        )
    return [
        {
            "lower": float(edges[b]), "upper": float(edges[b + 1]), "count": int(count[b]),
            "confidence": float(mean_confidence[b]) if count[b] else None,
            "accuracy": float(accuracy[b]) if count[b] else None,
        }
        for b in range(n_bins)
    ]


def expected_calibration_error(
    y_true: np.ndarray, probabilities: np.ndarray, n_bins: int = DEFAULT_BINS, multi_label: bool = False
) -> float:
    """ECE = sum over bins of (bin count / N) * |accuracy - confidence| (see :func:`reliability_bins`).

    0 is perfectly calibrated; 0.1 means confidences are off by ten points on average.
    """
    return ece_from_bins(reliability_bins(y_true, probabilities, n_bins, multi_label))


def ece_from_bins(bins: Sequence[dict[str, Any]]) -> float:
    """The ECE of :func:`reliability_bins` output (NaN for no examples)."""
    total = sum(b["count"] for b in bins)
    if not total:
        return float("nan")
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def nll(truth: np.ndarray, probs: np.ndarray, multi_label: bool) -> float:
    """Mean negative log-likelihood: per example (softmax) or per (example, label) (sigmoid).

    ``truth``: (N, C) 0/1 indicators; ``probs``: (N, C).
    """
    clipped = np.clip(np.asarray(probs, np.float64), EPS, 1 - EPS)
    if multi_label:
        return float(-(truth * np.log(clipped) + (1 - truth) * np.log(1 - clipped)).mean())
    return float(-(truth * np.log(clipped)).sum(1).mean())


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
        clipped = np.clip(probs, EPS, 1 - EPS)
        logits = np.log(clipped) - np.log1p(-clipped)
        return (1.0 / (1.0 + np.exp(-logits / temperature))).astype(np.float32)
    logits = np.log(np.clip(probs, EPS, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=-1, keepdims=True)).astype(np.float32)


def fit_temperature(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    multi_label: bool = False,
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """The temperature T minimising the negative log-likelihood of ``y_true`` (fit on validation data).

    Args:
        y_true: (N,) indices or (N, C) one-hot / multi-hot. probabilities: (N, C).
        bounds: search range of T (a bounded scalar search over log T; the NLL is unimodal in T).

    Returns:
        T as a float; apply it with :func:`apply_temperature`.
    """
    probs = np.asarray(probabilities, np.float64)
    truth = indicator(y_true, probs.shape[1], multi_label)
    if not len(truth):
        raise DataError("cannot fit a temperature on zero examples")

    def loss(log_t: float) -> float:
        return nll(truth, apply_temperature(probs, math.exp(log_t), multi_label).astype(np.float64), multi_label)

    found = minimize_scalar(
        loss, bounds=(math.log(bounds[0]), math.log(bounds[1])), method="bounded", options={"xatol": 1e-6}
    )
    return float(math.exp(found.x))


def at_search_edge(temperature: float, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> bool:
    """Whether a fitted temperature sits at an end of its search range (the fit is not meaningful)."""
    return min(abs(math.log(temperature / bounds[0])), abs(math.log(temperature / bounds[1]))) < 1e-3


def _confidence_and_outcome(y_true: Any, probabilities: Any, multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probabilities, np.float64)
    truth = indicator(y_true, probs.shape[1], multi_label)
    if multi_label:
        return np.clip(probs.ravel(), 0.0, 1.0), truth.ravel()
    predicted = probs.argmax(1)
    return np.clip(probs.max(1), 0.0, 1.0), (truth.argmax(1) == predicted).astype(np.float64)
