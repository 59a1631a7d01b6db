"""Attribution maps after the method: brought to the input's size (:func:`upsample`) and rescaled
(:func:`normalize`, :data:`NORMALIZE_MODES`), alike for both checkpoints' maps before any metric."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics.pairwise import _check_maps

NORMALIZE_MODES = ("none", "minmax", "sum")


def upsample(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of maps (B, h, w) to (B, H, W), half-pixel centres (F.interpolate, align_corners=False).

    Args:
        maps: (B, h, w) floating maps.
        size: H (square) or (H, W).

    Returns:
        (B, H, W) maps in the input dtype.
    """
    _check_maps(maps, "maps")
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be a positive int or (H, W), got {size}")
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def normalize(maps: torch.Tensor, mode: str = "minmax") -> torch.Tensor:
    """Per-map rescaling of maps (B, H, W).

    Modes:
        ``"none"``: the maps unchanged.
        ``"minmax"``: (m - min m) / (max m - min m); a constant map (max = min) gives zeros.
        ``"sum"``: m / sum m (unit mass, meant for non-negative maps); a map summing to zero gives zeros.

    Non-finite maps stay non-finite (never turned into zeros).

    Args:
        maps: (B, H, W) floating maps.
        mode: one of ``"none"``, ``"minmax"``, ``"sum"``.

    Returns:
        (B, H, W) maps in the input dtype.
    """
    _check_maps(maps, "maps")
    if mode == "none":
        return maps
    if mode == "minmax":
        lo = maps.amin(dim=(1, 2), keepdim=True)
        span = maps.amax(dim=(1, 2), keepdim=True) - lo
        out = (maps - lo) / span
        return torch.where(span == 0, torch.zeros_like(out), out)
    if mode == "sum":
        total = maps.sum(dim=(1, 2), keepdim=True)
        out = maps / total
        return torch.where(total == 0, torch.zeros_like(out), out)
    raise ValueError(f"normalize mode must be one of {NORMALIZE_MODES}, got {mode!r}")
