"""Every sentence drift prints as a conclusion, and the test behind it.

The functions here take per-image arrays (as the pipeline reads them from an archive, or as :mod:`drift.calibrate`
simulates them with known answers) and return the test results and one sentence. The pipeline's ``stats`` and
``baselines`` steps and the calibration harness call the same functions, so the false-positive rates and powers in
``docs/calibration.md`` are those of the sentences an archive gets.

* :func:`judge_systematic`: is the TL -> FT drift larger than retraining noise? Per (architecture, method, metric),
  the systematic drift S (:func:`drift.stats.systematic_drift`) from the run's fine-tuned model and its seed
  replicas; "beyond seed noise" when Holm's adjusted one-sided p over the family is at most alpha. Needs M >= 3
  fine-tuned models (two replicas): with fewer the model variance is not estimable and no sentence is made.
* :func:`judge_ranking`: which architecture drifts less, systematically? Pairwise differences of S
  (:func:`drift.stats.systematic_contrast`), Holm over the family.
* :func:`judge_reversals`: does the stability order of architectures reverse between LayerCAM and Grad-CAM++?
  Intersection-union tests per (distinct cell, metric, method pair, architecture pair)
  (:func:`drift.stats.contrast.reversal`), Holm over all of them (family-wise alpha across the grid).
* :func:`judge_chains`: with whole chains, are TL and FT maps differently distributed over training seeds (energy
  permutation test), and how often does the most stable architecture differ between the methods across chains (a
  count, descriptive).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from .stats.contrast import holm, reversal
from .stats.systematic import (
    RANKABLE_FORMS,
    energy_test,
    euclidean_label,
    systematic_contrast,
    systematic_drift,
    systematic_form,
)

ALPHA = 0.05
"""Family-wise error rate of every verdict."""

AGREEMENT_UNTESTABLE = 0.999
"""Mean Pearson r between two methods' maps at or above which a (layer, score) cannot show a reversal between them."""


def _fmt(x: float, digits: int = 3) -> str:
    return "nan" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def judged_pairs(methods: Sequence[str]) -> tuple[list[tuple[str, str]], str]:
    """The method pairs a reversal verdict judges: LayerCAM with each Grad-CAM++ reading ("LayerCAM and
    Grad-CAM++"), or every pair when the run lacks either ("methods")."""
    methods = list(methods)
    every = [(a, b) for i, a in enumerate(methods) for b in methods[i + 1:]]
    study = [p for p in every if "layercam" in p and any(m.startswith("gradcam++") for m in p)]
    return (study, "LayerCAM and Grad-CAM++") if study else (every, "methods")


# ---------------------------------------------------------------------------------------------- systematic drift
def judge_systematic(entries: dict, labels: np.ndarray | None = None, alpha: float = ALPHA,
                     min_per_class: int = 1) -> dict:
    """Systematic drift beyond seed noise, per entry, with Holm over the entries that can be tested.

    Args:
        entries: ``{(arch, method, metric): (d_tl (M, N), d_ft (M, M, N))}`` squared-Euclidean instabilities
            (:func:`drift.stats.euclidean_instability`).
        labels: (N,) classes (macro means), or None.
        alpha: family-wise error rate.

    Returns:
        ``{"results": {key: SystematicDrift as dict + "p_holm", "beyond"}, "sentence": str, "n_tests": int}``.
    """
    res = {k: systematic_drift(t, f, labels, min_per_class=min_per_class, form=systematic_form(k[2]))
           for k, (t, f) in entries.items()}
    out, n_tests = _holm_family(res, lambda r: r.p_value if r.models_resampled else math.nan, "beyond", alpha)
    return {"results": out, "sentence": _systematic_sentence(out, alpha, n_tests), "n_tests": n_tests}


def _holm_family(res: dict, p_of, flag: str, alpha: float) -> tuple[dict, int]:
    """Each result as a dict with its Holm-adjusted p (``p_holm``) over the results whose ``p_of`` is finite and
    ``flag`` = adjusted p <= alpha; the number of tests in the family."""
    keys = [k for k, r in res.items() if math.isfinite(p_of(r))]
    adj = dict(zip(keys, holm([p_of(res[k]) for k in keys]), strict=True))
    out = {}
    for k, r in res.items():
        d = r.as_dict()
        d["p_holm"] = adj.get(k, math.nan)
        d[flag] = bool(k in adj and adj[k] <= alpha)
        out[k] = d
    return out, len(keys)


def _systematic_sentence(out: dict, alpha: float, n_tests: int) -> str:
    if not out:
        return ""
    m = max(int(d["n_models"]) for d in out.values())
    if n_tests == 0:
        return (f"Systematic drift: not judged ({m} fine-tuned model{'s' if m != 1 else ''} per architecture; the "
                "seed noise's own uncertainty needs at least 3, i.e. baselines.seeds >= 2).")
    beyond = [k for k, d in out.items() if d["beyond"]]
    within = [k for k, d in out.items() if not d["beyond"] and math.isfinite(d["p_holm"])]
    share = [d["noise_share"] for d in out.values() if math.isfinite(d["noise_share"])]
    span = f"; seed noise is {_fmt(min(share), 2)}-{_fmt(max(share), 2)} of the observed drift" if share else ""

    def names(keys):
        return ", ".join(f"{a}/{me} by {euclidean_label(mt)}" for a, me, mt in keys)

    head = (f"Systematic drift beyond seed noise (S from {m} fine-tuned models per architecture, Holm over {n_tests} "
            f"tests at family-wise alpha = {alpha:g}): ")
    if beyond and not within:
        body = "in every tested entry"
    elif beyond:
        body = f"in {len(beyond)} of {n_tests} ({names(beyond)}); not shown for the rest"
    else:
        body = "in none (the drift is not shown to exceed what retraining alone gives)"
    return head + body + span + "."


# ---------------------------------------------------------------------------------------------- ranking on S
def judge_ranking(by_arch: dict, labels: np.ndarray | None = None, alpha: float = ALPHA,
                  min_per_class: int = 1) -> dict:
    """Which architecture's systematic drift is smaller, per (method, metric), Holm over every pair; metrics whose
    S form is not rankable (:data:`drift.stats.systematic.RANKABLE_FORMS`: the top-k IoU) are left out.

    Args:
        by_arch: ``{(method, metric): {arch: (d_tl (M, N), d_ft (M, M, N))}}`` on shared images.

    Returns:
        ``{"results": {(method, metric, a, b): SystematicContrast as dict + "p_holm", "claim"}, "sentence",
        "n_tests"}``; ``claim`` names the architecture shown to drift less (``""`` when none).
    """
    res = {}
    for (method, metric), archs in by_arch.items():
        if systematic_form(metric) not in RANKABLE_FORMS:
            continue  # its S grows with the seed noise: a ranking on it would favour the noisiest architecture
        names = list(archs)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                res[method, metric, a, b] = systematic_contrast(archs[a], archs[b], labels,
                                                                min_per_class=min_per_class,
                                                                form=systematic_form(metric))
    keys = [k for k, r in res.items() if r.models_resampled and math.isfinite(r.p_lower)]
    ps = [min(1.0, 2 * min(res[k].p_lower, res[k].p_higher)) for k in keys]  # two-sided: either may drift less
    adj = dict(zip(keys, holm(ps), strict=True))
    out = {}
    for k, r in res.items():
        d = r.as_dict()
        d["p_holm"] = adj.get(k, math.nan)
        claim = ""
        if k in adj and adj[k] <= alpha:
            claim = k[2] if r.estimate < 0 else k[3]
        d["claim"] = claim
        out[k] = d
    claims = [f"{d['claim']} < {k[3] if d['claim'] == k[2] else k[2]} ({k[0]}, {euclidean_label(k[1])})"
              for k, d in out.items() if d["claim"]]
    if not keys:
        sentence = ("Architectures ranked on systematic drift: not judged (needs at least 3 fine-tuned models per "
                    "architecture)." if res else "")
    elif claims:
        sentence = (f"Architectures ranked on systematic drift (Holm over {len(keys)} pairwise tests, alpha = "
                    f"{alpha:g}): smaller systematic drift shown for " + "; ".join(claims) + ".")
    else:
        sentence = (f"Architectures ranked on systematic drift (Holm over {len(keys)} pairwise tests, alpha = "
                    f"{alpha:g}): no architecture is shown to drift less than another.")
    return {"results": out, "sentence": sentence, "n_tests": len(keys)}


# ---------------------------------------------------------------------------------------------- reversals
def distinct_cells(grid: dict) -> dict[str, list[str]]:
    """Cells of one layer and score whose values are identical for every metric, architecture and method, collapsed.

    Args:
        grid: ``{cell_key: {metric: {arch: {method: array}}}}``.

    Returns:
        ``{representative cell_key: [cell_keys it stands for]}`` per metric-independent identity (cells of one
        layer and score whose normalisations the metrics are invariant to: IoU and Pearson under min-max and sum
        normalisation, for instance).
    """
    reps: dict[str, list[str]] = {}
    for key, by_metric in grid.items():
        for rep in reps:
            if rep.split("/")[:2] != key.split("/")[:2]:  # only normalisations of one layer and score collapse
                continue
            other = grid[rep]
            if set(other) == set(by_metric) and all(
                    set(other[m]) == set(by_metric[m]) and all(
                        set(other[m][a]) == set(by_metric[m][a]) and all(
                            np.array_equal(np.asarray(other[m][a][me]), np.asarray(by_metric[m][a][me]),
                                           equal_nan=True) for me in by_metric[m][a]) for a in by_metric[m])
                    for m in by_metric):
                reps[rep].append(key)
                break
        else:
            reps[key] = [key]
    return reps


def _distinct_per_metric(grid: dict, metric: str) -> dict[str, list[str]]:
    return distinct_cells({k: {metric: v[metric]} for k, v in grid.items() if metric in v})


def judge_reversals(grid: dict, methods: Sequence[str], labels: np.ndarray | None = None,
                    agreement: dict | None = None, accuracy: dict | None = None, alpha: float = ALPHA,
                    min_per_class: int = 1) -> dict:
    """Does the stability order of architectures reverse between LayerCAM and Grad-CAM++? One family over the grid.

    Args:
        grid: ``{cell_key "layer/score/norm": {metric: {arch: {method: (M, N) or (N,) instabilities}}}}`` on
            shared images (lower = more stable; rows = fine-tuned models).
        methods: the run's methods (:func:`judged_pairs` picks the pairs).
        labels: (N,) classes, or None.
        agreement: ``{"layer/score": {(m1, m2): smallest mean method agreement over architectures}}``: a pair at or
            above :data:`AGREEMENT_UNTESTABLE` there is untestable (its maps are the same) and excluded, named.
        accuracy: ``{arch: {"transfer": (acc, lo, hi), "finetune": (acc, lo, hi)}}`` for the convergence remark.
        alpha: family-wise error rate.

    Returns:
        ``{"tests": [row dicts], "cells": {metric: {"distinct": n, "testable": n, "supported": [cells]}},
        "untestable": [...], "collapsed": {metric: {rep: [cells]}}, "sentence": str, "scope": str}``.
    """
    pairs, between = judged_pairs(methods)
    agreement = agreement or {}
    rows: list[dict] = []
    cells: dict[str, dict] = {}
    untestable: list[str] = []
    collapsed: dict[str, dict[str, list[str]]] = {}
    resampled = None
    metrics = list(dict.fromkeys(m for by_metric in grid.values() for m in by_metric))
    for metric in metrics:
        reps = _distinct_per_metric(grid, metric)
        collapsed[metric] = reps
        info = cells.setdefault(metric, {"distinct": len(reps), "testable": 0, "supported": []})
        for rep in reps:
            x = grid[rep][metric]
            layer_score = "/".join(rep.split("/")[:2])
            archs = list(x)
            testable_here = False
            for m1, m2 in pairs:
                agr = agreement.get(layer_score, {}).get((m1, m2), math.nan)
                if math.isfinite(agr) and agr >= AGREEMENT_UNTESTABLE:
                    name = f"{layer_score} ({m1} vs {m2}, r {agr:.4f})"
                    if name not in untestable:
                        untestable.append(name)
                    continue
                if not all(m1 in x[a] and m2 in x[a] for a in archs):
                    continue
                testable_here = True
                for i, a in enumerate(archs):
                    for b in archs[i + 1:]:
                        r = reversal(a, b, m1, m2, x, labels, min_per_class=min_per_class)
                        resampled = r.d1.models_resampled if resampled is None else resampled and \
                            r.d1.models_resampled
                        rows.append({"cell": rep, "cells": reps[rep], "metric": metric, **r.as_dict()})
            info["testable"] += testable_here
    adj = holm([r["p_value"] for r in rows])
    for r, p in zip(rows, adj, strict=True):
        r["p_holm"] = float(p)
        r["supported"] = bool(math.isfinite(p) and p <= alpha)
        if r["supported"] and r["cell"] not in cells[r["metric"]]["supported"]:
            cells[r["metric"]]["supported"].append(r["cell"])
    scope = ("fine-tuning seeds resampled (each architecture's transfer checkpoint fixed)" if resampled
             else "these checkpoints: images resampled, training seeds not")
    sentence = _reversal_sentence(cells, between, untestable, len(rows), alpha, scope, accuracy)
    return {"tests": rows, "cells": cells, "untestable": untestable, "collapsed": collapsed, "sentence": sentence,
            "scope": scope, "n_tests": len(rows)}


def _reversal_sentence(cells: dict, between: str, untestable: list[str], n_tests: int, alpha: float, scope: str,
                       accuracy: dict | None) -> str:
    if not cells or n_tests == 0:
        why = "no testable cell" + (f" (untestable: {', '.join(untestable)})" if untestable else "")
        return f"Reversal of the stability order between {between}: not judged, {why}."
    parts = [f"by {m} supported in {len(c['supported'])} of {c['testable']} distinct testable cells"
             + (f" ({', '.join(c['supported'])})" if c["supported"] else "")
             for m, c in cells.items() if c["testable"]]
    out = (f"Reversal of the stability order of architectures between {between} ({scope}): " + "; ".join(parts)
           + f" at family-wise alpha = {alpha:g} (Holm over {n_tests} tests)")
    if untestable:
        out += f"; untestable, the methods' maps agree: {', '.join(untestable)}"
    out += "."
    remark = convergence_remark(accuracy)
    return out + (" " + remark if remark else "")


def convergence_remark(accuracy: dict | None) -> str:
    """A remark when transfer and fine-tuned test accuracy differ beyond their intervals (non-overlapping 95%
    intervals: a conservative check) for some architecture: the study's claim is made under converged predictive
    performance. ``""`` otherwise."""
    if not accuracy:
        return ""
    off = []
    for arch, by_phase in accuracy.items():
        tl, ft = by_phase.get("transfer"), by_phase.get("finetune")
        if not tl or not ft or not all(math.isfinite(v) for v in (*tl, *ft)):
            continue
        if tl[2] < ft[1] or ft[2] < tl[1]:
            off.append(f"{arch} {tl[0]:.3f} -> {ft[0]:.3f}")
    if not off:
        return ""
    return ("Transfer and fine-tuned accuracy differ beyond their 95% intervals (" + ", ".join(off) + "): the study "
            "compares maps under converged predictive performance, which this run does not have.")


# ---------------------------------------------------------------------------------------------- chains
def judge_chains(chains: dict, methods: Sequence[str], tops: dict | None = None, alpha: float = ALPHA) -> dict:
    """Whole-chain replicates: one energy test per architecture (Holm over architectures) and the chain-level
    reversal count.

    Args:
        chains: ``{(arch, method, metric): (d_tl_tl, d_ft_ft, d_tl_ft)}`` each (R, R, N) (see
            :func:`drift.stats.energy_test`); an architecture's entries are tested jointly (a scale-free sum of
            their energy statistics under one within-chain permutation), so the family is the architectures.
        methods: the run's methods.
        tops: ``{metric: {method: [most stable architecture in chain r, r < R]}}`` for the descriptive count.
        alpha: family-wise error rate.
    """
    by_arch: dict[str, list] = {}
    for (arch, _, _), v in chains.items():
        by_arch.setdefault(arch, []).append(v)
    res = {a: energy_test(*(list(x) for x in zip(*v, strict=True))) for a, v in by_arch.items()}
    out, n_tests = _holm_family(res, lambda r: r.p_value, "different", alpha)
    parts = []
    if out:
        n_chains = max(d["n_chains"] for d in out.values())
        min_p = min(d["min_p"] for d in out.values())
        diff = [a for a, d in out.items() if d["different"]]
        parts.append(f"Whole chains ({n_chains}; energy test over the judged methods and metrics, phase labels "
                     f"permuted within chains, Holm over {n_tests} architectures at alpha = {alpha:g}): TL and FT "
                     "maps differ over training seeds for " + (", ".join(diff) if diff else "no architecture")
                     + (f" (with {n_chains} chains the smallest attainable p-value is {min_p:.3g}: no test can "
                        "reject)" if min_p * n_tests > alpha else "") + ".")
    if tops:
        pairs, _ = judged_pairs(methods)
        for metric, by_method in tops.items():
            for m1, m2 in pairs:
                if m1 in by_method and m2 in by_method:
                    t1, t2 = by_method[m1], by_method[m2]
                    k = sum(a != b for a, b in zip(t1, t2, strict=True))
                    parts.append(f"By {metric}, the most stable architecture differs between {m1} and {m2} in {k} "
                                 f"of {len(t1)} chains (a count across seeds, not a test).")
    return {"results": out, "sentence": " ".join(parts)}


# ---------------------------------------------------------------------------------------------- archive form
def reversal_table(tests: list[dict]) -> dict:
    """The reversal tests of :func:`judge_reversals` as columns for the archive (strings, floats, bools)."""
    cols: dict = {k: [] for k in ("cell", "metric", "a", "b", "m1", "m2", "direction")}
    nums: dict = {k: [] for k in ("d1", "d1_lo", "d1_hi", "d2", "d2_lo", "d2_hi", "interaction", "interaction_lo",
                                  "interaction_hi", "n_images", "p_value", "p_holm")}
    supported = []
    for t in tests:
        for k in cols:
            cols[k].append(str(t[k]))
        for name in ("d1", "d2", "interaction"):
            c = t[name]
            nums[name].append(c["estimate"])
            nums[f"{name}_lo"].append(c["low"])
            nums[f"{name}_hi"].append(c["high"])
        nums["n_images"].append(t["d1"]["n_images"])
        nums["p_value"].append(t["p_value"])
        nums["p_holm"].append(t["p_holm"])
        supported.append(bool(t["supported"]))
    out = {k: np.asarray(v, dtype=str) for k, v in cols.items()}
    out.update({k: np.asarray(v, dtype=np.float64) for k, v in nums.items()})
    out["supported"] = np.asarray(supported, dtype=bool)
    return out


def nested(results: dict) -> dict:
    """``{(k1, k2, ...): {...}}`` as nested dicts ``{k1: {k2: ...}}`` (archive groups)."""
    out: dict = {}
    for key, value in results.items():
        node = out
        for k in key[:-1]:
            node = node.setdefault(str(k).replace("/", "_"), {})
        node[str(key[-1]).replace("/", "_")] = value
    return out
