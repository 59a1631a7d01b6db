"""Figures of the run report, drawn with matplotlib's Agg canvas on numpy arrays (no archive access here).

Every function returns a :class:`matplotlib.figure.Figure` laid out with ``constrained_layout`` so labels never
overlap; :func:`to_png` renders it. Colours follow the Okabe-Ito palette (distinguishable under the common
colour-vision deficiencies); images use ``viridis`` (sequential) and ``PuOr_r`` (diverging), both readable in
grey scale and by colour-blind readers. Nothing here touches pyplot, so no global state or GUI backend is used.

Modules: :mod:`drift.figures.style` (palette, :func:`new_figure`, :func:`to_png`, :func:`plain_text`),
:mod:`drift.figures.overlays` (attribution maps), :mod:`drift.figures.drift_metrics` (drift-metric distributions,
IoU against k), :mod:`drift.figures.ifim` (iFIM spectra and components), :mod:`drift.figures.curves` (perturbation
curves, training histories), :mod:`drift.figures.known_answer` (the planted shift's dose response).
Every public name is importable from here.
"""

from ..stats import mean_band
from .curves import CurvePanel, curve_grid, training_history
from .drift_metrics import iou_against_k, metric_distributions
from .ifim import ComponentRow, component_panels, fisher_spectra
from .known_answer import dose_figure
from .overlays import MapRow, map_overlays, upsample_bilinear
from .style import DIVERGING, OKABE_ITO, SEQUENTIAL, color, new_figure, plain_text, to_png

__all__ = [
    "DIVERGING",
    "OKABE_ITO",
    "SEQUENTIAL",
    "ComponentRow",
    "CurvePanel",
    "MapRow",
    "color",
    "component_panels",
    "curve_grid",
    "dose_figure",
    "fisher_spectra",
    "iou_against_k",
    "map_overlays",
    "mean_band",
    "metric_distributions",
    "new_figure",
    "plain_text",
    "to_png",
    "training_history",
    "upsample_bilinear",
]
