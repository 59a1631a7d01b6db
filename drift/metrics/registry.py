"""Every metric of a map pair in one call (:func:`pair_metrics`), and the metric registry: one frozen table of
keys with the function computing each value, its stability direction, label, unit and headline place."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .concentration import degenerate, energy_in, entropy, gini, mass_fraction, pointing_game, top_mass
from .pairwise import (
    DEFAULT_FRACTIONS,
    SSIM_WINDOW,
    _check_fractions,
    _check_mask,
    _check_nonnegative,
    _check_pair,
    centroid_shift,
    peak_shift,
    pearson,
    spearman,
    ssim,
    threshold_iou,
    threshold_key,
    topk_iou,
)

# -------------------------------------------------------------------------------------------------- pairs


_MAP_QUANTITIES = (("entropy", entropy, None), ("gini", gini, None), ("top10_mass", lambda m: top_mass(m, 0.1), None),
                   ("lung_mass", mass_fraction, "lung"), ("lesion_energy", energy_in, "lesion"),
                   ("marker_mass", mass_fraction, "marker"))
"""Per-map quantities of :func:`pair_metrics` (``_tl``, ``_ft``, ``_change``): key, function, the mask it needs."""


def iou_key(fraction: float) -> str:
    """Result key of a top-k IoU fraction: 0.05 -> "iou@05", 0.1 -> "iou@10", 0.025 -> "iou@2.5"."""
    pct = round(fraction * 100, 6)
    return f"iou@{int(pct):02d}" if pct == int(pct) else f"iou@{pct:g}"


def pair_metrics(
    a: torch.Tensor,
    b: torch.Tensor,
    lung_mask: torch.Tensor | None = None,
    lesion_mask: torch.Tensor | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    marker_mask: torch.Tensor | None = None,
    ties: str = "jaccard",
    small: bool = False,
    thresholds: Sequence[float] = (),
    centroid_norm: str = "diagonal",
) -> dict[str, torch.Tensor]:
    """Every drift and localisation metric of a batch of (TL, FT) map pairs in one call.

    Keys (each (B,) float64 unless noted): ``centroid_shift``, ``peak_shift``, ``iou@XX`` per fraction
    (:func:`iou_key`), ``pearson``, ``spearman``, ``ssim``; per phase ``_tl`` / ``_ft`` and their change
    ``_change`` = FT - TL for ``entropy``, ``gini``, ``top10_mass`` (fraction 0.1); with ``lung_mask``:
    ``lung_mass_tl/ft/change`` (:func:`mass_fraction`); with ``lesion_mask``: ``lesion_energy_tl/ft/change``
    (:func:`energy_in`) and ``pointing_tl/ft`` (:func:`pointing_game`); with ``marker_mask`` (a shortcut marker
    outside the lungs): ``marker_mass_tl/ft/change``, the share of evidence on the shortcut. Bookkeeping:
    ``valid`` (bool, neither map degenerate), ``degenerate_tl`` / ``degenerate_ft`` (int64 codes of
    :func:`degenerate`).

    Every metric of a pair that is not valid is NaN: degenerate maps are counted, never scored.

    Args:
        a: TL maps (B, H, W), non-negative, already at the mask / input size (H, W >= 11 for SSIM).
        b: FT maps (B, H, W) of the same images and classes.
        lung_mask, lesion_mask: (B, H, W) or (H, W) boolean masks, or None.
        fractions: top-k IoU fractions.
        marker_mask: (B, H, W) or (H, W) boolean mask of a shortcut marker, or None.
        ties: tie rule of the top-k overlap (:func:`~drift.metrics.pairwise.topk_iou`; only positive pixels form
            top sets, so ``iou@XX`` is NaN where a map has fewer positive pixels than k).
        small: accept maps below the SSIM window (metrics at a layer's own grid): ``ssim`` is NaN there.
        thresholds: binarisation thresholds of :func:`~drift.metrics.pairwise.threshold_iou`: keys ``thr@XX``
            (:func:`~drift.metrics.pairwise.threshold_key`); none by default.
        centroid_norm: the length ``centroid_shift`` is measured in (:data:`~drift.metrics.pairwise.CENTROID_NORMS`).

    Returns:
        dict of (B,) tensors on the maps' device.
    """
    _check_pair(a, b)
    fr = _check_fractions(fractions)
    h, w = a.shape[1:]
    too_small = h < SSIM_WINDOW or w < SSIM_WINDOW
    if too_small and not small:
        raise ValueError(
            f"pair_metrics needs maps of at least {SSIM_WINDOW} x {SSIM_WINDOW} (SSIM window), got {h} x {w}: "
            "upsample the maps to the input size first"
        )
    # Checked on the whole batch so that the error names the caller's map index, not one of the valid subset.
    _check_nonnegative(a, "a")
    _check_nonnegative(b, "b")
    masks = {}
    if lung_mask is not None:
        masks["lung"] = _check_mask(lung_mask, a, "lung_mask")
    if lesion_mask is not None:
        masks["lesion"] = _check_mask(lesion_mask, a, "lesion_mask")
    if marker_mask is not None:
        masks["marker"] = _check_mask(marker_mask, a, "marker_mask")

    deg_tl, deg_ft = degenerate(a), degenerate(b)
    valid = (deg_tl == 0) & (deg_ft == 0)
    sel = valid.nonzero()[:, 0]
    va, vb = a[sel], b[sel]
    vm = {k: m[sel] for k, m in masks.items()}

    got: dict[str, torch.Tensor] = {}
    iou = topk_iou(va, vb, fr, ties)  # every fraction in one kernel call
    for spec in registry(fr):
        if spec.key.endswith(("_tl", "_ft", "_change")) or spec.key.startswith("pointing_"):
            continue
        if spec.key == "centroid_shift":
            got[spec.key] = centroid_shift(va, vb, centroid_norm)
            continue
        if spec.key == "ssim" and too_small:
            got[spec.key] = torch.full((len(sel),), math.nan, dtype=torch.float64, device=a.device)
            continue
        got[spec.key] = iou[:, fr.index(spec.fraction)] if spec.fraction is not None else spec.fn(va, vb)
    if thresholds:
        thr = threshold_iou(va, vb, thresholds)
        for i, t in enumerate(thresholds):
            got[threshold_key(t)] = thr[:, i]
    for q, fn, mask in _MAP_QUANTITIES:
        if mask is not None and mask not in vm:
            continue
        args = (vm[mask],) if mask is not None else ()
        tl, ft = fn(va, *args), fn(vb, *args)
        got[f"{q}_tl"], got[f"{q}_ft"], got[f"{q}_change"] = tl, ft, ft - tl
    if "lesion" in vm:
        got["pointing_tl"] = pointing_game(va, vm["lesion"])
        got["pointing_ft"] = pointing_game(vb, vm["lesion"])

    out = {}
    for key, v in got.items():
        full = torch.full((a.shape[0],), math.nan, dtype=torch.float64, device=a.device)
        full[sel] = v
        out[key] = full
    out["valid"] = valid
    out["degenerate_tl"] = deg_tl
    out["degenerate_ft"] = deg_ft
    return out


# ----------------------------------------------------------------------------------------------- registry

SHIFT_UNIT = "fraction of image diagonal"

HEADLINE_KEYS = ("iou@20", "centroid_shift", "pearson", "entropy_change")
"""The drift metrics of the headline tables (summary, report, comparison, asv), in column order."""



@dataclass(frozen=True)
class MetricSpec:
    """One per-sample value of :func:`pair_metrics`: what computes it and how the study reads it.

    Attributes:
        key: the result key (``iou@XX`` from :func:`iou_key`).
        fn: the function computing it: of a map pair (a, b) for drift metrics, of one map (and a mask, for the
            mask-based quantities) for the per-phase ``_tl`` / ``_ft`` values and their ``_change`` = FT - TL.
        higher_is_stable: True when a higher value means a more stable attribution (overlap, correlation), False
            when a lower one does (displacement; the size of a concentration change), None when the value is no
            stability measure (per-phase values), so that it cannot be ranked.
        absolute: rank on |value| (``_change`` metrics, whose size measures instability whatever its sign).
        label: human name (``IoU@20%``).
        unit: axis label with the unit.
        headline: position in the headline tables (1 first), 0 when not there.
        fraction: the top-k fraction of an ``iou@XX`` key, else None.
    """

    key: str
    fn: Callable
    higher_is_stable: bool | None
    absolute: bool
    label: str
    unit: str
    headline: int = 0
    fraction: float | None = None


def registry(fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[MetricSpec, ...]:
    """Every per-sample value :func:`pair_metrics` can return, with ``iou@XX`` keys for ``fractions``, in its order."""
    head = {k: i + 1 for i, k in enumerate(HEADLINE_KEYS)}

    def spec(key, fn, higher, label, unit, fraction=None):
        return MetricSpec(key, fn, higher, key.endswith("_change"), label, unit, head.get(key, 0), fraction)

    out = [spec("centroid_shift", centroid_shift, False, "centroid shift", f"displacement ({SHIFT_UNIT})"),
           spec("peak_shift", peak_shift, False, "peak shift", f"displacement ({SHIFT_UNIT})")]
    for f in _check_fractions(fractions):
        key = iou_key(f)

        def iou(a, b, f=f):
            return topk_iou(a, b, (f,))[:, 0]

        out.append(spec(key, iou, True, f"IoU@{key[4:]}%", "IoU of top-k% regions (fraction)", f))
    out += [spec("pearson", pearson, True, "Pearson r", "correlation coefficient"),
            spec("spearman", spearman, True, "spearman", "correlation coefficient"),
            spec("ssim", ssim, True, "ssim", "ssim")]
    for q, fn, _ in _MAP_QUANTITIES:
        name = q.replace("_", " ")
        out += [spec(f"{q}_tl", fn, None, f"{name} tl", f"{name} tl"),
                spec(f"{q}_ft", fn, None, f"{name} ft", f"{name} ft"),
                spec(f"{q}_change", fn, False, f"{name} change", f"{name}: FT - TL")]
    out += [spec(f"pointing_{st}", pointing_game, None, f"pointing {st}", f"pointing {st}") for st in ("tl", "ft")]
    return tuple(out)


def metric_spec(key: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> MetricSpec | None:
    """The registry entry of ``key`` (``iou@XX`` keys for ``fractions``), None when there is none."""
    return next((s for s in registry(fractions) if s.key == key), None)


def headline_specs(fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[MetricSpec]:
    """The headline metrics present for ``fractions``, in column order."""
    return sorted((s for s in registry(fractions) if s.headline), key=lambda s: s.headline)


def stability(key: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> tuple[bool, bool]:
    """How to rank architectures by stability under ``key``: (higher_is_stable, absolute) from the registry.

    Raises:
        ValueError: a key with no stability direction (listing those with one).
    """
    s = metric_spec(key, fractions)
    if s is None or s.higher_is_stable is None:
        known = [r.key for r in registry(fractions) if r.higher_is_stable is not None]
        raise ValueError(f"no stability direction for metric {key!r}; known: {known}")
    return s.higher_is_stable, s.absolute


def metric_label(key: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """Human name of a metric key (``iou@20`` -> ``IoU@20%``); a key outside the registry reads with spaces."""
    s = metric_spec(key, fractions)
    return s.label if s is not None else key.replace("_", " ")


def metric_unit(key: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """Axis label with the unit of a metric key; a key outside the registry reads with spaces."""
    s = metric_spec(key, fractions)
    return s.unit if s is not None else key.replace("_", " ")
