"""The headline tables of an archive, as plain text (printed at the end of ``drift run`` and by ``drift summary``).

Every number comes from :func:`drift.headline.load` (stored by the statistics step) or is a stored result read
as is; nothing is computed here. The parts are listed in :data:`SECTIONS`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np

from .archive import LEGACY_UPSAMPLE, ArchiveReader
from .config import PHASES
from .headline import load
from .metrics import metric_label
from .stats.ranking import P_TOP_LABEL


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


def counts_text(agg: dict) -> str:
    """"n (a/b/c/...)" of an aggregate: images scored in total and per class; classes left out marked with *."""
    n = np.asarray(agg.get("n_per_class", []), dtype=int).reshape(-1)
    if not n.size:
        return "-"
    used = np.asarray(agg.get("class_used", np.ones(n.size, bool)), dtype=bool).reshape(-1)
    per = "/".join(f"{k}" if u else f"{k}*" for k, u in zip(n, used))
    return f"{int(n.sum())} ({per})"


def min_per_class(r: ArchiveReader) -> str:
    try:
        return str(r.config.metrics.min_per_class)
    except Exception:
        return "?"


def _layercam_first(pairs) -> list[str]:
    """Method pairs ("m1 vs m2"), those of LayerCAM with a Grad-CAM++ reading first."""
    return sorted(pairs, key=lambda p: not ("layercam" in p and "gradcam++" in p))


def _pairs(rr: dict) -> list[str]:
    """Method pairs of a ranking, those of LayerCAM with a Grad-CAM++ reading first."""
    return _layercam_first(rr.get("reverses", {}))


def _order(v) -> str:
    return " > ".join(json.loads(v)) if isinstance(v, str) else str(v)


def ranking_table(rank: dict) -> str:
    rows = []
    for metric, rr in rank.items():
        if "unranked" in rr:
            rows.append([metric, "-", "not ranked (see the report)", "-", "-", "-"])
            continue
        for i, (method, order) in enumerate(rr.get("rankings", {}).items()):
            rows.append([metric if i == 0 else "", method, _order(order), "", "", ""])
        for p in _pairs(rr):
            rows.append(["", "", "", p, _fmt(rr.get("kendall_tau", {}).get(p), 2),
                         f"{fmt(rr['reverses'][p])} (P {_fmt(rr.get('p_reverse', {}).get(p), 2)})"])
    return table(["metric", "method", "ranking", "methods", "Kendall tau", "reverses"], rows)


def grid_rows(r: ArchiveReader) -> list[list[str]]:
    rows = []
    for cell in r.cells():
        for metric, rr in r.ranking(cell).items():
            if "unranked" in rr:
                rows.append([cell.layer, cell.score, cell.leaf, metric, "not ranked", "-"])
                continue
            ranks = "; ".join(f"{m}: {_order(o)}" for m, o in rr.get("rankings", {}).items())
            revs = ", ".join(f"{p}: {fmt(rr['reverses'][p])} ({_fmt(rr.get('p_reverse', {}).get(p), 2)})"
                             for p in _pairs(rr) if "layercam" in p) or "-"
            rows.append([cell.layer, cell.score, cell.leaf, metric, ranks, revs])
    return rows


def _median(values) -> str:
    """Median of the finite values as text; "-" when there is none (all maps of a method degenerate)."""
    v = np.asarray(values if values is not None else [], dtype=float)
    v = v[np.isfinite(v)]
    return _fmt(np.median(v)) if v.size else "-"


def agreement_rows(r: ArchiveReader) -> list[list[str]]:
    rows = []
    for arch in r.archs():
        if not r.has(f"drift/{arch}"):
            continue
        for layer in r.layers(arch):
            for score in r.keys(f"attributions/{arch}/{layer}"):
                agr = r.agreement(arch, layer, score)
                pairs = list(agr.get("transfer", {}))
                for p in _layercam_first(pairs):
                    med = [_median(agr.get(st, {}).get(p)) for st in PHASES]
                    rows.append([arch, layer, score, p, *med])
    return rows


def _classification(r: ArchiveReader, h: dict) -> list[str]:
    rows = [[arch, phase, _fmt(e["accuracy"]), _fmt(e["macro_auc"]), str(int(e.get("best_epoch", 0))),
             f"{float(e.get('seconds', 0)):.0f}"]
            for arch, by_phase in h["classification"].items() for phase, e in by_phase.items()]
    if not rows:
        return []
    return ["Classification (test set)", table(["architecture", "phase", "accuracy", "macro AUC", "best epoch",
                                                "train s"], rows), ""]


def _drift(r: ArchiveReader, h: dict) -> list[str]:
    metrics = json.loads(h.get("metrics", "[]"))
    rows = [[arch, method, counts_text(s.get(metrics[0], {})), *[interval(s, m) for m in metrics]]
            for arch, by_method in h["drift"].items() for method, s in by_method.items()] if metrics else []
    if not rows:
        return []
    cell = r.primary_cell()
    sample = r.read(f"drift/{r.archs()[0]}").get("sample_set", "?") if r.has(f"drift/{r.archs()[0]}") else "?"
    return [f"Drift TL -> FT at layer {cell.layer}, score {cell.score}, maps normalised {cell.norm}"
            f"{'' if cell.upsample == LEGACY_UPSAMPLE else f', upsampled {cell.upsample}'}; images "
            f"{sample} ({_average_words(h, r)}, 95% bootstrap interval; "
            "n = images, per class)",
            table(["architecture", "method", "n", *[metric_label(m) for m in metrics]], rows),
            *sample_notes(r, cell), ""]


def _average_words(h: dict, r: ArchiveReader) -> str:
    if h.get("average") == "micro":
        return f"micro mean over the images of classes with >= {min_per_class(r)} images, image bootstrap"
    return f"macro mean over classes with >= {min_per_class(r)} images"


def sample_notes(r: ArchiveReader, cell) -> list[str]:
    """Lines on the images behind a cell's drift table, as stored by the drift step: the common sample of the
    methods with each method's count and the images it dropped, and why a summary is empty."""
    out = []
    for arch in r.archs():
        if not r.has(cell.drift_path(arch)):
            continue
        counts, empty = [], []
        for method in r.methods(arch, cell):
            g = r.read(f"{cell.drift_path(arch)}/{method}")
            info = g.get("methods", {})
            if info:
                dropped = json.loads(info.get("dropped", "[]"))
                shown = ", ".join(dropped[:5]) + (f", ... ({len(dropped)} in all)" if len(dropped) > 5 else "")
                counts.append(f"{method} {int(info['n_valid'])} valid" + (f" (drops {shown})" if dropped else ""))
                rule, n_common = info.get("rule", "?"), int(info["n_common"])
            if g.get("empty"):
                empty.append(f"  {arch} {method}: no image scored: {g['empty']}")
            short = {k: int(v) for k, v in g.get("degenerate", {}).get("topk_short", {}).items() if int(v)}
            if short:
                empty.append(f"  {arch} {method}: no top-k IoU where a map has fewer positive pixels than k: "
                             + ", ".join(f"{k} {v} images" for k, v in short.items()))
        if counts:
            how = (f"methods compared on the {n_common} images valid under every method" if rule == "common"
                   else "each method on its own valid images")
            out.append(f"  {arch}: {how}; {'; '.join(counts)}")
        out += empty
    return out


def _agreement(r: ArchiveReader, h: dict) -> list[str]:
    rows = agreement_rows(r)
    if not rows:
        return []
    return ["Method agreement: median per-image Pearson r between two methods' maps of the same checkpoint "
            "(1 = one map; at a layer followed only by pooling and a linear head the methods nearly coincide)",
            table(["architecture", "layer", "score", "methods", "transfer", "finetune"], rows), ""]


def _ranking(r: ArchiveReader, h: dict) -> list[str]:
    st, rank = h["stats"], h["ranking"]
    if not rank:
        return []
    return [f"Stability ranking of architectures at ({r.primary_cell()}), most stable first, on "
            f"{st.get('n_ranked', '?')} images ({st.get('ranking_sample_set', '?')}; per class "
            f"{'/'.join(map(str, json.loads(st.get('n_ranked_per_class', '[]'))))}); Kendall tau is descriptive "
            "(three architectures); reverses = the most stable architecture differs (observed); "
            f"P = {P_TOP_LABEL}",
            ranking_table(rank), ""]


def _grid(r: ArchiveReader, h: dict) -> list[str]:
    rows = grid_rows(r)
    if not (len(rows) > 1 or (rows and len(r.cells()) > 1)):
        return []
    return ["Protocol sensitivity: does the most stable architecture differ between LayerCAM and Grad-CAM++? "
            f"(per cell of layers x scores x normalisations[@resampling]; observed; P = {P_TOP_LABEL}; the verdict "
            "is the test)",
            table(["layer", "score", "maps", "metric", "rankings (most stable first)", "top differs (P)"], rows), ""]


def _verdict(r: ArchiveReader, h: dict) -> list[str]:
    return [f"Verdict: {h['stats']['verdict']}", ""] if h["stats"].get("verdict") else []


def _fisher(r: ArchiveReader, h: dict) -> list[str]:
    rows = [[arch, phase, _fmt(f["top_share"]), _fmt(f["mean_rank"], 1), _fmt(f["area_high"], 4),
             _fmt(f["area_complement"], 4), _fmt(f["area_random"], 4),
             f"{_fmt(f['gap'], 4)} [{_fmt(f['gap_lo'], 4)}, {_fmt(f['gap_hi'], 4)}]", _fmt(f["wilcoxon_p"], 4)]
            for arch, by_phase in h["fisher"].items() for phase, f in by_phase.items()]
    from .report.fisher import CONTROLS_CAPTION, control_rows

    out = []
    if rows:
        out += ["iFIM: top eigenvalue share, numerical rank, and |confidence change| under equal-norm perturbations "
                "(area over eps) inside the high-sensitivity subspace, its complement and a random direction; the "
                "confidence gap (high - complement, mean over images [95% bootstrap interval]; a consistency check: "
                "it holds for any differentiable classifier) and its paired Wilcoxon p",
                table(["architecture", "phase", "top share", "mean rank", "high", "complement", "random", "gap",
                       "Wilcoxon p"], rows), ""]
    header, crows = control_rows(r, r.keys("fisher"))
    if crows:
        out += [f"iFIM controls (trained phases and an untrained network of the same architecture). {CONTROLS_CAPTION}",
                table(header, crows), ""]
    return out


def _baselines(r: ArchiveReader, h: dict) -> list[str]:
    from .report.baselines import summary_lines

    return summary_lines(r, h)


SATURATION_CAPTION = ("Test images whose float32 softmax probability of the explained class is exactly 1 or 0 (a "
                      "float32 softmax score has a zero derivative there; drift differentiates it in float64)")


def saturation_counts(r: ArchiveReader) -> dict[str, dict[str, tuple[int, int]]]:
    """``{arch: {phase: (float32-saturated test images, test images)}}`` as the attributions step stored them
    (archives made before it counted them have none)."""
    out = {}
    for arch in r.keys("attributions"):
        with_attrs = {k: v for k, v in r.read(f"attributions/{arch}").items() if not isinstance(v, dict)}
        if f"n_saturated_{PHASES[0]}" in with_attrs:
            n = len(r.read(f"attributions/{arch}/targets/{PHASES[0]}"))
            out[arch] = {st: (int(with_attrs[f"n_saturated_{st}"]), n) for st in PHASES}
    return out


def _saturation(r: ArchiveReader, h: dict) -> list[str]:
    rows = [[arch, *[f"{k} / {n}" for k, n in by_phase.values()]] for arch, by_phase in saturation_counts(r).items()]
    if not rows:
        return []
    return [SATURATION_CAPTION, table(["architecture", *PHASES], rows), ""]


def legacy_preprocessing(r: ArchiveReader) -> list[str]:
    """The models of the archive trained with a normalisation since corrected (:data:`drift.models.
    LEGACY_PREPROCESSING`): those of such a backbone that record no ``input_mean`` (made before the fix) or record
    the old one, as ``"<arch>/<phase>"``."""
    from .models import LEGACY_PREPROCESSING

    out = []
    for arch in r.archs():
        if arch not in LEGACY_PREPROCESSING:
            continue
        for phase in r.keys(f"models/{arch}"):
            mean = r.read(f"models/{arch}/{phase}").get("input_mean")
            if mean is None or tuple(json.loads(mean)) == tuple(LEGACY_PREPROCESSING[arch][0]):
                out.append(f"{arch}/{phase}")
    return out


def _preprocessing(r: ArchiveReader, h: dict) -> list[str]:
    old = legacy_preprocessing(r)
    if not old:
        return []
    from .models import LEGACY_PREPROCESSING, get_spec

    arch = old[0].split("/")[0]
    return [f"WARNING: {', '.join(old)} were trained with the earlier input normalisation (mean "
            f"{list(LEGACY_PREPROCESSING[arch][0])}), not the mean {list(get_spec(arch).mean)} / std "
            f"{list(get_spec(arch).std)} its pretrained weights declare; re-run with this drift to compare them.", ""]


SECTIONS: list[Callable[[ArchiveReader, dict], list[str]]] = [
    _preprocessing, _classification, _drift, _saturation, _agreement, _ranking, _grid, _verdict, _baselines, _fisher]
"""The summary's parts in print order. Each takes the archive and its headline numbers (:func:`drift.headline.load`)
and returns its lines (a caption, a table and a blank line; nothing when its step has not run). A new part is a
function of that signature appended here; numbers it prints belong in :func:`drift.headline.compute`."""


def summary_text(path: str | os.PathLike) -> str:
    """The headline tables of an archive as plain text: the parts of :data:`SECTIONS`, in order."""
    r = ArchiveReader(path)
    h = load(r)
    out: list[str] = []
    for part in SECTIONS:
        out += part(r, h)
    if not h["stored"] and out:
        out = ["(the statistics step has not run: headline numbers computed on reading)", "", *out]
    if r.integrity_note:  # an archive written before checksums
        out = [f"({r.integrity_note})", "", *out]
    return "\n".join(out)


def print_summary(path: str | os.PathLike) -> None:
    print("\n" + summary_text(path))
