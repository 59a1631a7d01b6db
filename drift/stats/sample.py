"""Per-sample inputs of the statistics: array conversion and checks, and the selection of the samples used."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import numpy as np

if TYPE_CHECKING:
    import torch

ArrayLike = Union[np.ndarray, "torch.Tensor", Sequence[float]]
"""One-dimensional per-sample data: a numpy array, a torch tensor (any device) or a list."""

SELECTION_RULES = ("tp_both", "all", "tp_either", "tp_all", "tp_ft")


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
    ``"tp_ft"`` label = pred_FT, whatever the transfer checkpoint predicts (a study that selects its images on the
    final, fine-tuned model); ``"all"`` every sample. ``"tp_all"`` (one sample common to every architecture)
    depends on the predictions of every architecture, which this function does not see: it is computed by
    :func:`common_sample`.

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
    if rule == "tp_ft":
        return y == p2
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

