"""The report as a document: tables, figures, texts and sections, and the run they are read from."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..archive import ArchiveReader, Cell
from ..config import PHASES
from ..headline import load
from ..metrics import DEFAULT_FRACTIONS, metric_label, metric_spec, metric_unit
from ..summary import fmt

DEGENERATE_CODES = {1: "non-finite", 2: "all zero", 3: "constant"}


def interval(mean: Any, lo: Any, hi: Any) -> str:
    """``mean [lo, hi]`` with :func:`drift.summary.fmt`, the one number format of the summary and the report."""
    return f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"


def yes_no(v: Any) -> str:
    if v is None or (isinstance(v, str) and v in ("", "-")):
        return "-"
    if isinstance(v, str):
        return "yes" if v.lower() in ("true", "1", "yes") else "no"
    return "yes" if bool(v) else "no"




def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-") or "x"


def json_list(v: Any) -> list:
    if isinstance(v, str):
        try:
            out = json.loads(v)
        except json.JSONDecodeError:
            return [v]
        return out if isinstance(out, list) else [out]
    if isinstance(v, np.ndarray):
        return [str(x) for x in v.reshape(-1)]
    return list(v) if isinstance(v, (list, tuple)) else [v]


def strs(a: Any) -> list[str]:
    arr = np.asarray(a).reshape(-1)
    return [x.decode() if isinstance(x, bytes) else str(x) for x in arr.tolist()]


# ============================================================================================ document model
@dataclass
class Table:
    """A table of the report: ``header`` (M,) and ``rows`` (R, M) of text cells; ``id`` is the HTML anchor."""

    id: str
    caption: str
    header: list[str]
    rows: list[list[str]]
    collapsed: bool = False


@dataclass
class Figure:
    """A figure of the report: PNG bytes, written to ``figures/<id>.png`` and embedded in the HTML."""

    id: str
    caption: str
    png: bytes


@dataclass
class Text:
    """A paragraph (``kind="p"``), a highlighted note on something missing (``"note"``), preformatted text
    (``"pre"``, folded in the HTML when ``collapsed``) or a sub-heading (``"h3"``)."""

    text: str
    kind: str = "p"
    collapsed: bool = False


@dataclass
class Section:
    """A titled section holding tables, figures, texts and sub-headings (``Text(kind="h3")``)."""

    id: str
    title: str
    blocks: list[Table | Figure | Text] = field(default_factory=list)


# ============================================================================================ archive helpers
@dataclass
class Run:
    """What every section needs from one archive, read once."""

    reader: ArchiveReader
    cfg: Any
    cfg_error: str
    class_names: list[str]
    archs: list[str]
    methods: list[str]
    done: list[str]
    cell: Cell
    path: Path
    headline: dict
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS

    @classmethod
    def open(cls, path: str | os.PathLike) -> Run:
        path = check_path(path, "archive")
        r = ArchiveReader(path)
        cfg, err = None, ""
        try:
            cfg = r.config
        except Exception as exc:  # a config from another version still leaves the archive's numbers readable
            err = f"{type(exc).__name__}: {exc}"
        classes = r.class_names if r.has("data") else []
        archs = list(cfg.run.archs) if cfg is not None else []
        for group in ("models", "attributions", "drift", "fisher"):
            for a in r.keys(group):
                if a not in archs:
                    archs.append(a)
        methods = list(cfg.attribution.methods) if cfg is not None else []
        cell = r.primary_cell()
        for a in archs:
            for m in r.keys(cell.drift_path(a)) + [k for s in PHASES
                                                   for k in r.keys(f"attributions/{a}/{cell.layer}/{cell.score}/{s}")]:
                if m not in methods:
                    methods.append(m)
        fractions = tuple(cfg.metrics.fractions) if cfg is not None else DEFAULT_FRACTIONS
        return cls(r, cfg, err, classes, archs, methods, [s["name"] for s in r.commits], cell, path, load(r),
                   fractions)

    def has(self, path: str) -> bool:
        return self.reader.has(path)

    def class_name(self, k: int) -> str:
        return self.class_names[k] if 0 <= k < len(self.class_names) else str(k)

    def label(self, key: str) -> str:
        """Human name of a metric key, from the registry (:func:`drift.metrics.metric_label`)."""
        return metric_label(key, self.fractions)

    def unit(self, key: str) -> str:
        """Axis label of a metric key, from the registry (:func:`drift.metrics.metric_unit`)."""
        return metric_unit(key, self.fractions)

    def fraction(self, key: str) -> float | None:
        """The top-k fraction of an ``iou@XX`` key of this run, else None."""
        s = metric_spec(key, self.fractions)
        return s.fraction if s is not None else None

    @property
    def headline_metrics(self) -> list[str]:
        """The headline drift metrics, in column order."""
        return json_list(self.headline.get("metrics", "[]"))


def missing_commits(archive: str | os.PathLike | ArchiveReader) -> list[str]:
    """Commits the archive's config asks for that are missing, in pipeline order.

    Expected: ``data``; per architecture ``models/<arch>/transfer``, ``models/<arch>/finetune``,
    ``attributions/<arch>``, ``drift/<arch>``, ``fisher/<arch>`` (when ``fisher.enabled``); then ``stats``.
    """
    r = archive if isinstance(archive, ArchiveReader) else ArchiveReader(check_path(archive, "archive"))
    done = {s["name"] for s in r.commits}
    try:
        cfg = r.config
    except Exception:  # without a readable config only the commits made are known
        return []
    expected = ["data"]
    for a in cfg.run.archs:
        expected += [f"models/{a}/transfer", f"models/{a}/finetune", f"attributions/{a}", f"drift/{a}"]
        if cfg.fisher.enabled:
            expected.append(f"fisher/{a}")
    expected.append("stats")
    return [s for s in expected if s not in done]


def check_path(p: Any, name: str) -> Path:
    if not isinstance(p, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(p).__name__}")
    return Path(p)




def figure(fid: str, caption: str, fig) -> Figure:
    """A matplotlib figure as a report :class:`Figure` (PNG)."""
    from ..figures import to_png

    return Figure(fid, caption, to_png(fig))

