"""Sample selection, macro-averaged aggregation with bootstrap intervals, paired tests and rank reversal.

Everything here works on per-sample values (N,) as numpy arrays (torch tensors and lists are accepted and
converted). NaN values mark samples that could not be scored (degenerate maps, see :mod:`drift.metrics`): they
are excluded and counted, never imputed. Bootstrap resampling is always within class, so every replicate keeps
the class sizes of the data, and is seeded: the same inputs and seed give the same interval. The rank-reversal
bootstrap resamples images, not values, and applies one resample to every method (and every architecture scored
on the same images), so that methods compared on the same images are compared on the same replicate.
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

SELECTION_RULES = ("tp_both", "all", "tp_either", "tp_all")

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
    """Which samples of one architecture enter the drift statistics.

    Rules: ``"tp_both"`` label = pred_TL and label = pred_FT; ``"tp_either"`` label = pred_TL or label = pred_FT;
    ``"all"`` every sample. ``"tp_all"`` (one sample common to every architecture) depends on the predictions of
    every architecture, which this function does not see: it is computed by :func:`common_sample`.

    Args:
        labels: true classes (N,).
        pred_tl: predicted classes of the transfer-learning checkpoint (N,).
        pred_ft: predicted classes of the fine-tuned checkpoint (N,).
        rule: one of :data:`SELECTION_RULES`.

    Returns:
        Boolean mask (N,).

    Raises:
        ValueError: an unknown rule, ``"tp_all"``, or inputs of different shapes.
    """
    if rule == "tp_all":
        raise ValueError("rule 'tp_all' needs every architecture's predictions, not one architecture's: use "
                         "common_sample(labels, [(pred_tl, pred_ft) for each architecture])")
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


def common_sample(labels: ArrayLike, predictions: Sequence[tuple[ArrayLike, ArrayLike]]) -> np.ndarray:
    """The ``"tp_all"`` sample: images classified correctly by both checkpoints of every architecture.

    Ranking architectures on one common sample keeps their comparison on the same images; with ``"tp_both"`` each
    architecture keeps the images it classifies correctly, so their samples differ.

    Args:
        labels: true classes (N,).
        predictions: one ``(pred_tl (N,), pred_ft (N,))`` pair per architecture.

    Returns:
        Boolean mask (N,): label = pred_TL = pred_FT for every architecture.

    Raises:
        ValueError: no architecture given, a pair that is not two arrays, or arrays of different shapes.
    """
    y = _as_array(labels, "labels", "int")
    if isinstance(predictions, (str, bytes)) or len(predictions) == 0:
        raise ValueError("predictions must hold one (pred_tl, pred_ft) pair per architecture, got none")
    keep = np.ones(y.shape, dtype=bool)
    for k, pair in enumerate(predictions):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"predictions[{k}] must be a pair (pred_tl (N,), pred_ft (N,))")
        p1 = _as_array(pair[0], f"predictions[{k}][0]", "int")
        p2 = _as_array(pair[1], f"predictions[{k}][1]", "int")
        if not (y.shape == p1.shape == p2.shape):
            raise ValueError(f"labels and predictions[{k}] must have one shape, got {y.shape}, {p1.shape}, "
                             f"{p2.shape}")
        keep &= (y == p1) & (y == p2)
    return keep


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
    """Per-sample values -> per-class means -> macro mean over the classes used, with a bootstrap interval.

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
    lo = hi = math.nan
    if n_boot and used.any():
        boot = _boot_macro([g for g, u in zip(groups, used) if u], n_boot, np.random.default_rng(seed))
        lo, hi = (float(q) for q in np.percentile(boot, [50 * (1 - ci), 50 * (1 + ci)]))
    return Aggregate(mean, lo, hi, per_class, counts, n_excluded, float(ci), int(n_boot), int(seed), used,
                     int(min_per_class))


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
        means: method -> arch -> macro mean (of |value| when ``absolute``) over the classes used.
        rankings: method -> architectures, most stable first (ties keep input order).
        kendall_tau: scipy.stats.kendalltau of the macro means of two methods over architectures. Descriptive
            only: with A architectures the exact p-value of tau cannot fall below 2 / A! (1/3 for three), so no
            p-value is reported.
        reverses: the most stable architecture differs between the two methods.
        fully_reversed: one ranking is the other read backwards.
        p_reverse: bootstrap probability that the most stable architecture differs (NaN without bootstrap).
        p_fully_reversed: bootstrap probability that the rankings are fully reversed (NaN without bootstrap).
        higher_is_stable, absolute, n_boot, seed, min_per_class: settings.
        pairing: ``"images"`` when every (architecture, method) was scored on the same images (one resample of
            images per replicate, shared by all), ``"methods"`` when each architecture has its own images (one
            resample per architecture per replicate, shared by its methods).
        class_used: method -> arch -> (n_classes,) bool, the classes in that macro mean (at least
            ``min_per_class`` finite values).
        n_boot_used: replicates the probabilities are over: those where every statistic is defined (see
            :func:`rank_reversal`).
    """

    archs: list[str]
    methods: list[str]
    means: dict[str, dict[str, float]]
    rankings: dict[str, list[str]]
    kendall_tau: dict[tuple[str, str], float] = field(default_factory=dict)
    reverses: dict[tuple[str, str], bool] = field(default_factory=dict)
    fully_reversed: dict[tuple[str, str], bool] = field(default_factory=dict)
    p_reverse: dict[tuple[str, str], float] = field(default_factory=dict)
    p_fully_reversed: dict[tuple[str, str], float] = field(default_factory=dict)
    higher_is_stable: bool = True
    absolute: bool = False
    n_boot: int = 0
    seed: int = 0
    pairing: str = "images"
    min_per_class: int = 1
    class_used: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    n_boot_used: int = 0


def _order(scores: np.ndarray) -> np.ndarray:
    """Indices most stable first along axis 0; ``scores`` are oriented so that larger is more stable."""
    return np.argsort(-scores, axis=0, kind="stable")


def _boot_images(
    values: np.ndarray, used: np.ndarray, labels: np.ndarray, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """Macro means of entries scored on the same images, every replicate resampling the images once for all.

    Draw order (part of the seeded result): for each replicate, for each class with images in ``labels`` in class
    order, one ``rng.integers(0, n_c, size=n_c)`` of positions among that class's images (ascending index).

    Args:
        values: (E, N) per-image values of E entries; non-finite values are not counted.
        used: (E, C) bool, the classes in each entry's macro mean.
        labels: (N,) class of each image.
        n_boot: replicates.
        rng: the generator drawn from.

    Returns:
        (E, n_boot) replicate statistics: per entry, the mean over its used classes of the mean of its finite
        values among the resampled images of the class. A used class with no finite value in a replicate's
        resample is left out of that replicate; an entry with none left is NaN.
    """
    n_entries = values.shape[0]
    ok = np.isfinite(values)
    zeroed = np.where(ok, values, 0.0)
    members = [(c, np.flatnonzero(labels == c)) for c in range(used.shape[1])]
    members = [(c, m) for c, m in members if m.size]
    total = np.zeros((n_entries, n_boot))
    n_used = np.zeros((n_entries, n_boot), dtype=np.int64)
    # Draws stay one call per class per replicate whatever the block size, so the seeded result does not depend on
    # the memory bound; the sums over a block are vectorised.
    rows = max(1, _BOOT_BLOCK // max(1, n_entries * labels.size))
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        draws = [[] for _ in members]
        for _ in range(start, stop):
            for k, (_, m) in enumerate(members):
                draws[k].append(rng.integers(0, m.size, size=m.size))
        for (c, m), d in zip(members, draws):
            pos = m[np.stack(d)]  # (B, n_c) image indices
            # Each entry's sum runs over its own contiguous row in the same order, so entries with equal values
            # get bit-identical statistics and rank identically.
            sums = zeroed[:, pos].sum(axis=2)  # (E, B)
            count = ok[:, pos].sum(axis=2)
            take = used[:, c : c + 1] & (count > 0)
            total[:, start:stop] += np.where(take, sums / np.maximum(count, 1), 0.0)
            n_used[:, start:stop] += take
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_used > 0, total / n_used, math.nan)


def rank_reversal(
    values: dict[str, dict[str, tuple[ArrayLike, ArrayLike]]],
    n_classes: int,
    higher_is_stable: bool,
    n_boot: int = 1000,
    seed: int = 0,
    absolute: bool = False,
    min_per_class: int = 1,
) -> RankReversal:
    """Rank architectures by stability (macro mean, :func:`aggregate`) under each method and compare rankings.

    For each pair of methods: Kendall's tau between their macro means over architectures (descriptive: over A
    architectures its p-value cannot go below 2 / A!, so none is reported), whether the most stable architecture
    differs ("reverses"), whether one ranking is the other reversed, and the bootstrap probability of each.

    The bootstrap is paired, because every method scores the same images and resampling methods independently
    would invent disagreement between identical maps. Each entry holds values over images (NaN for images not
    used, e.g. not selected or degenerate) and their labels:

    * every entry has the same labels array (``pairing = "images"``): each replicate draws one class-stratified
      resample of image indices (within each class, with replacement, as many as the class has) and applies it to
      every method and every architecture;
    * labels differ between architectures but not between the methods of one (``pairing = "methods"``): each
      architecture draws its own resample per replicate, shared by its methods (architectures in input order, each
      drawing all its replicates).

    An entry's replicate statistic is the mean over its used classes of the mean of its finite values among the
    resampled images. A used class whose resample holds no finite value is left out of that replicate only; a
    replicate where some statistic has no class left is left out of the probabilities (``n_boot_used`` counts the
    replicates kept). These replicates resample images, finite or not, so they also vary how many values each class
    has; :func:`aggregate` resamples the finite values themselves.

    Args:
        values: ``{arch: {method: (values (N,), labels (N,))}}``; every architecture must have the same methods,
            and the methods of one architecture the same labels (the same images in the same order).
        n_classes: number of classes C.
        higher_is_stable: True when higher values mean more stable maps (see :data:`STABILITY_DIRECTION`).
        n_boot: bootstrap replicates; 0 asks for no bootstrap (probabilities are NaN).
        seed: seed of the resampling.
        absolute: rank on |value| (for FT - TL changes, see :func:`stability`).
        min_per_class: fewest finite values for a class to enter an entry's macro mean, in the sample and in every
            replicate (>= 1).

    Returns:
        A :class:`RankReversal`.

    Raises:
        ValueError: malformed input, methods of one architecture with different labels, or an entry with no class
            of at least ``min_per_class`` finite values (named in the message).
    """
    _check_boot(n_boot, 0.5)
    _check_min(min_per_class)
    if not isinstance(values, dict) or len(values) < 2:
        raise ValueError("values must map at least two architectures to {method: (values, labels)}")
    archs = list(values)
    methods = list(values[archs[0]])
    if len(methods) < 2:
        raise ValueError(f"rank reversal compares methods: {archs[0]!r} has {methods}, need at least two")
    for arch in archs:
        if set(values[arch]) != set(methods):
            raise ValueError(f"architecture {arch!r} has methods {sorted(values[arch])}, expected {sorted(methods)}")

    arrays: dict[str, np.ndarray] = {}  # arch -> (M, N) values in method order
    labels: dict[str, np.ndarray] = {}
    used = np.zeros((len(methods), len(archs), n_classes), dtype=bool)
    means = np.empty((len(methods), len(archs)))
    for j, arch in enumerate(archs):
        rows = []
        for i, m in enumerate(methods):
            entry = values[arch][m]
            if not isinstance(entry, (tuple, list)) or len(entry) != 2:
                raise ValueError(f"values[{arch!r}][{m!r}] must be a pair (values (N,), labels (N,))")
            v = _as_array(entry[0], f"values[{arch!r}][{m!r}]", "float")
            y = _as_array(entry[1], f"labels of values[{arch!r}][{m!r}]", "int")
            if v.shape != y.shape:
                raise ValueError(f"values[{arch!r}][{m!r}]: values {v.shape} and labels {y.shape} differ in shape")
            _check_labels(y, n_classes, f"labels of values[{arch!r}][{m!r}]")
            if arch not in labels:
                labels[arch] = y
            elif not np.array_equal(y, labels[arch]):
                raise ValueError(f"labels of values[{arch!r}][{m!r}] differ from those of values[{arch!r}]"
                                 f"[{methods[0]!r}]: the methods of one architecture must score the same images in "
                                 "the same order (NaN for images not used), so that they can be paired")
            v = np.abs(v) if absolute else v
            g, _ = _by_class(v, y, n_classes)
            counts = np.array([x.size for x in g])
            if not counts.any():
                raise ValueError(f"values[{arch!r}][{m!r}] has no finite value: it cannot be ranked")
            used[i, j] = counts >= min_per_class
            if not used[i, j].any():
                raise ValueError(f"values[{arch!r}][{m!r}] has no class with at least min_per_class = "
                                 f"{min_per_class} finite values (per class: {counts.tolist()}): it cannot be ranked")
            means[i, j] = np.mean([x.mean() for x, u in zip(g, used[i, j]) if u])
            rows.append(v)
        arrays[arch] = np.stack(rows)

    first = labels[archs[0]]
    pairing = "images" if all(np.array_equal(labels[a], first) for a in archs[1:]) else "methods"
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
        pairing=pairing,
        min_per_class=int(min_per_class),
        class_used={m: {a: used[i, j].copy() for j, a in enumerate(archs)} for i, m in enumerate(methods)},
    )

    boot_order = None
    if n_boot:
        rng = np.random.default_rng(seed)
        n_m = len(methods)
        if pairing == "images":
            stacked = np.concatenate([arrays[a] for a in archs])  # (A * M, N), arch-major
            flat = _boot_images(stacked, used.transpose(1, 0, 2).reshape(-1, n_classes), first, n_boot, rng)
            boot = flat.reshape(len(archs), n_m, n_boot).transpose(1, 0, 2)  # (M, A, n_boot)
        else:
            boot = np.stack([_boot_images(arrays[a], used[:, j], labels[a], n_boot, rng)
                             for j, a in enumerate(archs)], axis=1)
        keep = np.isfinite(boot).all(axis=(0, 1))
        result.n_boot_used = int(keep.sum())
        boot_order = _order(np.moveaxis(sign * boot[:, :, keep], 1, 0))  # (A, M, n_boot_used)

    for i, j in itertools.combinations(range(len(methods)), 2):
        key = (methods[i], methods[j])
        result.kendall_tau[key] = float(scipy.stats.kendalltau(means[i], means[j]).statistic)
        result.reverses[key] = bool(order[0, i] != order[0, j])
        result.fully_reversed[key] = bool(np.array_equal(order[:, i], order[::-1, j]))
        if boot_order is None or boot_order.shape[-1] == 0:
            result.p_reverse[key] = result.p_fully_reversed[key] = math.nan
        else:
            result.p_reverse[key] = float(np.mean(boot_order[0, i] != boot_order[0, j]))
            result.p_fully_reversed[key] = float(np.mean(np.all(boot_order[:, i] == boot_order[::-1, j], axis=0)))
    return result
