"""Attribution maps after the method: brought to the input's size (:func:`upsample`, :data:`UPSAMPLE_MODES`) and
rescaled (:func:`normalize`, :data:`NORMALIZE_MODES`), alike for both checkpoints' maps before any metric."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics.pairwise import _check_maps

NORMALIZE_MODES = ("none", "minmax", "sum")

UPSAMPLE_MODES = ("zoom-corners", "bilinear-halfpixel", "none")
"""How layer-resolution maps reach the metrics (``metrics.upsample``):

``zoom-corners``        ``scipy.ndimage.zoom(cam, (H / h, W / w), order=1)``, tf-keras-vis's resize: linear
                        interpolation on a grid whose corner samples coincide with the corner pixels, the source
                        coordinate of output pixel i being i (h - 1) / (H - 1) (scipy's default ``grid_mode=False``).
``bilinear-halfpixel``  ``F.interpolate(mode="bilinear", align_corners=False)``: pixel centres at (i + 0.5) h / H - 0.5,
                        clamped at the border (drift's earlier and default reading).
``none``                the maps at the layer's own grid (the masks are averaged down to it instead)."""


UPSAMPLE_WORDS = {
    "zoom-corners": "upsampled to the input size linearly with corner-aligned samples (scipy.ndimage.zoom, order 1, "
                    "as tf-keras-vis)",
    "bilinear-halfpixel": "upsampled bilinearly to the input size (half-pixel centres)",
    "none": "scored at the layer's own grid (masks averaged down to it)",
}
"""How each resampling reads in a sentence of the report."""


def upsample(maps: torch.Tensor, size: int | tuple[int, int], mode: str = "bilinear-halfpixel") -> torch.Tensor:
    """Resize maps (B, h, w) to (B, H, W) by one of :data:`UPSAMPLE_MODES` (``none`` returns the maps as given).

    ``zoom-corners`` is separable linear interpolation with corner-aligned sample positions: output index i maps to
    source coordinate u = i (h - 1) / (H - 1) (u = 0 when H = 1), value (1 - (u - floor u)) m[floor u] +
    (u - floor u) m[floor u + 1], equal to ``scipy.ndimage.zoom(m, (H / h, W / w), order=1)`` (whose output size
    round(h H / h) = H) and to ``F.interpolate(align_corners=True)``. ``bilinear-halfpixel`` uses
    u = (i + 0.5) h / H - 0.5 clamped to [0, h - 1].

    Args:
        maps: (B, h, w) floating maps.
        size: H (square) or (H, W).
        mode: one of :data:`UPSAMPLE_MODES`.

    Returns:
        (B, H, W) maps in the input dtype ((B, h, w) for ``none``).
    """
    _check_maps(maps, "maps")
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample mode must be one of {UPSAMPLE_MODES}, got {mode!r}")
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size must be a positive int or (H, W), got {size}")
    if mode == "none":
        return maps
    corners = mode == "zoom-corners"
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=corners)[:, 0]


def to_grid(mask: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor | None:
    """A mask (B, H, W) averaged down to a map grid (B, h, w): each cell's fraction of mask pixels, for metrics at
    a layer's own grid (``upsample = "none"``): cell (r, c) covers rows [floor(r H / h), ceil((r + 1) H / h))
    (``F.adaptive_avg_pool2d``). None stays None; a mask already at ``grid`` is returned as given."""
    if mask is None or tuple(mask.shape[-2:]) == tuple(grid):
        return mask
    m = mask.to(torch.float64)
    squeeze = m.ndim == 2
    m = m[None] if squeeze else m
    out = F.adaptive_avg_pool2d(m[:, None], tuple(grid))[:, 0]
    return out[0] if squeeze else out


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
