"""Drift details: every metric with its interval, per class, paired tests, degenerate maps, distributions."""

from __future__ import annotations

import numpy as np

from ..maps import UPSAMPLE_WORDS
from ..summary import SATURATION_CAPTION, fmt, sample_notes, saturation_counts
from .document import (
    DEGENERATE_CODES,
    PHASES,
    Run,
    Section,
    Table,
    Text,
    figure,
)


def _drift(run: Run) -> tuple[Section, Section, dict]:
    s = Section("drift", "Drift of attribution maps, TL -> FT")
    deg = Section("degenerate", "Degenerate maps")
    per_sample: dict[tuple[str, str], dict] = {}
    present = [a for a in run.archs if run.has(f"drift/{a}")]
    for a in run.archs:
        if a not in present:
            s.blocks.append(Text(f"{a}: no drift metrics (phase drift/{a} not finished).", "note"))
    if not present:
        deg.blocks.append(Text("No drift phase in this archive: degenerate maps were not counted.", "note"))
        return s, deg, per_sample
    summaries: dict[tuple[str, str], dict] = {}
    info = []
    deg_rows = []
    for arch in present:
        attrs = {k: v for k, v in run.reader.read(f"drift/{arch}").items() if not isinstance(v, dict)}
        info.append(f"{arch}: sample set '{attrs.get('sample_set', '?')}', {attrs.get('n_selected', '?')} "
                    "samples selected")
        for method in run.reader.methods(arch):
            g = run.reader.read(f"{run.cell.drift_path(arch)}/{method}")
            summaries[(arch, method)] = g.get("summary", {})
            per_sample[(arch, method)] = g.get("per_sample", {})
            codes = g.get("degenerate", {})
            for phase in PHASES:
                if phase not in codes:
                    continue
                c = np.asarray(codes[phase]).reshape(-1)
                counts = [int((c == k).sum()) for k in DEGENERATE_CODES]
                deg_rows.append([arch, method, phase, *map(str, counts), str(int((c != 0).sum())), str(c.size)])
    s.blocks.append(Text(f"Per-sample metrics compare the transfer (TL) map with the fine-tuned (FT) map of the "
                         f"same image and target class at CAM layer '{run.cell.layer}' (score: {run.cell.score}), "
                         f"{UPSAMPLE_WORDS.get(run.cell.upsample, run.cell.upsample)} and normalised "
                         f"'{run.cell.norm}' (the primary cell"
                         " of the protocol grid; the other cells are in the ranking section). Values are macro means "
                         "over classes of per-class means, with seeded within-class bootstrap 95% intervals; classes "
                         "with fewer images than metrics.min_per_class are left out of the mean. "
                         + "; ".join(info) + "."))
    metrics_all: list[str] = []
    for summ in summaries.values():
        for m in summ:
            if m != "paired" and isinstance(summ[m], dict) and "mean" in summ[m] and m not in metrics_all:
                metrics_all.append(m)
    head = [m for m in run.headline_metrics if m in metrics_all]
    rows = []
    for (arch, method), summ in summaries.items():
        for m in metrics_all:
            if m not in summ:
                continue
            v = summ[m]
            rows.append([arch, method, m, fmt(v.get("mean")), fmt(v.get("lo")), fmt(v.get("hi")),
                         str(int(np.sum(v.get("n_per_class", 0)))), str(v.get("n_excluded", "-"))])
    s.blocks.append(Table("tbl-drift", "Every drift metric: macro mean and 95% bootstrap interval (n used, n excluded "
                          "as non-finite)", ["architecture", "method", "metric", "mean", "95% lo", "95% hi", "n used",
                                             "n excluded"], rows, collapsed=len(rows) > 40))
    n_cls = len(run.class_names)
    rows = []
    for (arch, method), summ in summaries.items():
        for m in head + [m for m in metrics_all if m not in head]:
            if m in summ and "per_class" in summ[m]:
                pc = np.asarray(summ[m]["per_class"], dtype=np.float64).reshape(-1)
                rows.append([arch, method, m, *[fmt(x) for x in pc]])
                n_cls = max(n_cls, pc.size)
    s.blocks.append(Table("tbl-drift-per-class", "Per-class means of every drift metric (nan: no scored sample of "
                          "that class)", ["architecture", "method", "metric",
                                          *[run.class_name(c) for c in range(n_cls)]], rows,
                          collapsed=len(rows) > 40))
    rows = []
    for (arch, method), summ in summaries.items():
        for q, t in summ.get("paired", {}).items():
            if isinstance(t, dict):
                rows.append([arch, method, q, fmt(t.get("median_diff")), fmt(t.get("statistic"), 1),
                             fmt(t.get("pvalue"), 4), str(t.get("n", "-")), str(t.get("n_excluded", "-"))])
    if rows:
        s.blocks.append(Table("tbl-paired", "Paired tests between phases of map concentration and localisation "
                              "(Wilcoxon signed-rank, FT vs TL on the same samples)",
                              ["architecture", "method", "quantity", "median FT - TL", "statistic", "p", "n",
                               "n excluded"], rows))
    deg.blocks.append(Text("Maps that cannot be scored are counted and excluded, never scored: code 1 non-finite "
                           "values, 2 all zero, 3 constant."))
    if deg_rows:
        deg.blocks.append(Table("tbl-degenerate", "Degenerate maps per architecture, method and checkpoint",
                                ["architecture", "method", "phase", *DEGENERATE_CODES.values(), "degenerate",
                                 "of N"], deg_rows))
    else:
        deg.blocks.append(Text("The drift groups hold no degenerate-map codes.", "note"))
    notes = sample_notes(run.reader, run.cell)
    if notes:
        deg.blocks.append(Text("Images behind the primary cell's drift table (methods compared on one sample unless "
                               "metrics.method_sample = per-method; a summary without images says why): "
                               + " ".join(n.strip() + ("" if n.strip().endswith(".") else ".") for n in notes)))
    sat = saturation_counts(run.reader)
    if sat:
        deg.blocks.append(Text(SATURATION_CAPTION + ": " + "; ".join(
            f"{arch} " + ", ".join(f"{phase} {k} of {n}" for phase, (k, n) in by_phase.items())
            for arch, by_phase in sat.items()) + "."))
    return s, deg, per_sample


def _drift_figures(run: Run, per_sample: dict, section: Section) -> None:
    if not per_sample:
        return
    archs = list(dict.fromkeys(a for a, _ in per_sample))
    methods = list(dict.fromkeys(m for _, m in per_sample))
    from .. import figures

    keys: list[str] = []
    for ps in per_sample.values():
        for k in ps:
            if (run.fraction(k) is not None or k == "centroid_shift") and k not in keys:
                keys.append(k)
    keys.sort(key=lambda k: (run.fraction(k) is None, run.fraction(k) or 0.0))
    values: dict[str, dict] = {k: {} for k in keys}
    for (arch, method), ps in per_sample.items():
        use = np.ones(len(np.asarray(ps.get("labels", []))), dtype=bool)
        for flag in ("selected", "valid"):
            if flag in ps:
                use &= np.asarray(ps[flag], dtype=bool)
        for k in keys:
            if k in ps:
                values[k][(arch, method)] = np.asarray(ps[k], dtype=np.float64)[use]
    if keys:
        fig = figures.metric_distributions(values, archs, methods, {k: run.unit(k) for k in keys},
                                           {k: run.label(k) for k in keys})
        section.blocks.append(figure("fig-distributions", "Distributions over the selected, scorable samples of the "
                                      "top-k% IoU and the centroid shift between TL and FT maps, per architecture "
                                      "(groups) and method (colours).", fig))
    points = {}
    for arch in archs:
        for method in methods:
            if not run.has(f"{run.cell.drift_path(arch)}/{method}/summary"):
                continue
            summ = run.reader.drift_summary(arch, method)
            ks = sorted((run.fraction(m), m) for m in summ if run.fraction(m) is not None)
            if ks:
                points[(arch, method)] = tuple(np.asarray([float(summ[m].get(f, np.nan)) for _, m in ks])
                                               if f else np.asarray([k for k, _ in ks])
                                               for f in (None, "mean", "lo", "hi"))
    if points:
        fig = figures.iou_against_k(points, archs, methods)
        section.blocks.append(figure("fig-iou-k", "Macro-mean IoU of the top-k% regions of the TL and FT maps against "
                                      "k, with 95% bootstrap intervals; dashed: two independent random maps.", fig))




def sections(run: Run) -> list[Section]:
    drift, deg, per_sample = _drift(run)
    _drift_figures(run, per_sample, drift)
    return [drift, deg]
