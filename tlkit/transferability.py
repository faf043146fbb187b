"""Transferability scores: how well frozen features suit a labelled set, without training a head.

:func:`logme` is LogME (You, Liu, Wang and Long, "LogME: Practical Assessment of Pre-trained
Models for Transfer Learning", ICML 2021). For each class ``k`` it treats the one-hot column
``y_k`` as the target of a Bayesian linear model on the features ``F`` (N, D),

    w ~ N(0, alpha^-1 I_D),    y_k | F, w ~ N(F w, beta^-1 I_N),

maximises the log marginal likelihood (the *evidence*) over ``alpha`` and ``beta`` with
MacKay's fixed-point iteration, and returns the mean over classes of the maximum evidence
divided by ``N``. One SVD of ``F`` serves every class and every iteration: with
``F = U diag(s) V^T``, ``sigma = s**2`` and ``z = U^T y``,

    lambda = alpha / beta,   m = V diag(s / (sigma + lambda)) z,
    gamma  = sum_i sigma_i / (sigma_i + lambda),
    alpha <- gamma / |m|^2,  beta <- (N - gamma) / |y - F m|^2,

and the evidence is (Bishop, PRML eq. 3.86)

    D/2 log alpha + N/2 log beta - 1/2 sum_{i<=D} log(alpha + beta sigma_i)
    - beta/2 |y - F m|^2 - alpha/2 |m|^2 - N/2 log(2 pi),

where ``sigma_i = 0`` for the ``D - rank`` directions without data. As in the authors'
implementation the features are not centred and the model has no intercept.

Higher is better; values are comparable between backbones *on the same labelled set*, not
across data sets. The score is unchanged by rotating, rescaling or duplicating the feature
columns (the isotropic prior absorbs each), which ``tests/test_rank.py`` checks.
"""

from __future__ import annotations

import numpy as np

from tlkit.errors import DataError

_TINY = 1e-300  # keeps a denominator positive; far below any real |m|^2 or residual
LAMBDA_FLOOR = 1e-12


def logme(features: np.ndarray, labels: np.ndarray, *, max_iter: int = 100, tol: float = 1e-7) -> float:
    """LogME of ``features`` for ``labels`` (see the module docstring).

    Args:
        features: ``(N, D)`` real features of N labelled examples.
        labels: class indices ``(N,)`` (each class present becomes one target column), or a
            one-hot / multi-hot ``(N, K)`` matrix (each column with a positive is a target).
        max_iter / tol: the fixed-point iteration stops when ``alpha / beta`` changes by less
            than ``tol`` (relative), or after ``max_iter`` steps (it usually takes a handful).

    Returns:
        The mean over target columns of the maximum log evidence per example (a float; higher
        means the features predict the labels better under a linear model).

    Raises:
        DataError: shapes disagree, values are not finite, or no column has a positive.
    """
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) == 0:
        raise DataError(f"LogME needs (N, D) features, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise DataError("LogME features hold NaN or infinite values")
    targets = _target_columns(labels, len(f))
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s**2
    evidences = [_max_evidence(u.T @ y, sigma, float(y @ y), n, d, max_iter, tol) for y in targets.T]
    return float(np.mean(evidences)) / n


def _target_columns(labels: np.ndarray, count: int) -> np.ndarray:
    y = np.asarray(labels)
    if len(y) != count:
        raise DataError(f"LogME got {len(y)} labels for {count} feature rows")
    if y.ndim == 1:
        classes = np.unique(y)
        columns = (y[:, None] == classes[None, :]).astype(np.float64)
    elif y.ndim == 2:
        columns = np.asarray(y, np.float64)
        columns = columns[:, (columns != 0).any(axis=0)]
    else:
        raise DataError(f"LogME labels must be (N,) class indices or an (N, K) matrix, got shape {y.shape}")
    if columns.shape[1] == 0:
        raise DataError("LogME labels hold no positive example")
    return columns


def _max_evidence(z: np.ndarray, sigma: np.ndarray, y2: float, n: int, d: int, max_iter: int, tol: float) -> float:
    """Maximum log evidence of one target column, given ``z = U^T y`` and ``y2 = |y|^2``.

    The fixed-point iteration finds an interior maximum; the supremum may instead lie on an edge:
    ``alpha -> infinity`` (the features do not help with ``y``) or, with at most as many
    examples as features, ``beta -> infinity`` (they fit ``y`` exactly). Both edges are
    evaluated in closed form and the largest value is returned. ``lambda = alpha / beta`` is
    kept above ``1e-12 * max(sigma)`` so that ``beta`` stays finite.
    """
    z2 = z**2
    outside = max(y2 - float(z2.sum()), 0.0)  # the part of y that no linear model of F can reach
    floor = LAMBDA_FLOOR * float(sigma.max(initial=0.0)) or _TINY
    alpha, lam = 1.0, 1.0  # alpha = beta = 1, as in the authors' implementation
    for _ in range(max_iter):
        shrink = sigma + lam
        gamma = float(np.sum(sigma / shrink))
        # N - gamma summed term by term: 1 - sigma / (sigma + lambda) = lambda / (sigma + lambda),
        # exact where gamma itself rounds to N.
        free = (n - len(sigma)) + float(np.sum(lam / shrink))
        m2 = float(np.sum(sigma * z2 / shrink**2))
        residual = float(np.sum((lam / shrink) ** 2 * z2)) + outside
        alpha = gamma / max(m2, _TINY)
        beta = free / max(residual, _TINY)
        new_lam = max(alpha / beta, floor)
        converged = abs(new_lam - lam) <= tol * lam
        lam = new_lam
        if converged:
            break
    # The evidence at (alpha, alpha / lambda), with m and the residual for that lambda.
    beta = alpha / lam
    shrink = sigma + lam
    m2 = float(np.sum(sigma * z2 / shrink**2))
    residual = float(np.sum((lam / shrink) ** 2 * z2)) + outside
    log_det = float(np.sum(np.log(alpha + beta * sigma))) + (d - len(sigma)) * np.log(alpha)
    evidence = float(
        d / 2 * np.log(alpha) + n / 2 * np.log(beta) - log_det / 2
        - beta / 2 * residual - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi)
    )
    # The evidence may only grow towards an edge of the (alpha, beta) plane, and the iteration
    # drifts there too slowly to reach it; both edges have closed forms.
    # alpha -> infinity (w = 0, y ~ N(0, I / beta), beta = N / |y|^2): features useless for y.
    edges = [-n / 2 * (np.log(2 * np.pi * y2 / n) + 1) if y2 > 0 else -np.inf]
    # beta -> infinity (y = F w exactly, possible when the N x N Gram matrix F F^T is invertible):
    # max over alpha of log N(y; 0, F F^T / alpha), at alpha = N / (y^T (F F^T)^-1 y).
    if len(sigma) == n and sigma.min() > LAMBDA_FLOOR * sigma.max():
        fit = float(np.sum(z2 / sigma))
        if fit > 0:
            edges.append(-n / 2 * (np.log(2 * np.pi * fit / n) + 1) - float(np.sum(np.log(sigma))) / 2)
    return max(evidence, *(float(e) for e in edges))
