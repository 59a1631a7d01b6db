"""The figures' common style: palette, colour maps, line styles, and the Agg-backed figure and its PNG rendering.

Colours follow the Okabe-Ito palette (distinguishable under the common colour-vision deficiencies); images use
``viridis`` (sequential) and ``PuOr_r`` (diverging), both readable in grey scale and by colour-blind readers.
Nothing here touches pyplot, so no global state or GUI backend is used.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

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
