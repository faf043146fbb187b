"""Importance weights for source examples from a domain classifier's density ratio.

Covariate-shift correction (Shimodaira 2000; the discriminative estimate of Bickel et al.,
ICML 2007): a logistic regression told apart source (label 0) and target (label 1) features;
its odds estimate the density ratio

    w(x) = p_target(x) / p_source(x) = P(target | x) / P(source | x) * n_source / n_target.

Training on source examples weighted by ``w`` then estimates the loss on the target domain.
The raw ratios are clipped to :data:`CLIP` (a few confidently "target-like" examples would
otherwise carry the whole loss) and divided by their mean over the source training
features, so the weights average 1 there. :attr:`ImportanceWeights.effective_size` (Kish's
``(sum w)^2 / sum w^2``) says how many examples the weighted set is worth.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from tlkit.blas import one_blas_thread
from tlkit.errors import DataError

#: Raw density ratios are clipped to this range before the weights are normalised to mean 1.
CLIP: tuple[float, float] = (0.1, 10.0)
#: Inverse L2 strengths of the domain classifier, chosen by cross-validated log-loss.
C_GRID: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)


@dataclass
class ImportanceWeights:
    """A fitted density-ratio estimate: call it on ``(N, D)`` features to get ``(N,)`` weights.

    Attributes:
        classifier: the scikit-learn pipeline (standardise + logistic regression).
        prior: ``n_source / n_target`` of the fit.
        scale: the normaliser (mean clipped ratio on the source features of the fit).
        C: the chosen inverse L2 strength.
        source_weights: the weights of the source rows of the fit (mean 1).
    """

    classifier: Any
    prior: float
    scale: float
    C: float
    clip: tuple[float, float] = CLIP
    source_weights: np.ndarray = field(default_factory=lambda: np.ones(0))

    def ratio(self, features: np.ndarray) -> np.ndarray:
        """The clipped, un-normalised density ratio ``p_t / p_s`` of each row."""
        x = np.asarray(features, np.float64)
        log_odds = np.asarray(self.classifier.decision_function(x), np.float64)
        return np.clip(np.exp(np.clip(log_odds, -50, 50)) * self.prior, *self.clip)

    def __call__(self, features: np.ndarray) -> np.ndarray:
        """Weights ``(N,)`` float32: the clipped ratio over :attr:`scale`."""
        return (self.ratio(features) / self.scale).astype(np.float32)

    @property
    def effective_size(self) -> float:
        w = self.source_weights
        return float(w.sum() ** 2 / max(float((w ** 2).sum()), 1e-12)) if len(w) else 0.0

    def summary(self) -> dict[str, float]:
        w = self.source_weights
        return {"C": self.C, "min": float(w.min()), "max": float(w.max()), "effective_size": self.effective_size,
                "examples": len(w), "clip": list(self.clip)}


def fit_importance_weights(
    source: np.ndarray, target: np.ndarray, *, clip: tuple[float, float] = CLIP, seed: int = 0,
) -> ImportanceWeights:
    """Fits the domain classifier on ``source`` (n_s, D) against ``target`` (n_t, D) features.

    ``C`` is chosen from :data:`C_GRID` by stratified 3-fold cross-validated log-loss (the ratio
    needs calibrated probabilities, not only a good ranking).

    Raises:
        DataError: fewer than 3 rows in either domain, or mismatched feature sizes.
    """
    xs, xt = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if xs.ndim != 2 or xt.ndim != 2 or xs.shape[1] != xt.shape[1]:
        raise DataError(f"source and target features must be (N, D) with the same D, got {xs.shape} and {xt.shape}")
    if len(xs) < 3 or len(xt) < 3:
        raise DataError(f"importance weights need at least 3 source and 3 target examples, got {len(xs)} and "
                        f"{len(xt)}")
    x = np.concatenate([xs, xt])
    y = np.concatenate([np.zeros(len(xs), int), np.ones(len(xt), int)])
    folds = StratifiedKFold(3, shuffle=True, random_state=seed)
    scores = {}
    with warnings.catch_warnings(), one_blas_thread():  # small fits (tlkit/blas.py)
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in C_GRID:
            scores[c] = float(cross_val_score(_pipeline(c, seed), x, y, cv=folds, scoring="neg_log_loss").mean())
        chosen = max(scores, key=lambda c: scores[c])
        classifier = _pipeline(chosen, seed).fit(x, y)
    weights = ImportanceWeights(classifier, len(xs) / len(xt), 1.0, chosen, clip)
    raw = weights.ratio(xs)
    weights.scale = float(raw.mean())
    weights.source_weights = (raw / weights.scale).astype(np.float32)
    return weights


def _pipeline(c: float, seed: int) -> Any:
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
