"""Paired Wilcoxon signed-rank test: the one implementation used for TL-vs-FT and high-vs-complement pairs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.stats

from .sample import ArrayLike, _as_array


@dataclass
class PairedTest:
    """Wilcoxon signed-rank test of paired values (TL vs FT).

    Attributes:
        statistic: scipy's statistic (the smaller of the signed-rank sums for the two-sided test).
        pvalue: two-sided p-value; 1.0 when every pair is equal; NaN when no pair is left.
        n: pairs used (both values finite).
        n_excluded: pairs dropped for a non-finite value.
        median_diff: median of ft - tl over the pairs used.
    """

    statistic: float
    pvalue: float
    n: int
    n_excluded: int
    median_diff: float


def paired_test(tl: ArrayLike, ft: ArrayLike) -> PairedTest:
    """Paired two-sided Wilcoxon signed-rank test of H0: the differences d = ft - tl are symmetric about 0.

    ``scipy.stats.wilcoxon(tl, ft)`` with its defaults (zero differences discarded, 'wilcox' method). Pairs with a
    non-finite value are dropped and counted. When every difference is zero scipy cannot rank them; that case is
    reported as statistic 0.0 and p-value 1.0 (no evidence of a change), not as an error.

    Args:
        tl: (N,) values of the transfer-learning maps.
        ft: (N,) values of the fine-tuned maps of the same samples.

    Returns:
        A :class:`PairedTest`.
    """
    a = _as_array(tl, "tl", "float")
    b = _as_array(ft, "ft", "float")
    if a.shape != b.shape:
        raise ValueError(f"tl and ft must have one shape (paired samples), got {a.shape} and {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n, n_excluded = int(ok.sum()), int((~ok).sum())
    if n == 0:
        return PairedTest(math.nan, math.nan, 0, n_excluded, math.nan)
    d = b - a
    median = float(np.median(d))
    if not np.any(d != 0):
        return PairedTest(0.0, 1.0, n, n_excluded, median)
    res = scipy.stats.wilcoxon(a, b)
    return PairedTest(float(res.statistic), float(res.pvalue), n, n_excluded, median)

