"""The run report (``drift report``) and the comparison of two runs (``drift compare``).

:func:`write_report` reads an archive through :class:`drift.archive.ArchiveReader` and writes one document in two
renderings from the same content (:mod:`~drift.report.render`), so both carry the same numbers: ``report.html``
(self-contained, figures embedded as base64 PNG) and ``report.md`` (figures as PNG files under ``figures/``).

The document (:mod:`~drift.report.document`: sections of tables, figures and texts) opens with the study's answer
(:mod:`~drift.report.answer`: classification, the drift table, the ranking and whether it reverses, the iFIM
headline), then the details (classification, drift, degenerate maps, rank reversal, example maps, iFIM), then the
run itself with provenance last (:mod:`~drift.report.provenance`). Every number shown is read from the archive:
headline numbers and example images as the statistics step stored them (:mod:`drift.headline`), everything else
as its step stored it; a section whose step has not run says so instead of failing.

Adding a section: write a module here with ``sections(run: Run) -> list[Section]`` and insert it into
:data:`SECTIONS` at its place in the reading order.

:func:`compare` puts the headline numbers of two archives of the same test set side by side with their
differences, and flags the differences whose 95% intervals do not overlap.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from ..headline import pick_examples
from ..summary import fmt
from . import answer, baselines, classification, drift, examples, fisher, provenance, ranking
from .compare import compare, compare_tables, headline
from .document import Figure, Run, Section, Table, Text, check_path, missing_commits
from .render import render_html, render_markdown, write_atomic

__all__ = [
    "SECTIONS",
    "Figure",
    "Section",
    "Table",
    "Text",
    "build_report",
    "compare",
    "compare_tables",
    "fmt",
    "headline",
    "missing_commits",
    "pick_examples",
    "render_html",
    "render_markdown",
    "write_report",
]

SECTIONS: list[Callable[[Run], list[Section]]] = [
    answer.sections,
    classification.sections,
    drift.sections,
    ranking.sections,
    baselines.sections,
    examples.sections,
    fisher.sections,
    provenance.sections,
]
"""The report's parts in reading order: each maps the opened run to its sections (the answer first, provenance
last)."""


def build_report(archive: str | os.PathLike) -> list[Section]:
    """Read an archive and build the report's sections (tables, figures as PNG, notes on what is missing).

    Args:
        archive: Path of a run archive (``archive.h5``).

    Returns:
        Sections in reading order (:data:`SECTIONS`): answer, classification, drift, degenerate, ranking, examples,
        fisher, data, bench (when the archive has records), run, configuration, provenance.

    Raises:
        TypeError: ``archive`` is not a path.
        drift.archive.ArchiveError: the file is missing or not a drift archive.
    """
    from .. import figures

    run = Run.open(archive)
    with figures.plain_text():
        return [s for part in SECTIONS for s in part(run)]


def write_report(archive: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/report.md`` with ``out_dir/figures/*.png``.

    Args:
        archive: Path of a run archive; incomplete archives are reported with notes on what is missing.
        out_dir: Folder to write into (created when missing).

    Returns:
        The path of ``report.html``.

    Raises:
        TypeError: ``archive`` or ``out_dir`` is not a path.
        ValueError: ``out_dir`` exists and is not a folder.
        drift.archive.ArchiveError: the archive is missing or unreadable.
    """
    out = check_path(out_dir, "out_dir")
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a folder")
    sections = build_report(archive)
    title = f"drift report: {Path(archive).resolve().parent.name}/{Path(archive).name}"
    figs = out / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    for s in sections:
        for b in s.blocks:
            if isinstance(b, Figure):
                write_atomic(figs / f"{b.id}.png", b.png)
    write_atomic(out / "report.md", render_markdown(sections, title, figs.name).encode("utf-8"))
    html_path = out / "report.html"
    write_atomic(html_path, render_html(sections, title).encode("utf-8"))
    return html_path

