"""Drift metrics between two attribution maps of the same image and class, and single-map localisation metrics.

Every function takes batched maps (B, H, W) on any device and returns one value per map or pair, shape (B,),
float64 (metrics are reductions over many pixels; float64 keeps them exact to the last reported digit). By
convention ``a`` is the transfer-learning (TL) map and ``b`` the fine-tuned (FT) map. Maps are compared at the
same size: the caller upsamples layer-resolution maps to the input (mask) size first
(:func:`drift.attribution.upsample`).

Mass-based metrics (centroid, entropy, Gini, top mass, mass fraction) treat a map as a non-negative mass
distribution; negative values are an error. A map without mass (all zero) gives NaN there, never a number.
:func:`pair_metrics` computes everything for a batch of pairs, flags degenerate maps (:func:`degenerate`) and
reports NaN for those pairs instead of scoring them.

The package holds :mod:`~drift.metrics.pairwise` (metrics of a map pair), :mod:`~drift.metrics.concentration`
(single-map quantities, degenerate maps) and :mod:`~drift.metrics.registry` (:func:`pair_metrics` and the metric
registry: :class:`MetricSpec`, :func:`registry`, :func:`stability`, labels, units and the headline metrics).
"""

from .concentration import (
    count_degenerate,
    degenerate,
    degenerate_name,
    energy_in,
    entropy,
    gini,
    mass_fraction,
    pointing_game,
    top_mass,
)
from .pairwise import (
    CENTROID_NORMS,
    DEFAULT_FRACTIONS,
    DEGENERATE_NAMES,
    SSIM_SIGMA,
    SSIM_WINDOW,
    _average_ranks,
    centroid_shift,
    peak_shift,
    pearson,
    spearman,
    ssim,
    threshold_iou,
    threshold_key,
    topk_iou,
    topk_short,
)
from .registry import (
    HEADLINE_KEYS,
    SHIFT_UNIT,
    MetricSpec,
    headline_specs,
    iou_key,
    metric_label,
    metric_spec,
    metric_unit,
    pair_metrics,
    registry,
    stability,
)

__all__ = [
    "CENTROID_NORMS",
    "DEFAULT_FRACTIONS",
    "DEGENERATE_NAMES",
    "HEADLINE_KEYS",
    "SHIFT_UNIT",
    "SSIM_SIGMA",
    "SSIM_WINDOW",
    "MetricSpec",
    "_average_ranks",
    "centroid_shift",
    "count_degenerate",
    "degenerate",
    "degenerate_name",
    "energy_in",
    "entropy",
    "gini",
    "headline_specs",
    "iou_key",
    "mass_fraction",
    "metric_label",
    "metric_spec",
    "metric_unit",
    "pair_metrics",
    "peak_shift",
    "pearson",
    "pointing_game",
    "registry",
    "spearman",
    "ssim",
    "stability",
    "threshold_iou",
    "threshold_key",
    "top_mass",
    "topk_iou",
    "topk_short",
]
