"""The dose-response figure of the known-answer studies (:mod:`drift.known_answer`): outcomes against the marker
strength, with their intervals."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure

from .style import MARKERS, color, new_figure, plain_text

PANELS = ((("systematic", "S"), ("systematic_vs_twin", "S - S twin")),
          (("marker_mass_change", "marker share"),),
          (("lung_mass_change", "lung mass"), ("lesion_energy_change", "lesion energy"),
           ("pointing_change", "pointing")))
TITLES = ("Systematic drift (1 - Pearson r)", "Marker-region share of map mass",
          "Lung and lesion evidence")
YLABELS = ("S, and its excess over the twin", "(FT - TL) minus the twin's", "(FT - TL) minus the twin's")


def dose_figure(rows: list[dict]) -> Figure:
    """Three panels against the marker strength: systematic drift S and its excess over the null twin; the marker
    share's change beyond the twin's; the lung-mass, lesion-energy and pointing changes beyond the twin's. One line
    per (outcome, method); bars are the 95% intervals, filled markers the outcomes found (Holm within each study),
    hollow ones those not found or described (S itself). The twin has no difference in differences (0 by definition).

    Args:
        rows: :func:`drift.known_answer.dose_response`'s rows.
    """
    if not any(math.isfinite(r["strength"]) for r in rows):
        raise ValueError("no marker strength in the rows")
    methods = sorted({r["method"] for r in rows})
    with plain_text():
        fig = new_figure(12.0, 3.6)
        axes = fig.subplots(1, len(PANELS))
        for ax, panel, title, ylabel in zip(axes, PANELS, TITLES, YLABELS):
            k = 0
            for key, label in panel:
                for j, m in enumerate(methods):
                    pts = [(r["strength"], r[key]) for r in rows if r["method"] == m and r[key] is not None]
                    if not pts:
                        continue
                    x = np.array([p for p, _ in pts]) + (j - (len(methods) - 1) / 2) * 0.012
                    y = np.array([v["estimate"] for _, v in pts])
                    lo = np.array([v["low"] for _, v in pts])
                    hi = np.array([v["high"] for _, v in pts])
                    err = np.vstack([np.nan_to_num(y - lo), np.nan_to_num(hi - y)])
                    c = color(k)
                    mk = MARKERS[j % len(MARKERS)]
                    ax.errorbar(x, y, yerr=err, color=c, marker="none", capsize=2, linewidth=1.2, zorder=2)
                    found = np.array([bool(v["found"]) for _, v in pts])
                    ax.scatter(x, y, s=30, marker=mk, facecolors=[c if f else "white" for f in found],
                               edgecolors=c, zorder=3, label=f"{label}, {m}")
                    k += 1
            ax.axhline(0.0, color="0.5", linewidth=0.8)
            ax.set_xlim(-0.06, 1.06)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("marker strength (share of each class tagged)")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=7, frameon=False)
        cells = sorted({str(r["cell"]) for r in rows if r.get("cell")})
        if cells:  # the CAM cell the numbers were read at: a known-answer verdict depends on the layer
            fig.suptitle(f"CAM cell: {'; '.join(cells)}", fontsize=9)
    return fig
