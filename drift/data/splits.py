"""Assigning samples to train / validation / test splits: stratified by class, grouped by patient, seeded.

Used by the real-data loaders (`drift.data.real`), which hand over the labels, the patient ids and any split given
by the data's layout, and get back `Splits` of lazily read images.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from drift.data.base import DataError, ImageSet, Splits
from drift.data.images import read_image

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")


def check_fractions(val_fraction: float, test_fraction: float) -> tuple[float, float]:
    """The validation and test fractions as floats, checked to lie in (0, 1) and to leave train non-empty.

    Raises:
        TypeError: If a fraction is not a number.
        ValueError: If a fraction lies outside (0, 1) or the two sum to 1 or more.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
            raise TypeError(f"{name} must be a number in (0, 1), got {type(value).__name__}")
        if not 0.0 < float(value) < 1.0:
            raise ValueError(f"{name} must lie in (0, 1), got {value}")
    if float(val_fraction) + float(test_fraction) >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1 so that train is not empty; got "
                         f"{val_fraction} + {test_fraction}")
    return float(val_fraction), float(test_fraction)


def assign_splits(labels: np.ndarray, groups: Sequence[str] | None, fractions: Sequence[float], seed: int,
                  class_names: Sequence[str], split_names: Sequence[str] = SPLIT_NAMES) -> np.ndarray:
    """Assign samples to splits, stratified by class and grouped (a group never straddles two splits), seeded.

    Deterministic greedy assignment: each group is stratified by its primary label (its most frequent label, ties
    to the lowest index). Within a class, groups are shuffled with ``seed`` and, when there are at least as many
    groups as splits, the smallest ones seed every split (smallest split first) so each split sees the class; the
    rest go, largest first, to the split ``s`` with the largest deficit ``sum_c h_c (f_s n_c - a_sc)``, where
    ``h`` is the group's label histogram, ``n_c`` the class total and ``a_sc`` what split ``s`` already holds.

    Args:
        labels: ``(N,)`` int class indices.
        groups: ``N`` group (patient) ids, or None for one group per sample.
        fractions: ``(S,)`` target fractions of the splits, summing to 1.
        seed: Seed for the shuffles.
        class_names: Names of the classes, for error messages.
        split_names: Names of the ``S`` splits, for error messages.

    Returns:
        ``(N,)`` int64 split index per sample.

    Raises:
        DataError: If some split ends up without a class (too few images or patients in that class), naming both.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"labels must be a 1-D integer array, got dtype {labels.dtype} and shape {labels.shape}")
    labels = labels.astype(np.int64)
    n, n_cls, n_split = len(labels), len(class_names), len(fractions)
    if n and (labels.min() < 0 or labels.max() >= n_cls):
        raise ValueError(f"labels must lie in [0, {n_cls}) for {n_cls} class names; got [{labels.min()}, "
                         f"{labels.max()}]")
    if len(split_names) != n_split:
        raise ValueError(f"split_names has {len(split_names)} names for {n_split} fractions")
    if min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    if groups is not None and len(groups) != n:
        raise ValueError(f"groups has {len(groups)} entries but labels has {n}")
    if groups is None:
        group_of = np.arange(n)
        n_groups = n
    else:
        _, group_of = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
        n_groups = int(group_of.max()) + 1 if n else 0
    hist = np.zeros((n_groups, n_cls), dtype=np.int64)
    np.add.at(hist, (group_of, labels), 1)
    sizes = hist.sum(1)
    primary = hist.argmax(1)
    target = np.asarray(fractions, dtype=np.float64)[:, None] * hist.sum(0)[None, :]
    held = np.zeros((n_split, n_cls), dtype=np.float64)
    split_of_group = np.full(n_groups, -1, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0x5917,)))
    smallest_first = np.argsort(fractions, kind="stable")
    for c in range(n_cls):
        members = rng.permutation(np.flatnonzero(primary == c))
        members = members[np.argsort(sizes[members], kind="stable")]  # ascending size, random among equal sizes
        if len(members) >= n_split:
            for s, g in zip(smallest_first, members[:n_split]):
                split_of_group[g] = s
                held[s] += hist[g]
            members = members[n_split:]
        for g in members[::-1]:
            s = int(np.argmax((target - held) @ hist[g]))
            split_of_group[g] = s
            held[s] += hist[g]
    split = split_of_group[group_of]
    for s, name in enumerate(split_names):
        for c in range(n_cls):
            if held[s, c] == 0 and hist[:, c].sum() > 0:
                what = "patients" if groups is not None else "images"
                count = int((hist[:, c] > 0).sum())
                raise DataError(f"class {class_names[c]!r} has only {count} {what}, too few to appear in every split "
                                f"({', '.join(split_names)}); split {name!r} would have none")
    return split


def _make_set(class_names, labels, ids, paths, size, patient_ids=None) -> ImageSet:
    return ImageSet(class_names, labels, ids, size=size, paths=paths,
                    reader=functools.partial(read_image, size=size), patient_ids=patient_ids)


def _check_split_classes(split_labels: dict[str, np.ndarray], class_names: Sequence[str]) -> None:
    for name, labels in split_labels.items():
        present = set(np.unique(labels).tolist())
        missing = [class_names[c] for c in range(len(class_names)) if c not in present]
        if missing:
            raise DataError(f"split {name!r} has no images of class(es) {', '.join(map(repr, missing))}")


def build_splits(class_names: Sequence[str], labels: np.ndarray, ids: Sequence[str], paths: Sequence[Path],
                 patients: Sequence[str] | None, split_of: np.ndarray | None, size: int, seed: int, val_fraction: float,
                 test_fraction: float, skipped: list[tuple[str, str]]) -> Splits:
    """Split the samples (where ``split_of`` lacks assignments) with `assign_splits` and wrap them into `Splits`.

    Args:
        class_names: Names of the ``C`` classes, in label order.
        labels: ``(N,)`` int class indices.
        ids: ``N`` sample ids.
        paths: ``N`` image files, read lazily at ``(size, size)``.
        patients: ``N`` patient ids (a patient never straddles two splits), or None.
        split_of: None (split everything), or ``(N,)`` int with 0/1/2 for train/val/test and -1 for none given; if
            no sample is in val, val is carved out of train with fraction ``val_fraction`` of train.
        size: Side of the images the sets yield.
        seed: Seed of the split assignment.
        val_fraction: Target validation fraction, in (0, 1).
        test_fraction: Target test fraction, in (0, 1).
        skipped: ``(id, reason)`` of the files left out, kept in `Splits.skipped`.

    Returns:
        `Splits` of lazily loaded `ImageSet` items ``(1, size, size)`` float32 in [0, 1], with ``patient_ids`` when
        ``patients`` is given.

    Raises:
        DataError: If a class is too small to appear in every split, or some split has no image of some class.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if split_of is None:
        split_of = assign_splits(labels, patients, (1 - val_fraction - test_fraction, val_fraction, test_fraction),
                                 seed, class_names)
    elif not (split_of == 1).any():
        train = np.flatnonzero(split_of == 0)
        sub = assign_splits(labels[train], None if patients is None else [patients[i] for i in train],
                            (1 - val_fraction, val_fraction), seed, class_names, ("train", "val"))
        split_of = split_of.copy()
        split_of[train[sub == 1]] = 1
    _check_split_classes({name: labels[split_of == s] for s, name in enumerate(SPLIT_NAMES)}, class_names)
    sets = []
    for s in range(3):
        idx = np.flatnonzero(split_of == s)
        sets.append(_make_set(class_names, labels[idx], [ids[i] for i in idx], [paths[i] for i in idx], size,
                              None if patients is None else [patients[i] for i in idx]))
    return Splits(*sets, skipped=skipped)

