"""Attribution-map figures: a test image with its transfer (TL) and fine-tuning (FT) maps overlaid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from .style import SEQUENTIAL, new_figure


def upsample_bilinear(m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one map (h, w) to (H, W) with half-pixel centres, edges clamped.

    Output pixel (i, j) samples the input at y = (i + 0.5) h / H - 0.5, x = (j + 0.5) w / W - 0.5 (clamped to
    [0, h - 1] x [0, w - 1]) and interpolates the four neighbours linearly: the same rule as
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` that the drift metrics use.

    Args:
        m: (h, w) real map.
        size: (H, W) output size.

    Returns:
        (H, W) float64 map.
    """
    m = np.asarray(m, dtype=np.float64)
    if m.ndim != 2 or min(m.shape) < 1:
        raise ValueError(f"map must have shape (h, w) with h, w >= 1, got {m.shape}")
    H, W = (int(s) for s in size)
    if H < 1 or W < 1:
        raise ValueError(f"size must be positive (H, W), got {size}")

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, pos - lo

    y0, y1, fy = axis(m.shape[0], H)
    x0, x1, fx = axis(m.shape[1], W)
    top = m[y0][:, x0] * (1 - fx) + m[y0][:, x1] * fx
    bottom = m[y1][:, x0] * (1 - fx) + m[y1][:, x1] * fx
    return top * (1 - fy)[:, None] + bottom * fy[:, None]


@dataclass
class MapRow:
    """One row of :func:`map_overlays`: a test image and its transfer (TL) and fine-tuning (FT) maps.

    Attributes:
        title: Row label (sample id, class, method).
        tl, ft: (h, w) raw maps at the target layer's resolution.
        image: (H, W) image in [0, 1], or None when the archive stores none (maps drawn alone).
    """

    title: str
    tl: np.ndarray
    ft: np.ndarray
    image: np.ndarray | None = None


def map_overlays(rows: Sequence[MapRow], size: tuple[int, int], alpha: float = 0.55) -> Figure:
    """Image | TL map | FT map per row, maps upsampled bilinearly to ``size`` and overlaid on the image.

    Both maps of a row share one colour scale, [min(0, min TL, min FT), max(max TL, max FT)], with a colour bar:
    raw CAM values are not normalised, so a change of magnitude between checkpoints stays visible.

    Args:
        rows: R rows; maps (h, w), images (H, W) or None.
        size: (H, W) the maps are upsampled to (the input size the metrics use).
        alpha: Opacity of the map over the image.

    Returns:
        The figure (R x 3 panels, or R x 2 when no row has an image).
    """
    if not rows:
        raise ValueError("map_overlays needs at least one row")
    with_image = any(r.image is not None for r in rows)
    ncols = 3 if with_image else 2
    fig = new_figure(2.3 * ncols + 1.2, 2.25 * len(rows) + 0.3)
    axes = np.atleast_2d(fig.subplots(len(rows), ncols, squeeze=False))
    for i, row in enumerate(rows):
        tl, ft = upsample_bilinear(row.tl, size), upsample_bilinear(row.ft, size)
        finite = np.concatenate([tl[np.isfinite(tl)], ft[np.isfinite(ft)]])
        vmin = min(0.0, float(finite.min())) if finite.size else 0.0
        vmax = float(finite.max()) if finite.size else 1.0
        if vmax <= vmin:
            vmax = vmin + 1.0  # a constant pair of maps still gets a readable, non-degenerate scale
        norm = Normalize(vmin=vmin, vmax=vmax)
        col = 0
        if with_image:
            ax = axes[i, 0]
            if row.image is not None:
                ax.imshow(row.image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.text(0.5, 0.5, "image not\navailable", ha="center", va="center", transform=ax.transAxes)
            ax.set_title("test image", fontsize=9)
            ax.set_ylabel(row.title, fontsize=8)
            col = 1
        im = None
        for j, (name, m) in enumerate((("TL (transfer)", tl), ("FT (fine-tuned)", ft))):
            ax = axes[i, col + j]
            if row.image is not None:
                ax.imshow(row.image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                im = ax.imshow(m, cmap=SEQUENTIAL, norm=norm, alpha=alpha, interpolation="nearest")
            else:
                im = ax.imshow(m, cmap=SEQUENTIAL, norm=norm, interpolation="nearest")
            ax.set_title(name, fontsize=9)
            if not with_image and j == 0:
                ax.set_ylabel(row.title, fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
        cb = fig.colorbar(im, ax=list(axes[i, col:]), shrink=0.9)
        cb.set_label("CAM value (a.u.)", fontsize=8)
        cb.ax.tick_params(labelsize=7)
        cb.solids.set_alpha(1.0)
    return fig
