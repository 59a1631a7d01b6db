"""The one measuring path: the CAMs of a model on a set of images and the per-image drift metrics of two sets
of maps, with their summaries. The pipeline's ``attributions`` and ``drift`` steps and ``drift measure`` (two
user checkpoints, :mod:`drift.measure`) call these functions; they take arrays and settings, never a pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import stats
from .config import PHASES
from .h5tree import as_tree
from .metrics import DEGENERATE_NAMES, iou_key, pair_metrics, topk_short

__all__ = ["cams", "empty_reason", "pair_tree", "PAIRED_QUANTITIES"]

PAIRED_QUANTITIES = ("entropy", "gini", "top10_mass", "lung_mass", "lesion_energy", "marker_mass")
"""Single-map quantities compared TL vs FT (A vs B) with a paired test when both are present."""


def cams(model: nn.Module, images: Callable[[np.ndarray], torch.Tensor], n: int, targets: np.ndarray, *,
         methods: Sequence[str], layers: Sequence[str], scores: Sequence[str], eps: float, batch_size: int,
         device: torch.device, batches: Callable[[Iterable[int]], Iterable[int]] = lambda r: r,
         gather: Callable[[dict], dict] = lambda parts: parts, progress: bool = False,
         desc: str = "CAMs") -> tuple[dict[tuple[str, str], dict[str, np.ndarray]], dict[str, str]]:
    """CAMs of ``model`` on images ``0..n-1`` for the classes ``targets`` (n,), every method, layer and score,
    from one forward pass and one backward pass per score and batch (:func:`drift.attribution.cams_multi`).

    Args:
        images: ``images(idx) -> (len(idx), C, H, W)`` float tensor in [0, 1].
        n: how many images.
        targets: (n,) class index per image.
        methods, layers, scores, eps: as :func:`drift.attribution.cams_multi` (layers: presets, ``auto`` or
            dotted names; presets of models outside the registry are resolved by :mod:`drift.layers`).
        batch_size: images per pass.
        device: where the model runs.
        batches: which batch starts this process computes (a distributed run shares them out).
        gather: collects every process's ``{key: [batch tensors]}`` in batch order.

    Returns:
        ``({(layer, score): {method: (n, h, w) float32}}, {layer: resolved dotted module name})``.
    """
    from . import attribution  # looked up per call: the function drift.attribution holds now

    if n < 1:
        raise ValueError("no images to explain (n = 0)")
    tgt = torch.as_tensor(np.asarray(targets))
    if tgt.shape != (n,):
        raise ValueError(f"targets must have shape ({n},), got {tuple(tgt.shape)}")
    first = images(np.arange(1))
    modules = {layer: attribution.resolve_target_layer(model, layer, tuple(first.shape))[1] for layer in layers}
    parts: dict[tuple[str, str, str], list[torch.Tensor]] = {}
    for lo in tqdm(batches(range(0, n, batch_size)), desc=desc, disable=not progress, leave=False):
        idx = np.arange(lo, min(n, lo + batch_size))
        res = attribution.cams_multi(model, images(idx).to(device), tgt[idx].to(device), methods=tuple(methods),
                                     layers=tuple(layers), scores=tuple(scores), eps=eps)
        for (layer, score), by_method in res.items():
            for m, v in by_method.items():
                parts.setdefault((layer, score, m), []).append(v.float().cpu())
    parts = gather(parts)
    out: dict = {}
    for (layer, score, m), p in parts.items():
        out.setdefault((layer, score), {})[m] = torch.cat(p).numpy().astype(np.float32)
    return out, modules


def empty_reason(selected: np.ndarray, valid: np.ndarray, deg: dict[str, np.ndarray], use: np.ndarray) -> str:
    """Why a summary has no image (an empty string when it has one): no image in the sample set, or the
    degenerate maps (:data:`drift.metrics.DEGENERATE_NAMES`) of each phase among the selected images, or the
    common sample of the methods (``metrics.method_sample = "common"``) is empty.

    Args:
        selected: ``(N,)`` bool, the sample set; valid: ``(N,)`` bool, neither map degenerate; use: ``(N,)`` bool,
            the images the summaries use.
        deg: ``{phase: (N,) int codes}`` of :func:`drift.metrics.degenerate`.
    """
    if use.any():
        return ""
    n = int(selected.sum())
    if n == 0:
        return "no test image is in the sample set"
    if (selected & valid).any():
        return f"no selected image is valid under every method of the cell ({int((selected & valid).sum())} of " \
               f"{n} are under this one)"
    parts = []
    for phase in PHASES:
        codes = np.asarray(deg[phase])[selected]
        counts = [(DEGENERATE_NAMES[k], int((codes == k).sum())) for k in range(1, len(DEGENERATE_NAMES))]
        for name, c in counts:
            if c == n:
                parts.append(f"all {n} {phase} maps are {name}")
            elif c:
                parts.append(f"{c} of {n} {phase} maps are {name}")
    return "; ".join(parts)


def pair_tree(a: torch.Tensor, b: torch.Tensor, labels: np.ndarray, ids: Sequence[str], n_classes: int,
              selected: np.ndarray, *, lung: torch.Tensor | None = None, lesion: torch.Tensor | None = None,
              marker: torch.Tensor | None = None, fractions: Sequence[float], n_boot: int, seed: int,
              min_per_class: int, by_images: Callable | None = None, ties: str = "jaccard",
              thresholds: Sequence[float] = (), centroid_norm: str = "diagonal",
              use: np.ndarray | None = None) -> dict:
    """Per-image drift metrics of the map pairs (``a`` TL or model A, ``b`` FT or model B) and their summaries
    over the selected, valid images.

    Args:
        a, b: ``(n, H, W)`` maps at the masks' size, normalised as the protocol cell says.
        labels, ids: ``(n,)`` class labels and sample ids.
        n_classes: C.
        selected: ``(n,)`` bool, the images the summaries use.
        lung, lesion, marker: ``(n, H, W)`` bool masks or None.
        fractions: top-k fractions of the overlap metrics.
        n_boot, seed, min_per_class: bootstrap settings of :func:`drift.stats.aggregate`.
        by_images: ``by_images(fn, n, *args, **kw)`` runs ``fn`` on image chunks (a distributed run shares them
            out); None runs it at once.
        ties, thresholds, centroid_norm: ``metrics.ties``, ``metrics.binarize`` and ``metrics.centroid_norm``
            (:func:`drift.metrics.pair_metrics`).
        use: ``(n,)`` bool, the images the summaries may use besides selected and valid ones (the common sample
            of a cell's methods), or None.

    Returns:
        ``{"per_sample": {metric: (n,), ids, labels, valid, selected}, "degenerate": {phase: (n,), "topk_short":
        {iou@XX: count}}, "summary": {metric: aggregate, "paired": {quantity: paired test}}, "empty": why the
        summaries have no image, or ""}``, as written under ``drift/<arch>``.
    """
    kw = {"lung_mask": lung, "lesion_mask": lesion, "fractions": tuple(fractions), "marker_mask": marker,
          "ties": ties, "small": True, "thresholds": tuple(thresholds), "centroid_norm": centroid_norm}
    per = by_images(pair_metrics, len(a), a, b, **kw) if by_images is not None else pair_metrics(a, b, **kw)
    per = {k: v.cpu().numpy() for k, v in per.items()}
    valid = per.pop("valid").astype(bool)
    deg = {"transfer": per.pop("degenerate_tl"), "finetune": per.pop("degenerate_ft")}
    selected = np.asarray(selected, dtype=bool)
    use = selected & valid & (True if use is None else np.asarray(use, dtype=bool))
    # Maps with fewer positive pixels than a fraction's k have no top set there (NaN IoU): counted per fraction.
    short = (topk_short(a, fractions) | topk_short(b, fractions)).cpu().numpy()
    deg["topk_short"] = {iou_key(f): int((short[:, t] & use).sum()) for t, f in enumerate(fractions)}
    summary = {}
    for metric, values in per.items():
        agg = stats.aggregate(np.where(use, values, np.nan), labels, n_classes, n_boot, seed,
                              min_per_class=min_per_class)
        summary[metric] = as_tree(agg)
    for q in PAIRED_QUANTITIES:
        tl, ft = per.get(f"{q}_tl"), per.get(f"{q}_ft")
        if tl is not None and ft is not None:
            summary.setdefault("paired", {})[q] = as_tree(stats.paired_test(tl[use], ft[use]))
    return {"per_sample": {**per, "ids": np.asarray(ids), "labels": np.asarray(labels), "valid": valid,
                           "selected": selected},
            "degenerate": deg, "summary": summary, "empty": empty_reason(selected, valid, deg, use)}
