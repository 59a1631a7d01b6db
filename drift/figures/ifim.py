"""iFIM figures: eigenvalue spectra and the split x = x_high + x_low of example inputs."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from ..config import PHASES
from ..stats import mean_band
from .style import DIVERGING, LINESTYLES, MARKERS, color, new_figure


def fisher_spectra(shares: Mapping[tuple[str, str], np.ndarray], archs: Sequence[str],
                   phases: Sequence[str] = PHASES) -> Figure:
    """Eigenvalue share lambda_i / sum_j lambda_j of the iFIM by index i, per architecture (panel) and phase (line).

    Lines are means over the samples with a 95% normal band (:func:`mean_band`).

    Args:
        shares: (arch, phase) -> (N, r) eigenvalue shares, eigenvalues sorted descending.
        archs: Architectures, one panel each.
        phases: Phases, one line each.

    Returns:
        The figure.
    """
    if not archs:
        raise ValueError("fisher_spectra needs at least one architecture")
    ncols = min(3, len(archs))
    nrows = math.ceil(len(archs) / ncols)
    fig = new_figure(3.4 * ncols + 0.4, 2.9 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, arch in zip(axes, archs):
        for si, phase in enumerate(phases):
            s = shares.get((arch, phase))
            if s is None or np.asarray(s).size == 0:
                continue
            s = np.asarray(s, dtype=np.float64)
            idx = np.arange(1, s.shape[1] + 1)
            mean, lo, hi = mean_band(s)
            ax.plot(idx, mean, color=color(si), marker=MARKERS[si], linestyle=LINESTYLES[si], markersize=4,
                    label=f"{phase} (n={s.shape[0]})")
            ax.fill_between(idx, lo, hi, color=color(si), alpha=0.25, linewidth=0)
            ax.set_xticks(idx)
        ax.set_title(arch, fontsize=9)
        ax.set_xlabel("eigenvalue index i")
        ax.set_ylabel(r"eigenvalue share $\lambda_i \,/\, \Sigma_j \lambda_j$", parse_math=True)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(archs):]:
        ax.set_visible(False)
    return fig


@dataclass
class ComponentRow:
    """One row of :func:`component_panels`: an input and its split x = x_high + x_low.

    Attributes:
        title: Row label (sample id, phase, k).
        x, x_high, x_low: (H, W) images (channels already reduced).
    """

    title: str
    x: np.ndarray
    x_high: np.ndarray
    x_low: np.ndarray


def component_panels(rows: Sequence[ComponentRow]) -> Figure:
    """x | x_high = V_k V_k^T x | x_low = x - x_high per row, each panel with its own colour bar.

    x and x_low use a grey scale over their range; x_high, which is signed, a diverging map centred on zero
    and symmetric (+- max |x_high|).

    Args:
        rows: R rows of (H, W) images.

    Returns:
        The figure (R x 3 panels).
    """
    if not rows:
        raise ValueError("component_panels needs at least one row")
    fig = new_figure(9.6, 2.5 * len(rows) + 0.3)
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for i, row in enumerate(rows):
        hi_lim = float(np.nanmax(np.abs(row.x_high))) if np.isfinite(row.x_high).any() else 1.0
        hi_lim = hi_lim if hi_lim > 0 else 1.0
        panels = (("x (input)", row.x, "gray", None), ("x_high (top-k iFIM subspace)", row.x_high, DIVERGING,
                                                          TwoSlopeNorm(0.0, -hi_lim, hi_lim)),
                  ("x_low = x - x_high", row.x_low, "gray", None))
        for j, (name, img, cmap, norm) in enumerate(panels):
            ax = axes[i, j]
            im = ax.imshow(img, cmap=cmap, norm=norm, interpolation="nearest")
            # The row label goes into the first title: a multi-line y label is clipped next to colour bars.
            ax.set_title(f"{row.title}\n{name}" if j == 0 else name, fontsize=8 if j == 0 else 9)
            ax.set_xticks([])
            ax.set_yticks([])
            cb = fig.colorbar(im, ax=ax, shrink=0.85)
            cb.set_label("intensity (input units)", fontsize=7)
            cb.ax.tick_params(labelsize=7)
    return fig
