"""Figures of the run report, drawn with matplotlib's Agg canvas on numpy arrays (no archive access here).

Every function returns a :class:`matplotlib.figure.Figure` laid out with ``constrained_layout`` so labels never
overlap; :func:`to_png` renders it. Colours follow the Okabe-Ito palette (distinguishable under the common
colour-vision deficiencies); images use ``viridis`` (sequential) and ``PuOr_r`` (diverging), both readable in
grey scale and by colour-blind readers. Nothing here touches pyplot, so no global state or GUI backend is used.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .stats import mean_band

__all__ = [
    "DIVERGING",
    "OKABE_ITO",
    "SEQUENTIAL",
    "ComponentRow",
    "CurvePanel",
    "MapRow",
    "component_panels",
    "curve_grid",
    "fisher_spectra",
    "iou_against_k",
    "map_overlays",
    "mean_band",
    "metric_distributions",
    "new_figure",
    "to_png",
    "training_history",
    "upsample_bilinear",
]

# Okabe & Ito (2008), reordered so that the first colours are the most distinct pairs (blue, orange, green).
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442", "#000000")
SEQUENTIAL = "viridis"
DIVERGING = "PuOr_r"
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")


@contextmanager
def plain_text() -> Iterator[None]:
    """Figures drawn (and rendered) inside show text as written: a ``$`` in a class name or id never starts
    matplotlib's mathtext, where ``$\\foo$`` would fail to parse and abort the whole report. Labels that are
    meant as mathtext ask for it with ``parse_math=True``."""
    with matplotlib.rc_context({"text.parse_math": False}):
        yield


def new_figure(width: float, height: float) -> Figure:
    """An empty Agg-backed figure of ``width`` x ``height`` inches with constrained layout."""
    if not (width > 0 and height > 0):
        raise ValueError(f"figure size must be positive, got width={width}, height={height}")
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure, dpi: int = 100) -> bytes:
    """Render ``fig`` to PNG bytes at ``dpi`` dots per inch."""
    if not isinstance(fig, Figure):
        raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def color(i: int) -> str:
    """The ``i``-th Okabe-Ito colour (cycling)."""
    return OKABE_ITO[i % len(OKABE_ITO)]


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


# ---------------------------------------------------------------------------------------------- attribution maps
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


# ---------------------------------------------------------------------------------------------- drift metrics
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


# ---------------------------------------------------------------------------------------------- iFIM
def fisher_spectra(shares: Mapping[tuple[str, str], np.ndarray], archs: Sequence[str],
                   stages: Sequence[str] = ("transfer", "finetune")) -> Figure:
    """Eigenvalue share lambda_i / sum_j lambda_j of the iFIM by index i, per architecture (panel) and stage (line).

    Lines are means over the samples with a 95% normal band (:func:`mean_band`).

    Args:
        shares: (arch, stage) -> (N, r) eigenvalue shares, eigenvalues sorted descending.
        archs: Architectures, one panel each.
        stages: Stages, one line each.

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
        for si, stage in enumerate(stages):
            s = shares.get((arch, stage))
            if s is None or np.asarray(s).size == 0:
                continue
            s = np.asarray(s, dtype=np.float64)
            idx = np.arange(1, s.shape[1] + 1)
            mean, lo, hi = mean_band(s)
            ax.plot(idx, mean, color=color(si), marker=MARKERS[si], linestyle=LINESTYLES[si], markersize=4,
                    label=f"{stage} (n={s.shape[0]})")
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
        title: Row label (sample id, stage, k).
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


# ---------------------------------------------------------------------------------------------- curves
@dataclass
class CurvePanel:
    """One panel of :func:`curve_grid`.

    Attributes:
        title: Panel title.
        x: (E,) abscissa values.
        xlabel, ylabel: Axis labels with units.
        series: label -> (N, E) per-sample values (N = 1 draws a line without a band).
        references: label -> (E,) dashed reference lines (e.g. a second-order prediction).
        logx, logy: Logarithmic axes (a log y axis clips bands at a tenth of the smallest positive mean and leaves
            out non-positive means).
    """

    title: str
    x: np.ndarray
    xlabel: str
    ylabel: str
    series: dict[str, np.ndarray] = field(default_factory=dict)
    references: dict[str, np.ndarray] = field(default_factory=dict)
    logx: bool = False
    logy: bool = False


def curve_grid(panels: Sequence[CurvePanel], ncols: int = 3) -> Figure:
    """Mean curves over samples with 95% bands (:func:`mean_band`), one panel per :class:`CurvePanel`.

    Series with the same label share a colour across panels; references are dashed in the colour of the series of
    the same position.

    Args:
        panels: The panels, filled row by row.
        ncols: Panels per row.

    Returns:
        The figure.
    """
    if not panels:
        raise ValueError("curve_grid needs at least one panel")
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig = new_figure(3.5 * ncols + 0.3, 2.9 * nrows + 0.3)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    labels: list[str] = []
    for p in panels:
        for lab in list(p.series) + list(p.references):
            if lab not in labels:
                labels.append(lab)
    for ax, p in zip(axes, panels):
        x = np.asarray(p.x, dtype=np.float64)
        for lab, v in p.series.items():
            v = np.atleast_2d(np.asarray(v, dtype=np.float64))
            if v.shape[-1] != x.size:
                raise ValueError(f"panel {p.title!r}: series {lab!r} has {v.shape[-1]} points, x has {x.size}")
            mean, lo, hi = mean_band(v)
            c = color(labels.index(lab))
            if p.logy:
                # A log axis cannot show a band reaching zero or below: clip it at a tenth of the smallest mean.
                pos = mean[np.isfinite(mean) & (mean > 0)]
                floor = pos.min() / 10 if pos.size else 1e-12
                lo = np.maximum(lo, floor)
                mean = np.where(mean > 0, mean, np.nan)  # e.g. a KL at rounding level, slightly negative
            if x.size == 1:
                err = np.vstack([mean - lo, hi - mean])
                ax.errorbar(x, mean, yerr=np.where(np.isfinite(err), err, 0.0), color=c, marker="o", capsize=4,
                            label=lab)
                continue
            ax.plot(x, mean, color=c, marker="o", markersize=3, label=lab)
            if v.shape[0] > 1:
                ax.fill_between(x, lo, hi, color=c, alpha=0.22, linewidth=0)
        for lab, ref in p.references.items():
            ax.plot(x, np.asarray(ref, dtype=np.float64), color=color(labels.index(lab)), linestyle="--",
                    linewidth=1.2, label=lab)
        if p.logx and np.all(x > 0):
            ax.set_xscale("log")
        if p.logy:
            ax.set_yscale("log")
        if x.size == 1:
            ax.set_xticks(x)
        ax.set_title(p.title, fontsize=9)
        ax.set_xlabel(p.xlabel, fontsize=8)
        ax.set_ylabel(p.ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return fig


def training_history(histories: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]],
                     stages: Sequence[str] = ("transfer", "finetune")) -> Figure:
    """Training curves per architecture: losses (left) and validation AUC / accuracy (right) against epoch.

    The stages are drawn one after the other on a common epoch axis (stage 2 epochs continue stage 1's count),
    separated by a vertical line.

    Args:
        histories: arch -> stage -> {"train_loss", "val_loss", "val_auc", "val_accuracy": (E_s,) arrays}.
        stages: Stage order.

    Returns:
        The figure (one row of two panels per architecture).
    """
    archs = list(histories)
    if not archs:
        raise ValueError("training_history needs at least one architecture")
    fig = new_figure(8.6, 2.6 * len(archs) + 0.3)
    axes = fig.subplots(len(archs), 2, squeeze=False)
    for row, arch in enumerate(archs):
        offset = 0
        for si, stage in enumerate(stages):
            h = histories[arch].get(stage)
            if not h:
                continue
            n = max((len(np.atleast_1d(v)) for v in h.values()), default=0)
            epochs = offset + np.arange(1, n + 1)
            for ci, (key, label) in enumerate((("train_loss", "train loss"), ("val_loss", "val loss"))):
                if key in h:
                    axes[row, 0].plot(epochs, np.asarray(h[key], dtype=np.float64), color=color(ci),
                                      linestyle=LINESTYLES[si], marker="o", markersize=3, label=f"{label} ({stage})")
            for ci, (key, label) in enumerate((("val_auc", "val macro AUC"), ("val_accuracy", "val accuracy"))):
                if key in h:
                    axes[row, 1].plot(epochs, np.asarray(h[key], dtype=np.float64), color=color(ci + 2),
                                      linestyle=LINESTYLES[si], marker="o", markersize=3, label=f"{label} ({stage})")
            if offset:
                for ax in axes[row]:
                    ax.axvline(offset + 0.5, color="grey", linewidth=0.8)
            offset += n
        axes[row, 0].set_ylabel("cross-entropy loss (nats)", fontsize=8)
        axes[row, 1].set_ylabel("validation score (fraction)", fontsize=8)
        axes[row, 1].set_ylim(0, 1.02)
        for ax in axes[row]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch (stage 1, then stage 2)", fontsize=8)
            ax.set_title(arch, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5)
    return fig
