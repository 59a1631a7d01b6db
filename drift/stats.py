"""Sample selection, macro-averaged aggregation with bootstrap intervals, paired tests and rank reversal.

Everything here works on per-sample values (N,) as numpy arrays (torch tensors and lists are accepted and
converted). NaN values mark samples that could not be scored (degenerate maps, see :mod:`drift.metrics`): they
are excluded and counted, never imputed. Bootstrap resampling is always within class, so every replicate keeps
the class sizes of the data, and is seeded: the same inputs and seed give the same interval.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Union

import numpy as np
import scipy.stats

if TYPE_CHECKING:
    import torch

ArrayLike = Union[np.ndarray, "torch.Tensor", Sequence[float]]
"""One-dimensional per-sample data: a numpy array, a torch tensor (any device) or a list."""

SELECTION_RULES = ("tp_both", "all", "tp_either")

STABILITY_DIRECTION: dict[str, bool] = {
    "iou@05": True,
    "iou@10": True,
    "iou@20": True,
    "iou@30": True,
    "pearson": True,
    "spearman": True,
    "ssim": True,
    "centroid_shift": False,
    "peak_shift": False,
    "entropy_change": False,
    "gini_change": False,
    "top10_mass_change": False,
    "lung_mass_change": False,
    "lesion_energy_change": False,
    "marker_mass_change": False,
}
"""metric -> True when a higher value means a more stable attribution (overlap and correlation), False when lower
does (displacement, and the size of a concentration change: rank ``*_change`` metrics on |value|, see
:func:`stability`)."""

# Elements drawn per bootstrap block: bounds memory for large classes without a Python loop per replicate.
_BOOT_BLOCK = 1 << 22


def _as_array(x, name: str, kind: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional (N,), got shape {a.shape}")
    if kind == "int":
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{name} must hold integer class indices, got dtype {a.dtype}")
        return a.astype(np.int64)
    if a.size and not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    return a.astype(np.float64)


def _check_labels(labels: np.ndarray, n_classes: int, name: str = "labels") -> None:
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
    bad = (labels < 0) | (labels >= n_classes)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name}[{i}] = {labels[i]} is not a class index in 0..{n_classes - 1}")


def select_samples(labels: ArrayLike, pred_tl: ArrayLike, pred_ft: ArrayLike, rule: str = "tp_both") -> np.ndarray:
    """Which samples enter the drift statistics.

    Rules: ``"tp_both"`` (the study's choice) label = pred_TL and label = pred_FT; ``"tp_either"`` label =
    pred_TL or label = pred_FT; ``"all"`` every sample.

    Args:
        labels: true classes (N,).
        pred_tl: predicted classes of the transfer-learning checkpoint (N,).
        pred_ft: predicted classes of the fine-tuned checkpoint (N,).
        rule: one of :data:`SELECTION_RULES`.

    Returns:
        Boolean mask (N,).
    """
    y = _as_array(labels, "labels", "int")
    p1 = _as_array(pred_tl, "pred_tl", "int")
    p2 = _as_array(pred_ft, "pred_ft", "int")
    if not (y.shape == p1.shape == p2.shape):
        raise ValueError(f"labels, pred_tl and pred_ft must have one shape, got {y.shape}, {p1.shape}, {p2.shape}")
    if rule == "tp_both":
        return (y == p1) & (y == p2)
    if rule == "tp_either":
        return (y == p1) | (y == p2)
    if rule == "all":
        return np.ones(y.shape, dtype=bool)
    raise ValueError(f"rule must be one of {SELECTION_RULES}, got {rule!r}")


@dataclass
class Aggregate:
    """Macro mean of per-sample values with its bootstrap interval.

    Attributes:
        mean: mean over present classes of the per-class means (NaN when no class has a value).
        lo, hi: bootstrap percentile interval at level ``ci`` (NaN when ``n_boot`` is 0 or no value exists).
        per_class: (n_classes,) per-class means, NaN for classes without values.
        n_per_class: (n_classes,) number of values used per class.
        n_excluded: number of non-finite values left out.
        ci, n_boot, seed: the interval's settings.
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

    def as_dict(self) -> dict:
        """Plain Python values (lists for the per-class arrays), e.g. for JSON or archive attributes."""
        d = asdict(self)
        d["per_class"] = self.per_class.tolist()
        d["n_per_class"] = self.n_per_class.tolist()
        return d


def _by_class(values: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[list[np.ndarray], int]:
    ok = np.isfinite(values)
    groups = [values[ok & (labels == c)] for c in range(n_classes)]
    return groups, int((~ok).sum())


def _boot_macro(groups: list[np.ndarray], n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot,) macro means of within-class resamples (with replacement) of the non-empty groups."""
    present = [g for g in groups if g.size]
    total = np.zeros(n_boot)
    for g in present:
        rows = max(1, _BOOT_BLOCK // g.size)
        for start in range(0, n_boot, rows):
            stop = min(n_boot, start + rows)
            idx = rng.integers(0, g.size, size=(stop - start, g.size))
            total[start:stop] += g[idx].mean(axis=1)
    return total / max(1, len(present))


def _check_boot(n_boot: int, ci: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 0:
        raise ValueError(f"n_boot must be an integer >= 0, got {n_boot!r}")
    if not (0 < ci < 1):
        raise ValueError(f"ci must lie in (0, 1), got {ci!r}")


def aggregate(
    values: ArrayLike, labels: ArrayLike, n_classes: int, n_boot: int = 1000, seed: int = 0, ci: float = 0.95
) -> Aggregate:
    """Per-sample values -> per-class means -> macro mean over the classes present, with a bootstrap interval.

    mean = (1 / |P|) sum_{c in P} mean_{i: y_i = c} v_i over the classes P with at least one finite value. The
    interval is the (1 - ci)/2 and (1 + ci)/2 percentiles of that statistic over ``n_boot`` replicates, each
    resampling every class's values with replacement within the class (seeded with ``seed``).

    Args:
        values: (N,) per-sample values; NaN / inf are excluded and counted.
        labels: (N,) class of each sample, in 0..n_classes-1.
        n_classes: number of classes C.
        n_boot: bootstrap replicates (0: no interval).
        seed: seed of the resampling.
        ci: interval level.

    Returns:
        An :class:`Aggregate`.
    """
    v = _as_array(values, "values", "float")
    y = _as_array(labels, "labels", "int")
    if v.shape != y.shape:
        raise ValueError(f"values and labels must have one shape, got {v.shape} and {y.shape}")
    _check_labels(y, n_classes)
    _check_boot(n_boot, ci)
    groups, n_excluded = _by_class(v, y, n_classes)
    counts = np.array([g.size for g in groups], dtype=np.int64)
    per_class = np.array([g.mean() if g.size else math.nan for g in groups])
    mean = float(np.mean(per_class[counts > 0])) if counts.any() else math.nan
    lo = hi = math.nan
    if n_boot and counts.any():
        boot = _boot_macro(groups, n_boot, np.random.default_rng(seed))
        lo, hi = (float(q) for q in np.percentile(boot, [50 * (1 - ci), 50 * (1 + ci)]))
    return Aggregate(mean, lo, hi, per_class, counts, n_excluded, float(ci), int(n_boot), int(seed))


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


def stability(metric: str) -> tuple[bool, bool]:
    """How to rank architectures by stability under ``metric``: (higher_is_stable, absolute).

    ``absolute`` is True for ``*_change`` metrics, whose size (|FT - TL|) measures instability whatever its sign.
    ``iou@XX`` keys of any fraction are recognised.

    Raises:
        ValueError: a metric with no defined direction (listing those known).
    """
    if metric in STABILITY_DIRECTION:
        return STABILITY_DIRECTION[metric], metric.endswith("_change")
    if re.fullmatch(r"iou@[0-9.]+", metric):
        return True, False
    if metric.endswith("_change"):
        return False, True
    raise ValueError(f"no stability direction for metric {metric!r}; known: {sorted(STABILITY_DIRECTION)}")


@dataclass
class RankReversal:
    """Rankings of architectures by stability under each method, and how they disagree.

    Pair keys are (method_i, method_j) for i < j in method order.

    Attributes:
        archs, methods: in input order.
        means: method -> arch -> macro mean (of |value| when ``absolute``).
        rankings: method -> architectures, most stable first (ties keep input order).
        kendall_tau, kendall_p: scipy.stats.kendalltau of the macro means of two methods over architectures.
        reverses: the most stable architecture differs between the two methods.
        fully_reversed: one ranking is the other read backwards.
        p_reverse: bootstrap probability that the most stable architecture differs.
        p_fully_reversed: bootstrap probability that the rankings are fully reversed.
        higher_is_stable, absolute, n_boot, seed: settings.
    """

    archs: list[str]
    methods: list[str]
    means: dict[str, dict[str, float]]
    rankings: dict[str, list[str]]
    kendall_tau: dict[tuple[str, str], float] = field(default_factory=dict)
    kendall_p: dict[tuple[str, str], float] = field(default_factory=dict)
    reverses: dict[tuple[str, str], bool] = field(default_factory=dict)
    fully_reversed: dict[tuple[str, str], bool] = field(default_factory=dict)
    p_reverse: dict[tuple[str, str], float] = field(default_factory=dict)
    p_fully_reversed: dict[tuple[str, str], float] = field(default_factory=dict)
    higher_is_stable: bool = True
    absolute: bool = False
    n_boot: int = 0
    seed: int = 0


def _order(scores: np.ndarray) -> np.ndarray:
    """Indices most stable first along axis 0; ``scores`` are oriented so that larger is more stable."""
    return np.argsort(-scores, axis=0, kind="stable")


def rank_reversal(
    values: dict[str, dict[str, tuple[ArrayLike, ArrayLike]]],
    n_classes: int,
    higher_is_stable: bool,
    n_boot: int = 1000,
    seed: int = 0,
    absolute: bool = False,
) -> RankReversal:
    """Rank architectures by stability (macro mean, :func:`aggregate`) under each method and compare rankings.

    For each pair of methods: Kendall's tau between their macro means over architectures, whether the most
    stable architecture differs ("reverses"), whether one ranking is the other reversed, and the bootstrap
    probability of each, from ``n_boot`` replicates that resample every (architecture, method) within class,
    independently (the samples selected differ per architecture, so no pairing is assumed).

    Args:
        values: ``{arch: {method: (values (N,), labels (N,))}}``; every architecture must have the same methods.
        n_classes: number of classes C.
        higher_is_stable: True when higher values mean more stable maps (see :data:`STABILITY_DIRECTION`).
        n_boot: bootstrap replicates (0: no probabilities, reported as NaN).
        seed: seed of the resampling.
        absolute: rank on |value| (for FT - TL changes, see :func:`stability`).

    Returns:
        A :class:`RankReversal`.
    """
    _check_boot(n_boot, 0.5)
    if not isinstance(values, dict) or len(values) < 2:
        raise ValueError("values must map at least two architectures to {method: (values, labels)}")
    archs = list(values)
    methods = list(values[archs[0]])
    if len(methods) < 2:
        raise ValueError(f"rank reversal compares methods: {archs[0]!r} has {methods}, need at least two")
    for arch in archs:
        if set(values[arch]) != set(methods):
            raise ValueError(f"architecture {arch!r} has methods {sorted(values[arch])}, expected {sorted(methods)}")

    groups: dict[tuple[str, str], list[np.ndarray]] = {}
    means = np.empty((len(methods), len(archs)))
    for (i, m), (j, arch) in itertools.product(enumerate(methods), enumerate(archs)):
        entry = values[arch][m]
        if not isinstance(entry, (tuple, list)) or len(entry) != 2:
            raise ValueError(f"values[{arch!r}][{m!r}] must be a pair (values (N,), labels (N,))")
        v = _as_array(entry[0], f"values[{arch!r}][{m!r}]", "float")
        y = _as_array(entry[1], f"labels of values[{arch!r}][{m!r}]", "int")
        if v.shape != y.shape:
            raise ValueError(f"values[{arch!r}][{m!r}]: values {v.shape} and labels {y.shape} differ in shape")
        _check_labels(y, n_classes, f"labels of values[{arch!r}][{m!r}]")
        g, _ = _by_class(np.abs(v) if absolute else v, y, n_classes)
        if not any(x.size for x in g):
            raise ValueError(f"values[{arch!r}][{m!r}] has no finite value: it cannot be ranked")
        groups[m, arch] = g
        means[i, j] = np.mean([x.mean() for x in g if x.size])

    sign = 1.0 if higher_is_stable else -1.0
    order = _order(sign * means.T)  # (A, M)
    result = RankReversal(
        archs=archs,
        methods=methods,
        means={m: {a: float(means[i, j]) for j, a in enumerate(archs)} for i, m in enumerate(methods)},
        rankings={m: [archs[k] for k in order[:, i]] for i, m in enumerate(methods)},
        higher_is_stable=bool(higher_is_stable),
        absolute=bool(absolute),
        n_boot=int(n_boot),
        seed=int(seed),
    )

    boot_order = None
    if n_boot:
        rng = np.random.default_rng(seed)
        boot = np.empty((len(methods), len(archs), n_boot))
        for (i, m), (j, arch) in itertools.product(enumerate(methods), enumerate(archs)):
            boot[i, j] = _boot_macro(groups[m, arch], n_boot, rng)
        boot_order = _order(np.moveaxis(sign * boot, 1, 0))  # (A, M, n_boot)

    for i, j in itertools.combinations(range(len(methods)), 2):
        key = (methods[i], methods[j])
        tau = scipy.stats.kendalltau(means[i], means[j])
        result.kendall_tau[key] = float(tau.statistic)
        result.kendall_p[key] = float(tau.pvalue)
        result.reverses[key] = bool(order[0, i] != order[0, j])
        result.fully_reversed[key] = bool(np.array_equal(order[:, i], order[::-1, j]))
        if boot_order is None:
            result.p_reverse[key] = result.p_fully_reversed[key] = math.nan
        else:
            result.p_reverse[key] = float(np.mean(boot_order[0, i] != boot_order[0, j]))
            result.p_fully_reversed[key] = float(np.mean(np.all(boot_order[:, i] == boot_order[::-1, j], axis=0)))
    return result
