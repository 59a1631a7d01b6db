"""The bootstrap: the resampling scheme and the interval rule of every interval the study reports.

Resampling (Efron & Tibshirani 1993, ch. 6): a replicate draws n indices uniformly with replacement from the n
samples, ``rng.integers(0, n, size=(b, n))`` for a block of b replicates (:func:`resample`); within-class
(stratified) resampling applies that to each class in turn, so every replicate keeps the class sizes of the data.
The interval is the percentile interval (ibid., ch. 13): the (1 - ci)/2 and (1 + ci)/2 percentiles of the
replicate statistics (linear interpolation, ``numpy.percentile``), replicates whose statistic is undefined (NaN)
left out. Generators are seeded (``numpy.random.default_rng(seed)``): the same inputs and seed give the same
interval.

The rank-reversal probabilities resample images the same way, within class, but draw one resample of images per
replicate shared by every method and architecture (:func:`drift.stats.rank_reversal`), so that paired entries
stay paired.

Figures draw a cheaper band around mean curves, the normal approximation mean +- z_{(1+ci)/2} s / sqrt(n)
(:func:`mean_band`); it is a display aid, never a reported interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.stats

from .sample import ArrayLike, _as_array, _check_labels

# Elements drawn per bootstrap block: bounds memory for large samples without a Python loop per replicate.
_BOOT_BLOCK = 1 << 22


def resample(n: int, n_boot: int, rng: np.random.Generator) -> Iterator[tuple[int, int, np.ndarray]]:
    """Bootstrap draws of n indices for ``n_boot`` replicates, in blocks that bound memory.

    Yields ``(start, stop, idx)`` with ``idx = rng.integers(0, n, size=(stop - start, n))`` the draws of replicates
    start..stop-1; blocks hold about 2^22 indices (one block, hence one call, when n * n_boot is below that).
    """
    rows = max(1, _BOOT_BLOCK // max(1, n))
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        yield start, stop, rng.integers(0, n, size=(stop - start, n))


def percentile_interval(replicates: ArrayLike, ci: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates at level ``ci``: their (1 - ci)/2 and (1 + ci)/2 percentiles.

    Non-finite replicates (a statistic undefined on that resample) are left out; (NaN, NaN) when none is left.
    """
    r = np.asarray(replicates, dtype=np.float64).reshape(-1)
    r = r[np.isfinite(r)]
    if not r.size:
        return math.nan, math.nan
    lo, hi = np.percentile(r, [50 * (1 - ci), 50 * (1 + ci)])
    return float(lo), float(hi)


def bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n: int, n_boot: int = 1000, seed: int = 0,
              ci: float = 0.95) -> tuple[float, float]:
    """Percentile interval of a statistic of n samples resampled with replacement (not stratified).

    Args:
        statistic: maps a block of index draws (b, n) to the b replicate statistics (b,) (NaN where undefined).
        n: number of samples (> 0).
        n_boot: replicates; 0 gives (NaN, NaN).
        seed: seed of ``numpy.random.default_rng``.
        ci: interval level.

    Returns:
        (lo, hi) of :func:`percentile_interval`.
    """
    _check_boot(n_boot, ci)
    if not n_boot or n <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    boot = np.concatenate([np.asarray(statistic(idx), dtype=np.float64).reshape(-1)
                           for _, _, idx in resample(n, n_boot, rng)])
    return percentile_interval(boot, ci)


def mean_band(values: np.ndarray, ci: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Column means with a normal-approximation band: mean +- z_{(1+ci)/2} s / sqrt(n) (s: sample std, ddof 1).

    Non-finite entries are left out per column; the band collapses onto the mean where n < 2.

    Args:
        values: (N, E) per-sample values at E points.
        ci: band level (0.95: z = 1.95996...).

    Returns:
        (mean, lo, hi), each (E,); NaN where a column has no finite value.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 2:
        raise ValueError(f"values must have shape (N, E), got {v.shape}")
    z = float(scipy.stats.norm.ppf(0.5 + ci / 2))
    ok = np.isfinite(v)
    n = ok.sum(0)
    filled = np.where(ok, v, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n > 0, filled.sum(0) / np.maximum(n, 1), np.nan)
        dev = np.where(ok, v - mean, 0.0)
        sd = np.sqrt((dev**2).sum(0) / np.maximum(n - 1, 1))
        half = np.where(n >= 2, z * sd / np.sqrt(np.maximum(n, 1)), 0.0)
    return mean, mean - half, mean + half


@dataclass
class Aggregate:
    """Macro mean of per-sample values with its bootstrap interval.

    Attributes:
        mean: mean over the classes used (``class_used``) of the per-class means (NaN when no class is used).
        lo, hi: bootstrap percentile interval at level ``ci``; NaN when ``n_boot`` is 0 (no interval asked for)
            or no class is used.
        per_class: (n_classes,) per-class means of the finite values, classes left out included; NaN for classes
            without values.
        n_per_class: (n_classes,) number of finite values per class, classes left out included.
        n_excluded: number of non-finite values left out.
        ci, n_boot, seed: the interval's settings.
        class_used: (n_classes,) bool, True for the classes in the macro mean: those with at least
            ``min_per_class`` finite values. The others are left out of the mean and of every replicate.
        min_per_class: the minimum number of finite values for a class to be used.
        micro, micro_lo, micro_hi: the micro mean, the mean over every finite value of the classes used (each image
            weighs alike, so large classes weigh more), with the percentile interval of an image bootstrap of the
            same values (resampled with replacement, not within class).
    """

    mean: float
    lo: float
    hi: float
    per_class: np.ndarray
    n_per_class: np.ndarray
    n_excluded: int
    ci: float
    n_boot: int
    seed: int
    class_used: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    min_per_class: int = 1
    micro: float = math.nan
    micro_lo: float = math.nan
    micro_hi: float = math.nan

    def as_dict(self) -> dict:
        """Plain Python values (lists for the per-class arrays), e.g. for JSON or archive attributes."""
        d = asdict(self)
        d["per_class"] = self.per_class.tolist()
        d["n_per_class"] = self.n_per_class.tolist()
        d["class_used"] = self.class_used.tolist()
        return d


def _by_class(values: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[list[np.ndarray], int]:
    ok = np.isfinite(values)
    groups = [values[ok & (labels == c)] for c in range(n_classes)]
    return groups, int((~ok).sum())


def _boot_macro(groups: list[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot,) macro means of within-class resamples (with replacement) of the non-empty groups: for each group in
    order, :func:`resample` of its size."""
    present = [g for g in groups if g.size]
    total = np.zeros(n_boot)
    for g in present:
        for start, stop, idx in resample(g.size, n_boot, rng):
            total[start:stop] += g[idx].mean(axis=1)
    return total / max(1, len(present))


def _check_boot(n_boot: int, ci: float) -> None:
    """Validate bootstrap settings.

    ``n_boot = 0`` is accepted and means "no bootstrap": intervals and probabilities are then NaN by request, and
    the result records ``n_boot = 0`` so that a reader can tell them from a failed bootstrap. Configurations that
    must report intervals reject 0 themselves.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"n_boot must be an integer >= 0 (0: no bootstrap), got {n_boot!r}")
    if not (0 < ci < 1):
        raise ValueError(f"ci must lie in (0, 1), got {ci!r}")


def _check_min(min_per_class: int) -> None:
    if isinstance(min_per_class, bool) or not isinstance(min_per_class, (int, np.integer)) or min_per_class < 1:
        raise ValueError(f"min_per_class must be an integer >= 1, got {min_per_class!r}")


def aggregate(
    values: ArrayLike,
    labels: ArrayLike,
    n_classes: int,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    min_per_class: int = 1,
) -> Aggregate:
    """Per-sample values -> per-class means -> macro mean over the classes used, with a bootstrap interval; and the
    micro mean of the same values beside it (``Aggregate.micro``, with an image bootstrap interval).

    mean = (1 / |U|) sum_{c in U} mean_{i: y_i = c} v_i over the classes U with at least ``min_per_class`` finite
    values (a class mean from a handful of images would weigh as much as one from hundreds). The interval is the
    (1 - ci)/2 and (1 + ci)/2 percentiles of that statistic over ``n_boot`` replicates, each resampling the finite
    values of every class in U with replacement within the class (seeded with ``seed``).

    Args:
        values: (N,) per-sample values; NaN / inf are excluded and counted.
        labels: (N,) class of each sample, in 0..n_classes-1.
        n_classes: number of classes C.
        n_boot: bootstrap replicates; 0 asks for no interval (``lo`` and ``hi`` are NaN).
        seed: seed of the resampling.
        ci: interval level.
        min_per_class: fewest finite values for a class to enter the macro mean (>= 1).

    Returns:
        An :class:`Aggregate`; when no class is used its mean and interval are NaN.
    """
    v = _as_array(values, "values", "float")
    y = _as_array(labels, "labels", "int")
    if v.shape != y.shape:
        raise ValueError(f"values and labels must have one shape, got {v.shape} and {y.shape}")
    _check_labels(y, n_classes)
    _check_boot(n_boot, ci)
    _check_min(min_per_class)
    groups, n_excluded = _by_class(v, y, n_classes)
    counts = np.array([g.size for g in groups], dtype=np.int64)
    used = counts >= min_per_class
    per_class = np.array([g.mean() if g.size else math.nan for g in groups])
    mean = float(np.mean(per_class[used])) if used.any() else math.nan
    lo = hi = micro_lo = micro_hi = math.nan
    pooled = np.concatenate([g for g, u in zip(groups, used) if u]) if used.any() else np.zeros(0)
    micro = float(pooled.mean()) if pooled.size else math.nan
    if n_boot and used.any():
        rng = np.random.default_rng(seed)
        boot = _boot_macro([g for g, u in zip(groups, used) if u], n_boot, rng)
        lo, hi = percentile_interval(boot, ci)
        micro_lo, micro_hi = percentile_interval(_boot_macro([pooled], n_boot, rng), ci)
    return Aggregate(mean, lo, hi, per_class, counts, n_excluded, float(ci), int(n_boot), int(seed), used,
                     int(min_per_class), micro, micro_lo, micro_hi)

