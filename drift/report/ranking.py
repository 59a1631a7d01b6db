"""Rank reversal details: rankings per metric and method, agreement between methods, the protocol grid."""

from __future__ import annotations

from ..stats.ranking import P_TOP_LABEL
from ..summary import fmt
from .document import (
    Run,
    Section,
    Table,
    Text,
    json_list,
    yes_no,
)


def _ranking(run: Run) -> Section:
    from ..summary import agreement_rows, counts_text, grid_rows

    s = Section("ranking", "Rank reversal of architectures")
    rank = run.reader.ranking()
    st = run.reader.stats_attrs()
    if not rank:
        s.blocks.append(Text("No statistics step in this archive (commit 'stats' missing): architectures were "
                             "not ranked.", "note"))
        return s
    if st.get("verdict"):
        s.blocks.append(Text(f"Verdict over the protocol grid: {st['verdict']}"))
    per_class = json_list(st.get("n_ranked_per_class", "[]"))
    s.blocks.append(Text(
        f"Architectures are ranked by stability under each attribution method (macro mean of the metric; most stable "
        f"first) on one common set of {st.get('n_ranked', '?')} images (rule '{st.get('ranking_sample_set', '?')}'; "
        f"per class {' / '.join(f'{run.class_name(k)} {n}' for k, n in enumerate(per_class))}), so that a ranking is "
        f"not confounded with each architecture's class mix. Kendall tau compares two methods' orderings and is "
        "descriptive (over three architectures its p-value cannot fall below 0.33); a reversal means the most stable "
        "architecture differs in these checkpoints' point estimates (descriptive), and "
        f"{P_TOP_LABEL} is its frequency under a paired bootstrap that resamples the images once per replicate for "
        "every method and architecture: it describes these trained weights, not the chance that a reversal is real "
        f"(the verdict below is the test). Primary cell: layer '{run.cell.layer}', score '{run.cell.score}', maps "
        f"'{run.cell.norm}', resampling '{run.cell.upsample}'."))
    rows, pair_rows = [], []
    for metric, rr in rank.items():
        if "unranked" in rr:
            rows.append([metric, "-", f"not ranked: {rr['unranked']}", "-"])
            continue
        higher = rr.get("higher_is_stable")
        absolute = rr.get("absolute")
        direction = ("higher is more stable" if yes_no(higher) == "yes" else
                     ("smaller |value| is more stable" if yes_no(absolute) == "yes" else "lower is more stable"))
        means = rr.get("means", {})
        for method, order in rr.get("rankings", {}).items():
            order = json_list(order)
            m = means.get(method, {})
            rows.append([metric, method, " > ".join(map(str, order)),
                         ", ".join(f"{a} {fmt(m.get(a))}" for a in order if a in m) + f" ({direction})"])
        for pair in rr.get("kendall_tau", {}):
            pair_rows.append([metric, pair, fmt(rr["kendall_tau"].get(pair), 3),
                              yes_no(rr.get("reverses", {}).get(pair)),
                              yes_no(rr.get("fully_reversed", {}).get(pair)),
                              fmt(rr.get("p_reverse", {}).get(pair), 3),
                              fmt(rr.get("p_fully_reversed", {}).get(pair), 3)])
    s.blocks.append(Table("tbl-ranking", "Stability rankings per metric and method (primary cell)",
                          ["metric", "method", "ranking (most stable first)", "macro means"], rows))
    if pair_rows:
        s.blocks.append(Table("tbl-kendall", "Agreement of the rankings between methods (primary cell)",
                              ["metric", "methods", "Kendall tau (descriptive)", "top differs (observed)",
                               "fully reversed (observed)", P_TOP_LABEL, "P(fully reversed | same)"], pair_rows))
    grid = grid_rows(run.reader)
    if grid:
        s.blocks.append(Table("tbl-grid", "Protocol sensitivity: the rankings in every cell of CAM layers x "
                              "differentiated scores x map normalisations, and whether the most stable architecture "
                              "differs between LayerCAM and each Grad-CAM++ reading (paired bootstrap P in brackets)",
                              ["layer", "score", "maps", "metric", "rankings (most stable first)", "reverses (P)"],
                              grid, collapsed=len(grid) > 40))
    agree = agreement_rows(run.reader)
    if agree:
        s.blocks.append(Table("tbl-agreement", "Method agreement: median over the test images of the per-image "
                              "Pearson r between two methods' maps of the same checkpoint (1: the methods give one "
                              "map, as they nearly do at a layer followed only by pooling and a linear head)",
                              ["architecture", "layer", "score", "methods", "transfer", "finetune"], agree))
    rows = []
    for arch in run.archs:
        if not run.has(run.cell.drift_path(arch)):
            continue
        for method in run.reader.methods(arch):
            summ = run.reader.drift_summary(arch, method)
            if isinstance(summ.get("iou@20"), dict):
                rows.append([arch, method, counts_text(summ["iou@20"])])
    if rows:
        s.blocks.append(Text("Images behind each per-architecture drift mean (metrics.sample_set, IoU@20%): total "
                             "(per class; * = left out of the macro mean for too few images): "
                             + "; ".join(f"{a} {m}: {n}" for a, m, n in rows) + ".", "note"))
    return s




def sections(run: Run) -> list[Section]:
    return [_ranking(run)]
