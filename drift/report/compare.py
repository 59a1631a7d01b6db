"""The comparison of two runs (``drift compare``): their headline numbers side by side."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..archive import ArchiveReader
from ..headline import load
from ..metrics import metric_label
from ..summary import fmt, table
from .document import (
    Table,
    check_path,
    interval,
    json_list,
    strs,
    yes_no,
)
from .render import md_table, write_atomic


def headline(archive: str | os.PathLike) -> dict:
    """The headline numbers of an archive (:func:`drift.headline.load`), keyed for comparison.

    Returns:
        {"classification": {(arch, phase): {"accuracy", "macro_auc": stored value,
                                            "accuracy_ci", "macro_auc_ci": (value, lo, hi)}},
         "drift": {(arch, method, metric): (mean, lo, hi)} for the headline metrics,
         "ranking": {metric: {"rankings": {method: [arch, ...]}, "pairs": {pair: {"kendall_tau", "reverses"}},
                              "unranked": reason or None}},
         "fisher": {(arch, phase): (gap, lo, hi, n)} (the confidence gap, :func:`drift.headline.confidence_gap`),
         "n_boot", "seed": the bootstrap of the intervals}
    """
    r = ArchiveReader(check_path(archive, "archive"))
    h = load(r)
    out: dict = {"classification": {}, "drift": {}, "ranking": {}, "fisher": {}, "n_boot": h.get("n_boot"),
                 "seed": h.get("seed")}
    for arch, by_phase in h["classification"].items():
        for phase, e in by_phase.items():
            out["classification"][(arch, phase)] = {
                **{m: float(e[m]) for m in ("accuracy", "macro_auc")},
                **{f"{m}_ci": (float(e[m]), float(e[f"{m}_lo"]), float(e[f"{m}_hi"]))
                   for m in ("accuracy", "macro_auc")}}
    for arch, by_method in h["drift"].items():
        for method, by_metric in by_method.items():
            for metric, v in by_metric.items():
                out["drift"][(arch, method, metric)] = tuple(float(v.get(k, np.nan)) for k in ("mean", "lo", "hi"))
    for arch, by_phase in h["fisher"].items():
        for phase, f in by_phase.items():
            if int(f["n_perturbed"]) > 0:
                out["fisher"][(arch, phase)] = (float(f["gap"]), float(f["gap_lo"]), float(f["gap_hi"]),
                                                int(f["n_perturbed"]))
    for metric, rr in h["ranking"].items():
        entry = {"rankings": {m: [str(a) for a in json_list(v)] for m, v in rr.get("rankings", {}).items()},
                 "pairs": {p: {"kendall_tau": float(t), "reverses": yes_no(rr.get("reverses", {}).get(p)) == "yes"}
                           for p, t in rr.get("kendall_tau", {}).items()},
                 "unranked": rr.get("unranked")}
        out["ranking"][metric] = entry
    return out


def _beyond(a: tuple, b: tuple) -> str:
    """'yes' when the 95% intervals [lo, hi] of a and b do not overlap, 'no' when they do, '-' when unknown."""
    if a is None or b is None:
        return "-"
    (_, alo, ahi), (_, blo, bhi) = a[:3], b[:3]
    if not all(np.isfinite([alo, ahi, blo, bhi])):
        return "-"
    return "yes" if (blo > ahi or bhi < alo) else "no"


def _with_ci(value: Any, ci: tuple | None) -> str:
    """``value [lo, hi]``, or the value alone when the interval is unknown."""
    if ci is None or not np.all(np.isfinite(ci[1:3])):
        return fmt(value)
    return f"{fmt(value)} [{fmt(ci[1])}, {fmt(ci[2])}]"


def _comparable(a: Path, b: Path) -> None:
    ra, rb = ArchiveReader(a), ArchiveReader(b)
    for r, p in ((ra, a), (rb, b)):
        if not r.has("data/test/ids"):
            raise ValueError(f"cannot compare {a} and {b}: {p} has no test set (its 'data' step has not run)")
    ca, cb = ra.class_names, rb.class_names
    if ca != cb:
        raise ValueError(f"cannot compare {a} and {b}: different class names ({ca} in {a}, {cb} in {b})")
    ia, ib = set(strs(ra.read("data/test/ids"))), set(strs(rb.read("data/test/ids")))
    if ia != ib:
        only_a, only_b = sorted(ia - ib), sorted(ib - ia)
        raise ValueError(f"cannot compare {a} and {b}: different test samples ({len(ia)} vs {len(ib)} ids; "
                         f"{len(only_a)} only in {a}, e.g. {only_a[:3]}; {len(only_b)} only in {b}, e.g. "
                         f"{only_b[:3]})")


def compare_tables(a: str | os.PathLike, b: str | os.PathLike) -> list[Table]:
    """The comparison of two archives as tables (see :func:`compare`); refuses non-comparable archives.

    The intervals are each archive's stored headline intervals (:func:`headline`).
    """
    pa, pb = check_path(a, "a"), check_path(b, "b")
    _comparable(pa, pb)
    ha, hb = headline(pa), headline(pb)
    tables = []

    rows = []
    for key in _union(ha["classification"], hb["classification"]):
        va, vb = ha["classification"].get(key, {}), hb["classification"].get(key, {})
        row = list(key)
        for m in ("accuracy", "macro_auc"):
            x, y = va.get(m, np.nan), vb.get(m, np.nan)
            ia, ib = va.get(f"{m}_ci"), vb.get(f"{m}_ci")
            row += [_with_ci(x, ia), _with_ci(y, ib), fmt(y - x), _beyond(ia, ib)]
        rows.append(row)
    tables.append(Table("cmp-classification", f"Classification on the test set: stored value [95% bootstrap "
                        f"interval over test images, {ha['n_boot']} / {hb['n_boot']} resamples in A / B]; "
                        "'beyond' = the two intervals do not overlap",
                        ["architecture", "phase", "accuracy A", "accuracy B", "delta accuracy",
                         "accuracy beyond intervals", "macro AUC A", "macro AUC B", "delta AUC",
                         "AUC beyond intervals"], rows))

    rows = []
    for key in _union(ha["drift"], hb["drift"]):
        va, vb = ha["drift"].get(key), hb["drift"].get(key)
        delta = vb[0] - va[0] if va is not None and vb is not None else np.nan
        rows.append([key[0], key[1], metric_label(key[2]), interval(*va) if va else "-", interval(*vb) if vb else "-",
                     fmt(delta), _beyond(va, vb)])
    tables.append(Table("cmp-drift", "Drift headline metrics: macro mean [95% bootstrap interval]; 'beyond' = the two "
                        "intervals do not overlap", ["architecture", "method", "metric", "A", "B", "delta (B - A)",
                                                     "beyond intervals"], rows))

    rows = []
    for metric in _union(ha["ranking"], hb["ranking"]):
        ra, rb = ha["ranking"].get(metric, {}), hb["ranking"].get(metric, {})
        for method in _union(ra.get("rankings", {}), rb.get("rankings", {})):
            xa, xb = ra.get("rankings", {}).get(method), rb.get("rankings", {}).get(method)
            rows.append([metric, method, " > ".join(xa) if xa else "-", " > ".join(xb) if xb else "-", "",
                         "-" if xa is None or xb is None else ("yes" if xa != xb else "no")])
        for pair in _union(ra.get("pairs", {}), rb.get("pairs", {})):
            xa, xb = ra.get("pairs", {}).get(pair), rb.get("pairs", {}).get(pair)
            desc = lambda x: "-" if x is None else (f"tau {fmt(x['kendall_tau'], 2)}, "  # noqa: E731
                                                    f"{'reversed' if x['reverses'] else 'not reversed'}")
            dt = xb["kendall_tau"] - xa["kendall_tau"] if xa and xb else np.nan
            changed = "-" if xa is None or xb is None else ("yes" if xa["reverses"] != xb["reverses"] else "no")
            rows.append([metric, pair, desc(xa), desc(xb), fmt(dt, 2), changed])
        for r_, side in ((ra, "A"), (rb, "B")):
            if r_.get("unranked"):
                rows.append([metric, "-", f"{side}: not ranked ({r_['unranked']})", "", "", "-"])
    tables.append(Table("cmp-ranking", "Ranking verdicts per metric: rankings per method (most stable first) and, per "
                        "method pair, Kendall tau and reversal; 'changed' = the ranking or the verdict differs",
                        ["metric", "method / pair", "A", "B", "delta tau", "changed"], rows))

    rows = []
    for key in _union(ha["fisher"], hb["fisher"]):
        va, vb = ha["fisher"].get(key), hb["fisher"].get(key)
        delta = vb[0] - va[0] if va is not None and vb is not None else np.nan
        rows.append([key[0], key[1], f"{interval(*va[:3])} (n={va[3]})" if va else "-",
                     f"{interval(*vb[:3])} (n={vb[3]})" if vb else "-", fmt(delta), _beyond(va, vb)])
    tables.append(Table("cmp-fisher", "iFIM gap: area over eps of |confidence change|, high-sensitivity subspace minus "
                        "complement, mean over samples [95% bootstrap interval]",
                        ["architecture", "phase", "A", "B", "delta (B - A)", "beyond intervals"], rows))
    return tables


def _union(a: dict, b: dict) -> list:
    return list(dict.fromkeys([*a, *b]))


def compare(a: str | os.PathLike, b: str | os.PathLike, out: str | os.PathLike | None = None) -> str:
    """Headline numbers of two archives side by side, their differences (B - A) and which exceed the intervals.

    A difference of test accuracy, macro AUC, a drift metric or the iFIM gap is flagged when the two 95% bootstrap
    intervals do not overlap (lo_B > hi_A or hi_B < lo_A), a conservative reading of a difference. The accuracy
    and AUC intervals are the archives' stored headline intervals (percentile bootstrap over test images from the
    stored logits, :func:`drift.headline.classification_intervals`). Rankings are flagged when the order or the
    reversal verdict changes.

    Args:
        a, b: Paths of two run archives of the same test set.
        out: Optional Markdown file to write the comparison to (a folder gets ``compare.md`` inside it).

    Returns:
        The comparison as plain text (what ``drift compare`` prints).

    Raises:
        ValueError: The archives are not comparable (different class names or test samples, or no test set);
            the message names both files.
        drift.archive.ArchiveError: A file is missing or not a drift archive.
    """
    pa, pb = check_path(a, "a"), check_path(b, "b")
    tables = compare_tables(pa, pb)
    ra, rb = ArchiveReader(pa), ArchiveReader(pb)
    # Archives written before data.seed existed drew their data from the run seed.
    who = [f"{k}: {p} (seed {r.attrs.get('seed', '?')}, data seed {r.attrs.get('data_seed', r.attrs.get('seed', '?'))}"
           f", commit {r.attrs.get('git_commit', '?')}, created {r.attrs.get('created', '?')})"
           for k, p, r in (("A", pa, ra), ("B", pb, rb))]
    text = ["Comparison of two run archives", *who, "delta = B - A; 'beyond intervals' = the 95% intervals do not "
            "overlap", ""]
    md = ["# drift compare", "", *[f"- {w}" for w in who], "", "delta = B - A; *beyond intervals* = the 95% intervals "
          "do not overlap.", ""]
    for t in tables:
        if not t.rows:
            text += [t.caption, "(nothing to compare: missing in both archives)", ""]
            md += [f"## {t.caption}", "", "_Nothing to compare: missing in both archives._", ""]
            continue
        text += [t.caption, table(t.header, t.rows), ""]
        md += [f"## {t.caption}", "", md_table(t.header, t.rows), ""]
    if out is not None:
        o = check_path(out, "out")
        if o.is_dir():
            o = o / "compare.md"
        o.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(o, "\n".join(md).encode("utf-8"))
    return "\n".join(text)
