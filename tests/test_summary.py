"""Tests of the number formatting shared by ``drift summary`` and the report (drift.summary.fmt, drift.report.fmt).

Expectations are written with Python's own format strings: ``nd`` decimals (``f"{x:.{nd}f}"``), or ``nd``
significant digits in scientific notation (``f"{x:.{nd - 1}e}"``) for nonzero values below 10^-nd in magnitude.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from drift import report, summary
from drift.archive import Archive
from drift.h5tree import write_tree


def _expected(x: float, nd: int) -> str:
    if x != 0 and abs(x) < 10.0**-nd:
        return format(x, f".{max(nd - 1, 0)}e")
    return format(x, f".{nd}f")


@pytest.mark.parametrize("f", [summary.fmt, summary._fmt, report.fmt])
def test_fmt_literal_cases(f):
    assert f(4.2e-4) == "4.20e-04"
    assert f(-4e-4) == "-4.00e-04"
    assert f(4.2e-4, 4) == "0.0004" and f(4.2e-5, 4) == "4.200e-05"
    assert f(9.996e-4) == "1.00e-03"  # below the threshold: scientific even where it rounds up to 10^-nd
    assert f(1e-3) == "0.001" and f(0.5) == "0.500" and f(12.3456, 1) == "12.3" and f(0.0) == "0.000"
    assert f(np.float32(2.5e-7)) == "2.50e-07" and f(np.int64(3)) == "3.000"
    assert f(float("nan")) == "nan" and f(np.inf) == "inf" and f(-np.inf) == "-inf"
    assert f(None) == "-" and f("abc") == "-" and f([1, 2]) == "-"
    assert f(True) == "yes" and f(np.bool_(False)) == "no"


def test_fmt_matches_format_strings_over_magnitudes(rng):
    mags = torch.randint(-12, 6, (400,), generator=rng).numpy()
    mant = torch.rand(400, generator=rng, dtype=torch.float64).numpy() * 9 + 1
    sign = np.where(torch.rand(400, generator=rng).numpy() < 0.5, -1.0, 1.0)
    values = sign * mant * 10.0**mags
    for x in values:
        for nd in (1, 2, 3, 4):
            assert summary.fmt(x, nd) == report.fmt(x, nd) == _expected(float(x), nd), (x, nd)
            if x != 0:
                assert float(summary.fmt(x, nd)) != 0.0  # a nonzero value never prints as zero


def test_summary_text_shows_small_values(tmp_path, rng):
    """The printed summary carries small effects (4e-4) instead of 0.000, in every table."""
    u = lambda: float(torch.rand(1, generator=rng, dtype=torch.float64)) * 9 + 1  # noqa: E731
    acc, auc = u() * 1e-4, u() * 0.1
    mean, lo, hi = u() * 1e-4, -u() * 1e-5, u() * 1e-3
    area = np.array([u() * 1e-5, u() * 1e-3, u() * 1e-1])
    pval = u() * 1e-7
    ar = Archive(tmp_path / "a.h5", "", "", {"seed": 0})
    with ar.commit("data") as f:
        f.require_group("data").attrs["class_names"] = json.dumps(["a", "b"])
    with ar.commit("models/m/transfer") as f:
        g = f.require_group("models/m/transfer")
        write_tree(g, {"test": {"accuracy": acc, "macro_auc": auc}})
        g.attrs.update({"best_epoch": 2, "seconds": 12.0})
    with ar.commit("drift/m") as f:
        g = f.require_group("drift/m")
        write_tree(g, {"block": {"logit": {"none": {"gradcam": {"summary": {
            "entropy_change": {"mean": mean, "lo": lo, "hi": hi}}}}}}})
        g.attrs["n_selected"] = 5
    with ar.commit("fisher/m") as f:
        write_tree(f.require_group("fisher/m"), {"transfer": {
            "eigen_share": np.full((4, 2), 0.5), "rank": np.array([2, 2, 2, 2]),
            "summary": {"area_abs_conf_change": area, "wilcoxon_pvalue": pval}}})
    text = summary.summary_text(tmp_path / "a.h5")
    lines = text.splitlines()
    cls = next(ln for ln in lines if ln.startswith("m ") and "transfer" in ln and "3" in ln.split())
    assert cls.split()[2:4] == [_expected(acc, 3), _expected(auc, 3)], cls
    drift_row = next(ln for ln in lines if ln.startswith("m ") and "gradcam" in ln)
    assert f"{_expected(mean, 3)} [{_expected(lo, 3)}, {_expected(hi, 3)}]" in drift_row
    fisher_row = lines[-1].split()
    assert fisher_row[4:7] == [_expected(v, 4) for v in area]
    assert fisher_row[-1] == _expected(pval, 4) and "e-" in fisher_row[-1]
    assert "0.000 " not in text.replace("0.000e", "")


def test_summary_report_and_asv_print_the_same_headline_numbers(tmp_path_factory):
    """One archive, three readers: the printed summary, the report's answer and asv's track numbers agree."""
    from test_report import ARCHS, METHODS, full_report, interval_of, parse_html, rows_by

    from bench.benchmarks.track_science import headline_numbers
    from drift.archive import ArchiveReader

    d, truth, html_path = full_report(tmp_path_factory)
    asv = headline_numbers(ArchiveReader(d / "archive.h5"), list(ARCHS), list(METHODS))
    text = summary.summary_text(d / "archive.h5")
    lines = text.splitlines()
    assert "has not run" not in text  # the numbers are the stored ones
    t = parse_html(html_path).tables
    cls = rows_by(t["tbl-answer-classification"], 2)
    fisher = rows_by(t["tbl-answer-fisher"], 2)
    drift = rows_by(t["tbl-drift-headline"], 2)
    for arch in ARCHS:
        for phase in ("transfer", "finetune"):
            row = next(ln.split() for ln in lines if ln.split()[:2] == [arch, phase] and len(ln.split()) == 6)
            assert row[2] == summary.fmt(asv[("accuracy", arch, phase)])
            assert row[3] == summary.fmt(asv[("macro_auc", arch, phase)])
            assert cls[(arch, phase)][2].split()[0] == row[2] and cls[(arch, phase)][3].split()[0] == row[3]
            frow = next(ln.split() for ln in lines if ln.split()[:2] == [arch, phase] and len(ln.split()) > 6)
            gap = asv[("confidence_gap", arch, phase)]
            assert frow[2] == summary.fmt(asv[("top_eigen_share", arch, phase)]) == fisher[(arch, phase)][2]
            assert frow[7] == summary.fmt(gap, 4)
            assert fisher[(arch, phase)][3].split()[0] == summary.fmt(gap)
        for method in METHODS:
            row = next(ln for ln in lines if ln.split()[:2] == [arch, method])
            iou, shift = asv[("iou@20", arch, method)], asv[("centroid_shift", arch, method)]
            assert f"{summary.fmt(iou)} [" in row and f"{summary.fmt(shift)} [" in row
            assert interval_of(drift[(arch, method)][3])[0] == float(summary.fmt(iou))
            assert interval_of(drift[(arch, method)][4])[0] == float(summary.fmt(shift))
            assert iou == truth["drift"][(arch, method)]["summary"]["iou@20"]["mean"]
