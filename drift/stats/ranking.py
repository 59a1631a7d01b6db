"""Rank reversal: rankings of architectures by stability under each method, with a paired image bootstrap."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
import scipy.stats

from .bootstrap import _BOOT_BLOCK, _by_class, _check_boot, _check_min
from .sample import ArrayLike, _as_array, _check_labels

P_TOP_LABEL = "P(top differs | these checkpoints, image resampling)"
"""What :attr:`RankReversal.p_reverse` is: the bootstrap frequency, over resampled images of one set of trained
weights, with which the most stable architecture differs between two methods; not the probability that a reversal
is real (that is :func:`drift.verdicts.judge_reversals`' test)."""


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
    """Rank architectures by stability (macro mean, :func:`~drift.stats.aggregate`) under each method; compare rankings.

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
        higher_is_stable: True when higher values mean more stable maps (see :func:`drift.metrics.stability`).
        n_boot: bootstrap replicates; 0 asks for no bootstrap (probabilities are NaN).
        seed: seed of the resampling.
        absolute: rank on |value| (for FT - TL changes, see :func:`drift.metrics.stability`).
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
