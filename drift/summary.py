"""The headline tables of an archive, as plain text (printed at the end of ``drift run``)."""

from __future__ import annotations

import json
import os

import numpy as np

from .archive import ArchiveReader

HEADLINE = (("iou@20", "IoU@20%"), ("centroid_shift", "centroid shift"), ("pearson", "Pearson r"),
            ("entropy_change", "entropy change"))


def fmt(x, nd: int = 3) -> str:
    """A number as text: ``nd`` decimals, or ``nd`` significant digits in scientific notation when 0 < |x| < 10^-nd.

    Small effects (a confidence change of 4e-4) would otherwise print as 0.000: a nonzero value never prints as
    zero. Booleans give "yes"/"no", non-numbers "-", NaN "nan", infinities "inf"/"-inf". The one formatting rule
    of the printed summary and of the report (:func:`drift.report.fmt` is this function).
    """
    if isinstance(x, (bool, np.bool_)):
        return "yes" if x else "no"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return "-"
    if not np.isfinite(x):
        return "nan" if np.isnan(x) else ("inf" if x > 0 else "-inf")
    if x != 0 and abs(x) < 10.0**-nd:
        return f"{x:.{max(nd - 1, 0)}e}"
    return f"{x:.{nd}f}"


_fmt = fmt


def interval(summary: dict, metric: str) -> str:
    s = summary.get(metric)
    if not isinstance(s, dict) or "mean" not in s:
        return "-"
    return f"{_fmt(s['mean'])} [{_fmt(s.get('lo'))}, {_fmt(s.get('hi'))}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def summary_text(path: str | os.PathLike) -> str:
    r = ArchiveReader(path)
    out: list[str] = []
    rows = []
    for arch in r.archs():
        for stage in ("transfer", "finetune"):
            if r.has(f"models/{arch}/{stage}/test"):
                ev = r.evaluation(arch, stage)
                meta = r.read(f"models/{arch}/{stage}")
                rows.append([arch, stage, _fmt(ev["accuracy"]), _fmt(ev["macro_auc"]),
                             str(int(meta.get("best_epoch", -1)) + 1), f"{float(meta.get('seconds', 0)):.0f}"])
    if rows:
        out += ["Classification (test set)", table(["architecture", "stage", "accuracy", "macro AUC", "best epoch",
                                                    "train s"], rows), ""]
    rows = []
    for arch in r.archs():
        if not r.has(f"drift/{arch}"):
            continue
        n_sel = r.read(f"drift/{arch}").get("n_selected", "?")
        for method in r.methods(arch):
            s = r.drift_summary(arch, method)
            rows.append([arch, method, str(n_sel), *[interval(s, m) for m, _ in HEADLINE]])
    if rows:
        out += ["Drift TL -> FT (macro mean over classes, 95% bootstrap interval)",
                table(["architecture", "method", "n", *[h for _, h in HEADLINE]], rows), ""]
    rank = r.ranking()
    if rank:
        rows = []
        for metric, rr in rank.items():
            if "unranked" in rr:
                rows.append([metric, f"not ranked: {rr['unranked']}", "-", "-", "-"])
                continue
            rankings = rr.get("rankings", {})
            rk = "; ".join(f"{m}: {' > '.join(json.loads(v)) if isinstance(v, str) else v}"
                           for m, v in rankings.items())
            first = lambda d: next(iter(d.values())) if isinstance(d, dict) and d else d  # noqa: E731
            rows.append([metric, rk, _fmt(first(rr.get("kendall_tau")), 2), str(first(rr.get("reverses", "-"))),
                         _fmt(first(rr.get("p_reverse")), 2)])
        out += ["Stability ranking of architectures (most stable first)",
                table(["metric", "rankings", "Kendall tau", "reverses", "P(reverse)"], rows), ""]
    rows = []
    for arch in r.archs():
        for stage in ("transfer", "finetune"):
            if not r.has(f"fisher/{arch}/{stage}"):
                continue
            f = r.read(f"fisher/{arch}/{stage}")
            share = np.asarray(f["eigen_share"])[:, 0]
            summ = f.get("summary", {})
            area = np.asarray(summ.get("area_abs_conf_change", [np.nan] * 3), dtype=float)
            ratio = area[0] / area[1] if area[1] > 0 else float("nan")
            rows.append([arch, stage, _fmt(np.nanmean(share)), _fmt(np.mean(f["rank"]), 1), _fmt(area[0], 4),
                         _fmt(area[1], 4), _fmt(area[2], 4), _fmt(ratio, 1), _fmt(summ.get("wilcoxon_pvalue"), 4)])
    if rows:
        out += ["iFIM: top eigenvalue share, numerical rank, and |confidence change| under equal-norm perturbations "
                "(area over eps) inside the high-sensitivity subspace, its complement and a random direction",
                table(["architecture", "stage", "top share", "mean rank", "high", "complement", "random",
                       "high/compl.", "Wilcoxon p"], rows), ""]
    return "\n".join(out)


def print_summary(path: str | os.PathLike) -> None:
    print("\n" + summary_text(path))
