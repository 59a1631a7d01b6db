"""Macro one-vs-rest ROC AUC and areas under curves over a grid: the one implementation of each."""

from __future__ import annotations

import math

import numpy as np
import scipy.stats


def macro_auc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Macro one-vs-rest ROC AUC of every row: ``labels`` (B, N) int, ``scores`` (B, N, C) -> (B,).

    For class c with n_1 positives (label c) and n_0 negatives, AUC_c is the Mann-Whitney statistic
    U_c / (n_1 n_0) with U_c = (sum of the average ranks of the positives' scores) - n_1 (n_1 + 1) / 2
    (Hanley & McNeil 1982; tied scores count one half, as ``sklearn.metrics.roc_auc_score``). The macro AUC
    is the mean of AUC_c over the classes present in the row's labels; NaN for a row with fewer than two classes
    present or with a non-finite score.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 2 or scores.ndim != 3 or scores.shape[:2] != labels.shape:
        raise ValueError(f"labels must be (B, N) and scores (B, N, C), got {labels.shape} and {scores.shape}")
    B, N, C = scores.shape
    out = np.full(B, math.nan)
    if N == 0 or C == 0:
        return out
    total = np.zeros(B)
    n_present = np.zeros(B, dtype=np.int64)
    for c in range(C):
        pos = labels == c
        n_pos = pos.sum(1)
        n_neg = N - n_pos
        ranks = scipy.stats.rankdata(scores[:, :, c], axis=1)  # average ranks of tied scores
        u = (ranks * pos).sum(1) - n_pos * (n_pos + 1) / 2
        ok = (n_pos > 0) & (n_neg > 0)
        total[ok] += u[ok] / (n_pos[ok] * n_neg[ok])
        n_present += n_pos > 0
    ok = (n_present >= 2) & np.isfinite(scores).all(axis=(1, 2))
    out[ok] = total[ok] / n_present[ok]
    return out


def macro_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC of one set: ``labels`` (N,) int class indices, ``scores`` (N, C) class scores.

    The mean over the classes present in ``labels`` of AUC(labels == c, scores[:, c]) (:func:`macro_auc_rows`);
    NaN with fewer than two classes present or a non-finite score.
    """
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or scores.shape[0] != labels.size:
        raise ValueError(f"scores must have shape (N, C) with N = {labels.size} labels, got {scores.shape}")
    return float(macro_auc_rows(labels[None], scores[None])[0])


def area(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Area under a curve sampled at E points: the trapezoid rule over x (E,) along y's last axis (..., E).

    sum_e (x_{e+1} - x_e) (y_e + y_{e+1}) / 2; with one point (E = 1) the curve's single value y[..., 0].
    """
    y = np.asarray(y, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    if y.shape[-1:] != x.shape:
        raise ValueError(f"y must end with the grid's length {x.size}, got shape {y.shape}")
    if x.size == 1:
        return y[..., 0]
    return np.trapezoid(y, x, axis=-1)
