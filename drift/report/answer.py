"""The study's answer, first in the report: classification, the drift table, the ranking and whether it reverses,
and the iFIM headline, each from the archive's headline numbers (:func:`drift.headline.load`)."""

from __future__ import annotations

from ..stats.ranking import P_TOP_LABEL
from ..summary import fmt
from .document import Run, Section, Table, Text, interval, json_list, missing_commits, yes_no


def sections(run: Run) -> list[Section]:
    s = Section("answer", "The answer")
    h = run.headline
    missing = missing_commits(run.reader)
    if missing:
        s.blocks.append(Text(f"This run is incomplete: {len(run.done)} commit(s) made, {len(missing)} missing: "
                             f"{', '.join(missing)}. Sections that depend on them say so below.", "note"))
    if not h["stored"]:
        s.blocks.append(Text("The statistics step has not run: the headline numbers below are computed on reading, "
                             "by the function the statistics step stores them with.", "note"))
    rows = [[arch, phase, interval(e["accuracy"], e["accuracy_lo"], e["accuracy_hi"]),
             interval(e["macro_auc"], e["macro_auc_lo"], e["macro_auc_hi"])]
            for arch, by_phase in h["classification"].items() for phase, e in by_phase.items()]
    if rows:
        s.blocks.append(Table("tbl-answer-classification", f"Classification on the test set: value [95% bootstrap "
                              f"interval over test images, {h.get('n_boot', '?')} resamples]",
                              ["architecture", "phase", "accuracy", "macro AUC"], rows))
    metrics = run.headline_metrics
    rows = []
    for arch, by_method in h["drift"].items():
        for method, summ in by_method.items():
            n = summ.get(metrics[0], {}).get("n_per_class") if metrics else None
            rows.append([arch, method, str(int(sum(n))) if n is not None else "-",
                         *[interval(summ[m].get("mean"), summ[m].get("lo"), summ[m].get("hi")) if m in summ else "-"
                           for m in metrics]])
    if rows:
        s.blocks.append(Table("tbl-drift-headline", "Headline drift metrics TL -> FT (primary cell): macro mean [95% "
                              "interval] (n = samples scored for the first metric)",
                              ["architecture", "method", "n", *[run.label(m) for m in metrics]], rows))
    rows = []
    for metric, rr in h["ranking"].items():
        if "unranked" in rr:
            rows.append([metric, "-", f"not ranked: {rr['unranked']}", "-", "-"])
            continue
        for method, order in rr.get("rankings", {}).items():
            rows.append([metric, method, " > ".join(map(str, json_list(order))), "", ""])
        for pair in rr.get("reverses", {}):
            rows.append([metric, pair, "", yes_no(rr["reverses"][pair]), fmt(rr.get("p_reverse", {}).get(pair), 3)])
    if rows:
        s.blocks.append(Table("tbl-answer-ranking", "Stability ranking of architectures (most stable first) per "
                              "method, and whether the most stable architecture differs between two methods "
                              f"(observed; P: {P_TOP_LABEL})",
                              ["metric", "method / pair", "ranking", "top differs (observed)",
                               P_TOP_LABEL], rows))
    if h["stats"].get("verdict"):
        s.blocks.append(Text("Verdict over the protocol grid (calibrated in docs/calibration.md): "
                             f"{h['stats']['verdict']}"))
    rows = [[arch, phase, fmt(f["top_share"]), f"{interval(f['gap'], f['gap_lo'], f['gap_hi'])}",
             fmt(f["wilcoxon_p"], 4), str(int(f["n_perturbed"]))]
            for arch, by_phase in h["fisher"].items() for phase, f in by_phase.items()]
    if rows:
        s.blocks.append(Table("tbl-answer-fisher", "iFIM: mean share of the top eigenvalue in the Fisher trace; the "
                              "confidence gap, area over eps of |change of predicted-class confidence| under an "
                              "equal-norm perturbation inside the high-sensitivity subspace minus inside its "
                              "complement (mean over images [95% bootstrap interval]), with its paired Wilcoxon p: a "
                              "consistency check, positive for any differentiable classifier (the controls that can "
                              "fail are in the iFIM section)",
                              ["architecture", "phase", "top share", "confidence gap", "Wilcoxon p", "n"], rows))
    if not any(isinstance(b, Table) for b in s.blocks):
        s.blocks.append(Text("No trained model has results yet.", "note"))
    return [s]
