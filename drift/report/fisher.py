"""iFIM details: spectra, subspace components, perturbation curves, and the controls of the iFIM claim."""

from __future__ import annotations

import numpy as np

from ..summary import fmt
from .document import (
    PHASES,
    Run,
    Section,
    Table,
    Text,
    figure,
    interval,
    slug,
    strs,
)


def _fisher(run: Run) -> Section:
    s = Section("fisher", "Input-dependent Fisher information (iFIM)")
    from .. import figures

    present = [(a, st) for a in run.archs for st in PHASES if run.has(f"fisher/{a}/{st}")]
    if run.cfg is not None and not run.cfg.fisher.enabled:
        s.blocks.append(Text("The iFIM analysis is disabled in this run's configuration (fisher.enabled = false).",
                             "note"))
        return s
    for a in run.archs:
        if not any(p[0] == a for p in present):
            s.blocks.append(Text(f"{a}: no iFIM results (commit fisher/{a} missing).", "note"))
    if not present:
        if not s.blocks:
            s.blocks.append(Text("No iFIM results in this archive (no fisher/<arch> commit).", "note"))
        return s
    s.blocks.append(Text("F(x) = J^T (diag p - p p^T) J has rank <= C - 1; its leading k eigenvectors (enough for the "
                         "configured energy share) span the high-sensitivity subspace. Perturbations of equal norm "
                         "along that subspace, its orthogonal complement and a random direction are compared by the "
                         "area over eps of |confidence change|; the gap is high minus complement per sample (mean "
                         "with seeded bootstrap 95% interval)."))
    rows, shares, comps, panels = [], {}, {}, []
    cheader, crows = control_rows(run.reader, run.archs)
    for arch, phase in present:
        f = run.reader.fisher(arch, phase)
        share = np.asarray(f.get("eigen_share", np.zeros((0, 0))), dtype=np.float64)
        if share.size:
            shares[(arch, phase)] = share
        h = run.headline["fisher"].get(arch, {}).get(phase)
        if h is None:  # a commit newer than the stored headline numbers
            h = _headline_fisher(f, run)
        pert = f.get("perturbation", {})
        rows.append([arch, phase, str(h["n_spectra"]), fmt(h["top_share"]), fmt(h["mean_rank"], 2),
                     str(int(h["n_perturbed"])), fmt(h["area_high"]), fmt(h["area_complement"]),
                     fmt(h["area_random"]), interval(h["gap"], h["gap_lo"], h["gap_hi"]), fmt(h["wilcoxon_p"], 4),
                     fmt(h["kl_ratio"], 3)])
        if "components" in f:
            comps[(arch, phase)] = f["components"]
        if pert:
            panels.extend(_perturbation_panels(arch, phase, pert))
    s.blocks.append(Table("tbl-fisher", "iFIM per architecture and phase: mean top-eigenvalue share and numerical rank "
                          "over the spectrum samples; area over eps of |confidence change| inside the high-sensitivity "
                          "subspace, its complement and a random direction; the gap (high - complement, mean [95% "
                          "interval]: a consistency check, it holds for any differentiable classifier); Wilcoxon p of "
                          "high vs complement; measured KL over 1/2 d^T F d at the smallest eps",
                          ["architecture", "phase", "n spectra", "top share", "mean rank", "n perturbed",
                                  "area high", "area complement", "area random", "gap", "Wilcoxon p", "KL ratio"],
                          rows))
    if crows:
        s.blocks.append(Text(CONTROLS_TEXT))
        s.blocks.append(Table("tbl-fisher-controls", CONTROLS_CAPTION, cheader, crows))
    if shares:
        fig = figures.fisher_spectra(shares, [a for a in run.archs if any((a, st) in shares for st in PHASES)])
        s.blocks.append(figure("fig-spectra", "iFIM spectra: share of each eigenvalue in the trace, by index, mean "
                                "over samples with 95% band, TL and FT checkpoints.", fig))
    for arch in dict.fromkeys(a for a, _ in comps):
        crow = []
        for phase in PHASES:
            c = comps.get((arch, phase))
            if not c or "x_high" not in c:
                continue
            x_high = np.asarray(c["x_high"], dtype=np.float64)
            x = np.asarray(c.get("x", x_high), dtype=np.float64)
            x_low = np.asarray(c.get("x_low", x - x_high), dtype=np.float64)
            cids = strs(c.get("ids", np.arange(len(x))))
            k = np.asarray(c.get("k", [-1] * len(x))).reshape(-1)
            es = np.asarray(c.get("energy_share", [np.nan] * len(x)), dtype=np.float64).reshape(-1)
            n_show = min(len(x), run.cfg.report.n_examples if run.cfg is not None else 2, 4)
            for i in range(n_show):
                crow.append(figures.ComponentRow(f"{cids[i]} ({phase})\nk = {int(k[i])}, energy {fmt(es[i], 2)}",
                                                 _one_image(x[i]), _one_image(x_high[i]), _one_image(x_low[i])))
        if crow:
            s.blocks.append(figure(f"fig-components-{slug(arch)}", f"{arch}: input x, its high-sensitivity "
                                    "component x_high = V_k V_k^T x and the rest x_low, per checkpoint.",
                                    figures.component_panels(crow)))
    if panels:
        s.blocks.append(figure("fig-perturbation", "Perturbation curves: mean over samples with 95% band of the "
                                "|confidence change| and KL divergence against the relative size eps of equal-norm "
                                "perturbations (high-sensitivity subspace vs complement vs random), and of removing "
                                "alpha x_high vs an equal-norm piece of the complement.",
                                figures.curve_grid(panels, ncols=3)))
    return s


def _one_image(a: np.ndarray) -> np.ndarray:
    """(C, H, W) -> (H, W) by the channel mean; (H, W) unchanged."""
    return a.mean(0) if a.ndim == 3 else a


def _perturbation_panels(arch: str, phase: str, p: dict) -> list:
    from ..figures import CurvePanel

    out = []
    kinds = strs(p.get("kinds", []))
    valid = np.asarray(p.get("valid", []), dtype=bool).reshape(-1)

    def per_sample(key: str, kind_list: list[str]) -> dict[str, np.ndarray]:
        v = np.asarray(p[key], dtype=np.float64)  # (K, E, N, m)
        sel = valid if valid.size == v.shape[2] else np.ones(v.shape[2], dtype=bool)
        return {kind: v[j].mean(-1).T[sel] for j, kind in enumerate(kind_list)}

    eps = np.asarray(p.get("eps", []), dtype=np.float64).reshape(-1)
    title = f"{arch} {phase}"
    if "abs_logodds_change" in p and kinds and eps.size:
        out.append(CurvePanel(title, eps, "relative size eps = |d| / |x|", "|change of predicted-class log-odds|",
                              per_sample("abs_logodds_change", kinds), logx=True, logy=True))
    elif "abs_conf_change" in p and kinds and eps.size:
        out.append(CurvePanel(title, eps, "relative size eps = |d| / |x|", "|change of predicted-class p|",
                              per_sample("abs_conf_change", kinds), logx=True))
    if "kl" in p and kinds and eps.size:
        refs = {}
        if "kl_pred" in p and "high" in kinds:
            pred = per_sample("kl_pred", kinds)["high"]
            refs = {"1/2 d^T F d (high)": np.nanmean(pred, 0) if pred.size else np.full(eps.size, np.nan)}
        out.append(CurvePanel(title, eps, "relative size eps = |d| / |x|", "KL(p(x) || p(x + d)) (nats)",
                              per_sample("kl", kinds), refs, logx=True, logy=True))
    rkinds = strs(p.get("removal_kinds", []))
    alphas = np.asarray(p.get("alphas", []), dtype=np.float64).reshape(-1)
    if "removal_abs_conf_change" in p and rkinds and alphas.size:
        out.append(CurvePanel(f"{title}: removal", alphas, "removed fraction alpha of x_high (or equal norm)",
                              "|change of predicted-class p|", per_sample("removal_abs_conf_change", rkinds)))
    return out




CONTROLS_TEXT = (
    "What the perturbation experiment can show. Every direction outside span(G) leaves p unchanged to first order, "
    "so 'inside the high-sensitivity subspace moves the prediction more than its complement' holds for any "
    "differentiable classifier, trained or not: a consistency check. The claim that the top-k subspace is where "
    "this model is sensitive is tested against controls of equal norm: the top singular directions of the logit "
    "Jacobian J (not weighted by p), the gradient of log p_pred (the steepest single direction: no k-dimensional "
    "random direction can beat it), noise in the image's top CAM region, directions inside span(G) orthogonal to "
    "the top-k eigenvectors, and the same analysis of an untrained network of the same architecture (BatchNorm "
    "statistics of the data). Only eps whose KL ratio lies in [0.8, 1.25] are in the local regime the Fisher "
    "describes; the others measure finite-size effects.")
CONTROLS_CAPTION = (
    "iFIM outcomes per eps: median KL / (1/2 d^T F d) of the high kind and its regime; mean |change of the "
    "predicted-class log-odds| (from float64 logits) for each direction kind of equal norm; the strongest control "
    "and the Wilcoxon p (paired by image) of high vs it; prediction flips of the high kind and of the strongest "
    "control")


def control_rows(reader, archs) -> tuple[list[str], list[list[str]]]:
    """The controls table: header and one row per architecture, model (the phases and the untrained network,
    where archived) and eps, read from ``fisher/<arch>/<model>/perturbation``. Empty without the controls."""
    rows: list[list[str]] = []
    kinds: list[str] = []
    for arch in archs:
        for model in (*PHASES, "untrained"):
            path = f"fisher/{arch}/{model}/perturbation"
            if not reader.has(path):
                continue
            p = reader.read(path)
            if "curve_abs_logodds_change" not in p:
                continue
            kinds = strs(p["kinds"])
            eps = np.asarray(p["eps"], dtype=np.float64).reshape(-1)
            lo = np.asarray(p["curve_abs_logodds_change"], dtype=np.float64)
            flip = np.asarray(p["curve_flip"], dtype=np.float64)
            ratio = np.asarray(p["curve_kl_ratio"], dtype=np.float64)[kinds.index("high")]
            local = np.asarray(p["curve_local"], dtype=np.float64)[kinds.index("high")]
            controls = [k for k in kinds if k not in ("high", "complement", "random")]
            for e, ep in enumerate(eps):
                vals = {k: lo[j, e] for j, k in enumerate(kinds)}
                finite = [k for k in controls if np.isfinite(vals[k])]
                best = max(finite, key=lambda k: vals[k]) if finite else ""
                pv = np.asarray(p.get(f"summary_vs_{best}_pvalue", [np.nan] * eps.size), dtype=float) if best else []
                rows.append([arch, model, fmt(ep, 4), f"{fmt(ratio[e], 3)} ({'local' if local[e] else 'finite'})",
                             *(fmt(vals[k], 3) for k in kinds),
                             f"{best} (p {fmt(pv[e], 3)})" if best else "-",
                             f"{fmt(flip[kinds.index('high'), e])} / "
                             f"{fmt(flip[kinds.index(best), e]) if best else '-'}"])
    return ["architecture", "model", "eps", "KL ratio (regime)", *(f"|dL| {k}" for k in kinds),
            "strongest control (p)", "flips high / control"], rows


def _headline_fisher(f: dict, run: Run) -> dict:
    from ..headline import _fisher

    return _fisher(f, int(run.headline.get("n_boot", 1000)), int(run.headline.get("seed", 0)))


def sections(run: Run) -> list[Section]:
    return [_fisher(run)]
