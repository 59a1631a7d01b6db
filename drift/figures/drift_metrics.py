"""Drift-metric figures: per-sample metric distributions and the top-k% IoU between TL and FT maps against k."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from .style import LINESTYLES, MARKERS, color, new_figure


def metric_distributions(values: Mapping[str, Mapping[tuple[str, str], np.ndarray]], archs: Sequence[str],
                         methods: Sequence[str], ylabels: Mapping[str, str], titles: Mapping[str, str] | None = None,
                         ncols: int = 3) -> Figure:
    """Box plots of per-sample drift metrics: one panel per metric, boxes grouped by architecture, coloured by method.

    Boxes span the quartiles with the median marked, whiskers reach 1.5 IQR; non-finite values are left out
    and the number of values drawn appears under each group.

    Args:
        values: metric -> (arch, method) -> (n,) per-sample values.
        archs: Architectures, in display order.
        methods: Attribution methods, in display order (colour = method).
        ylabels: metric -> y-axis label with its unit.
        titles: metric -> panel title (default: the metric key).
        ncols: Panels per row.

    Returns:
        The figure.
    """
    metrics = list(values)
    if not metrics:
        raise ValueError("metric_distributions needs at least one metric")
    ncols = max(1, min(ncols, len(metrics)))
    nrows = math.ceil(len(metrics) / ncols)
    fig = new_figure(max(4.0, 3.3 * ncols), 3.0 * nrows + 0.5)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    width = 0.8 / max(1, len(methods))
    for ax, metric in zip(axes, metrics):
        for mi, method in enumerate(methods):
            data, pos = [], []
            for ai, arch in enumerate(archs):
                v = np.asarray(values[metric].get((arch, method), []), dtype=np.float64)
                v = v[np.isfinite(v)]
                if v.size:
                    data.append(v)
                    pos.append(ai - 0.4 + width * (mi + 0.5))
            if not data:
                continue
            bp = ax.boxplot(data, positions=pos, widths=width * 0.85, patch_artist=True, showfliers=True,
                            medianprops={"color": "black"}, flierprops={"markersize": 3})
            for box in bp["boxes"]:
                box.set_facecolor(color(mi))
                box.set_alpha(0.85)
        ax.set_xticks(range(len(archs)))
        counts = []
        for arch in archs:
            n = [int(np.isfinite(np.asarray(values[metric].get((arch, m), []), dtype=np.float64)).sum())
                 for m in methods]
            counts.append(f"{arch}\nn={'/'.join(map(str, n))}")
        ax.set_xticklabels(counts, fontsize=7)
        ax.set_xlim(-0.6, len(archs) - 0.4)
        ax.set_title((titles or {}).get(metric, metric), fontsize=9)
        ax.set_ylabel(ylabels.get(metric, metric), fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    handles = [_patch(color(i)) for i in range(len(methods))]
    fig.legend(handles, list(methods), loc="outside lower center", ncols=len(methods), fontsize=8,
               title="method (n = values per method)", title_fontsize=8)
    return fig


def _patch(c: str):
    from matplotlib.patches import Patch

    return Patch(facecolor=c, edgecolor="black")


def iou_against_k(points: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                  archs: Sequence[str], methods: Sequence[str]) -> Figure:
    """Macro-mean top-k% IoU between the TL and FT maps against k, with 95% bootstrap intervals as error bars.

    The dashed grey line is the IoU expected of two independent random top-k sets, k / (2 - k) (k as a fraction:
    |A n B| = k^2 HW on average, |A u B| = (2k - k^2) HW), the level at which overlap carries no information.

    Args:
        points: (arch, method) -> (k in percent (K,), mean (K,), lo (K,), hi (K,)).
        archs: Architectures (colour = architecture).
        methods: Methods (line style and marker = method).

    Returns:
        The figure.
    """
    fig = new_figure(6.4, 4.0)
    ax = fig.subplots()
    all_k = []
    for (arch, method), (k, mean, lo, hi) in points.items():
        ai = list(archs).index(arch) if arch in archs else 0
        mi = list(methods).index(method) if method in methods else 0
        k, mean, lo, hi = (np.asarray(a, dtype=np.float64) for a in (k, mean, lo, hi))
        err = np.vstack([np.clip(mean - lo, 0, None), np.clip(hi - mean, 0, None)])
        err = np.where(np.isfinite(err), err, 0.0)
        ax.errorbar(k + (mi - (len(methods) - 1) / 2) * 0.3, mean, yerr=err, color=color(ai),
                    linestyle=LINESTYLES[mi % len(LINESTYLES)], marker=MARKERS[mi % len(MARKERS)], markersize=4,
                    capsize=2, label=f"{arch} / {method}")
        all_k.append(k)
    if all_k:
        ks = np.linspace(0.5, max(float(np.max(np.concatenate(all_k))), 1.0), 100)
        f = ks / 100
        ax.plot(ks, f / (2 - f), color="grey", linestyle="--", linewidth=1, label="independent maps k/(2-k)")
    ax.set_xlabel("k (top-k% of pixels)")
    ax.set_ylabel("IoU of top-k% regions, TL vs FT (fraction)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig
