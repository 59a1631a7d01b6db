"""Curve figures: mean curves over samples with 95% bands (perturbation experiments) and training histories."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..config import PHASES
from ..stats import mean_band
from .style import LINESTYLES, color, new_figure


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


def _has_positive(arrays) -> bool:
    return any(np.any(np.isfinite(a) & (a > 0)) for a in (np.asarray(v, dtype=np.float64) for v in arrays))


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
        # A log y axis needs a positive value to show; a collapsed model (all-zero KLs, constant curves) has
        # none, and is drawn on a linear axis, saying so, rather than failing inside matplotlib.
        logy = p.logy and _has_positive([*p.series.values(), *p.references.values()])
        for lab, v in p.series.items():
            v = np.atleast_2d(np.asarray(v, dtype=np.float64))
            if v.shape[-1] != x.size:
                raise ValueError(f"panel {p.title!r}: series {lab!r} has {v.shape[-1]} points, x has {x.size}")
            mean, lo, hi = mean_band(v)
            c = color(labels.index(lab))
            if logy:
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
        if logy:
            ax.set_yscale("log")
        elif p.logy:
            ax.text(0.5, 0.5, "no positive value: linear axis", transform=ax.transAxes, ha="center", fontsize=7,
                    color="0.4")
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
                     phases: Sequence[str] = PHASES) -> Figure:
    """Training curves per architecture: losses (left) and validation AUC / accuracy (right) against epoch.

    The phases are drawn one after the other on a common epoch axis (fine-tuning epochs continue the transfer count),
    separated by a vertical line.

    Args:
        histories: arch -> phase -> {"train_loss", "val_loss", "val_auc", "val_accuracy": (E_s,) arrays}.
        phases: Phase order.

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
        for si, phase in enumerate(phases):
            h = histories[arch].get(phase)
            if not h:
                continue
            n = max((len(np.atleast_1d(v)) for v in h.values()), default=0)
            epochs = offset + np.arange(1, n + 1)
            for ci, (key, label) in enumerate((("train_loss", "train loss"), ("val_loss", "val loss"))):
                if key in h:
                    axes[row, 0].plot(epochs, np.asarray(h[key], dtype=np.float64), color=color(ci),
                                      linestyle=LINESTYLES[si], marker="o", markersize=3, label=f"{label} ({phase})")
            for ci, (key, label) in enumerate((("val_auc", "val macro AUC"), ("val_accuracy", "val accuracy"))):
                if key in h:
                    axes[row, 1].plot(epochs, np.asarray(h[key], dtype=np.float64), color=color(ci + 2),
                                      linestyle=LINESTYLES[si], marker="o", markersize=3, label=f"{label} ({phase})")
            if offset:
                for ax in axes[row]:
                    ax.axvline(offset + 0.5, color="grey", linewidth=0.8)
            offset += n
        axes[row, 0].set_ylabel("cross-entropy loss (nats)", fontsize=8)
        axes[row, 1].set_ylabel("validation score (fraction)", fontsize=8)
        axes[row, 1].set_ylim(0, 1.02)
        for ax in axes[row]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch (transfer, then finetune)", fontsize=8)
            ax.set_title(arch, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5)
            curves = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]  # not the phase divider
            if not any(np.isfinite(np.asarray(ln.get_ydata(), dtype=float)).any() for ln in curves):
                # e.g. the validation AUC of a model that predicts one class: plotted as what it is
                ax.text(0.5, 0.5, "no finite value", transform=ax.transAxes, ha="center", fontsize=7, color="0.4")
    return fig
