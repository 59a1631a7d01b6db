"""Is the drift real? Two controls for every TL -> FT drift number.

**Seed replicas and systematic drift.** A training phase run again from the same starting point with another
training seed (batch order, dropout, augmentation) changes its maps without any change of phase. With the run's
fine-tuned model and R replicas (M = R + 1 fine-tuned models from the same transfer checkpoint), every pair among
them and every TL -> FT_r pair is scored, and the systematic drift S = mean_r d(TL, FT_r) - 1/2 mean_{r<s}
d(FT_r, FT_s) (:func:`drift.stats.systematic_drift`) separates the change of phase from retraining noise, on
instabilities that are squared Euclidean distances (:func:`drift.stats.euclidean_instability`). A drift/floor ratio
would not: with no systematic change at all, E d(TL, FT) = sigma^2 but E d(FT, FT') = 2 sigma^2, so pure seed noise
reads as "drift below its floor", and ranking on drift minus floor favours the noisiest architecture. The verdicts
(systematic drift beyond noise, architectures ranked on S, reversals with fine-tuning seeds resampled) come from
:mod:`drift.verdicts`, calibrated in docs/calibration.md. Each metric is also read as an *instability*
(:func:`instability`: 1 - value for overlaps and correlations, the value for displacements, |value| for
concentration changes) for the reversal tests.

**Randomisation check** (cascading model randomisation with nulls): :mod:`drift.randomisation`; this step
calls it (:func:`drift.randomisation.run_check`) and archives its result.

The pipeline's ``baselines`` step (:func:`run_step`) trains the replicas (archived and resumed like the run's own
models: ``replicas/<arch>/<phase>/seed<s>``), scores them, and judges systematic drift, rankings and reversals.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

import numpy as np
import torch

from . import attributions_step, randomisation, stats, verdicts
from .archive import ArchiveReader, Cell
from .attribution import normalize
from .drift_step import masks, pair_tree, sample_mask
from .h5tree import write_tree
from .maps import to_grid, upsample
from .metrics import DEFAULT_FRACTIONS, pair_metrics, stability
from .rundir import log
from .stats.systematic import euclidean_instability, euclidean_label, systematic_form

REPLICA_SEED_OFFSET = 1000
"""Replica ``r`` of a run with seed ``s`` trains with seed ``s + 1000 + r`` (unless ``baselines.replica_seeds``)."""

CHAIN_SEED_OFFSET = 2000
"""Chain ``r`` of a run with seed ``s`` trains both phases with seed ``s + 2000 + r`` (``baselines.chains``)."""


def chain_seeds(run_seed: int, n: int) -> list[int]:
    """The training seeds of the whole chains beside the run's own: ``run_seed + 2000 + r``, r < n."""
    return [run_seed + CHAIN_SEED_OFFSET + r for r in range(n)]


def replica_seeds(run_seed: int, n: int, explicit: Sequence[int] = ()) -> list[int]:
    """The training seeds of the seed replicas: ``explicit`` when given, else ``run_seed + 1000 + r``, r < n."""
    return [int(s) for s in explicit] if explicit else [run_seed + REPLICA_SEED_OFFSET + r for r in range(n)]


def instability(metric: str, values: np.ndarray, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> np.ndarray:
    """Per-image values of a drift metric as an instability (0 = identical maps, larger = more change).

    1 - v for metrics where higher is more stable (IoU, Pearson, Spearman, SSIM: all at most 1), |v| for the
    ``*_change`` metrics ranked on their size, v for displacements (directions from :func:`drift.metrics.stability`;
    ``fractions`` name the ``iou@XX`` keys). Non-finite values stay non-finite.
    """
    higher, absolute = stability(metric, fractions)
    v = np.asarray(values, dtype=np.float64)
    if absolute:
        return np.abs(v)
    return 1.0 - v if higher else v


# ---------------------------------------------------------------------------------------------- seed replicas
def systematic_arrays(raw_tl: np.ndarray, raw_ft: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Squared-Euclidean instabilities (:func:`drift.stats.euclidean_instability`) of per-image metric values.

    Args:
        raw_tl: (M, N) values of TL vs each fine-tuned model (NaN where not scored).
        raw_ft: (M, M, N) values between fine-tuned models (symmetric; the diagonal is not read).
        metric: the metric key.

    Returns:
        (d_tl (M, N), d_ft (M, M, N)) as :func:`drift.stats.systematic_drift` takes them (diagonal set to 0).
    """
    d_tl = euclidean_instability(metric, raw_tl)
    d_ft = euclidean_instability(metric, raw_ft)
    idx = np.arange(d_ft.shape[0])
    d_ft[idx, idx] = 0.0
    return d_tl, d_ft


def _masked(per: dict, metric: str, use: np.ndarray) -> np.ndarray:
    return np.where(use & per["valid"].astype(bool), np.asarray(per[metric], dtype=np.float64), np.nan)


def _replica_node(pipe, reader, arch: str, phase: str, cell: Cell, method: str, models: dict[str, np.ndarray],
                  fixed: np.ndarray, size, selected: np.ndarray) -> dict:
    """Every pair of one (cell, method): the fixed phase's maps vs each replica and every pair of replicated
    models, scored as the drift step scores TL vs FT, and per ranking metric the arrays of the estimator.

    ``models`` maps "run" and "seed<s>" to maps of the replicated phase; the run's own TL vs FT pair is the drift
    step's and is read from there. A replica trained with the run's own seed is the run's model again: it is
    scored (a reproducibility check) but left out of the estimator."""
    mcfg = pipe.cfg.metrics
    names = list(models)
    node: dict = {"models": json.dumps(names)}
    per = {"run": reader.drift(arch, method, cell)}
    for name in names[1:]:
        a, b = (fixed, models[name]) if phase == "finetune" else (models[name], fixed)
        node[f"fixed_vs_{name}"] = _pair(pipe, a, b, cell, size, selected)
        per[name] = node[f"fixed_vs_{name}"]["per_sample"]
    between = {}
    for i, x in enumerate(names):
        for y in names[i + 1:]:
            node[f"{x}_vs_{y}"] = _pair(pipe, models[x], models[y], cell, size, selected)
            between[x, y] = node[f"{x}_vs_{y}"]["per_sample"]
    est = [n for n in names if n != f"seed{pipe.cfg.run.seed}"]
    use = selected[:len(per["run"]["valid"])]
    sys_node = {}
    for metric in mcfg.ranking_metrics:
        raw_tl = np.stack([_masked(per[n], metric, use) for n in est])
        raw_ft = np.full((len(est), len(est), raw_tl.shape[1]), np.nan)
        for i, x in enumerate(est):
            for j, y in enumerate(est):
                if i != j:
                    key = (x, y) if (x, y) in between else (y, x)
                    raw_ft[i, j] = _masked(between[key], metric, use)
        d_tl, d_ft = systematic_arrays(raw_tl, raw_ft, metric)
        form = systematic_form(metric)
        res = stats.systematic_drift(d_tl, d_ft, per["run"]["labels"], min_per_class=mcfg.min_per_class, form=form)
        sys_node[metric.replace("/", "_")] = {"raw_tl": raw_tl, "raw_ft": raw_ft, "d_tl": d_tl, "d_ft": d_ft,
                                              "models": json.dumps(est), "instability": euclidean_label(metric),
                                              "form": form, **res.as_dict()}
    node["systematic"] = sys_node
    return node


def _seed_tree(pipe, arch: str, seeds: list[int], reader, size, selected: np.ndarray) -> dict:
    """``{phase: {layer: {score: {norm: {method: replica node}}}}}`` (:func:`_replica_node`) for every replicated
    phase: ``finetune`` replicas are compared with the run's TL maps, ``transfer`` replicas with its FT maps."""
    b = pipe.cfg.baselines
    tree: dict = {}
    for phase in b.phases:
        fixed_phase = "transfer" if phase == "finetune" else "finetune"
        targets = attributions_step.targets(pipe, arch, phase)
        reps = {s: attributions_step.cams(pipe, pipe.trained(arch, phase, s).model.eval(), targets,
                                          f"{arch} {phase} seed {s} CAMs") for s in seeds}
        for (layer, score), by_method in reps[seeds[0]].items():
            for method in by_method:
                models = {"run": reader.maps(arch, phase, method, layer, score),
                          **{f"seed{s}": reps[s][layer, score][method] for s in seeds}}
                fixed = reader.maps(arch, fixed_phase, method, layer, score)
                for mode in pipe.cfg.metrics.upsample:
                    for norm in pipe.cfg.metrics.normalize:
                        cell = Cell(layer, score, norm, mode)
                        node = (tree.setdefault(phase, {}).setdefault(layer, {}).setdefault(score, {})
                                .setdefault(cell.leaf, {}))
                        node[method] = _replica_node(pipe, reader, arch, phase, cell, method, models, fixed, size,
                                                     selected)
    return tree


# ---------------------------------------------------------------------------------------------- pipeline step
def run_step(pipe) -> None:
    """The pipeline's ``baselines`` step: seed replicas and their systematic-drift arrays per architecture, the
    randomisation check, and the verdicts on the replicas. A no-op when ``baselines.seeds`` (or ``replica_seeds``)
    and ``randomize`` are empty."""
    b = pipe.cfg.baselines
    seeds = replica_seeds(pipe.cfg.run.seed, b.seeds, b.replica_seeds)
    chains = chain_seeds(pipe.cfg.run.seed, b.chains)
    if not seeds and not b.randomize and not chains:
        return
    for arch in pipe.cfg.run.archs:
        name = f"baselines/arch/{arch}"
        if seeds:
            for phase in b.phases:
                for s in seeds:
                    pipe.trained(arch, phase, s)
        for s in chains:
            pipe.trained(arch, "chain", s)
        if pipe._todo(name, "baselines"):
            _arch_step(pipe, arch, seeds, name)
    if seeds and pipe._todo("baselines/ranking", "baselines"):  # one architecture too: its systematic verdict
        _ranking_step(pipe, seeds)
    if chains and pipe._todo("baselines/chains", "baselines"):
        _chains_step(pipe, chains)


def _pair(pipe, a: np.ndarray, b: np.ndarray, cell: Cell, size, selected: np.ndarray) -> dict:
    """Per-image pair metrics and summaries of raw maps ``a`` vs ``b`` in ``cell`` (its resampling and
    normalisation; as the drift step scores TL vs FT)."""
    n = len(a)
    ta, tb = torch.as_tensor(a), torch.as_tensor(b)
    found = masks(pipe, n)
    # Metrics at the layer's own grid (upsample = "none"): each mask cell weighs its fraction of mask pixels.
    lung, lesion, marker = (tuple(to_grid(mk, tuple(ta.shape[-2:])) for mk in found) if cell.upsample == "none"
                            else found)
    ua = normalize(upsample(ta, size, cell.upsample), cell.norm)
    ub = normalize(upsample(tb, size, cell.upsample), cell.norm)
    return pair_tree(pipe, ua, ub, lung, lesion, marker, selected[:n], n=n)


def _pair_values(pipe, a: np.ndarray, b: np.ndarray, cell: Cell, size) -> dict[str, np.ndarray]:
    """Per-image drift metrics of raw maps ``a`` vs ``b`` in ``cell``, as :func:`_pair` scores them but without
    the masks' metrics and the summaries (what the chains need): ``{metric: (n,), "valid": (n,) bool}``."""
    mcfg = pipe.cfg.metrics
    ua = normalize(upsample(torch.as_tensor(a), size, cell.upsample), cell.norm)
    ub = normalize(upsample(torch.as_tensor(b), size, cell.upsample), cell.norm)
    per = pair_metrics(ua, ub, fractions=tuple(mcfg.fractions), ties=mcfg.ties, small=True,
                       centroid_norm=mcfg.centroid_norm)
    return {k: v.cpu().numpy() for k, v in per.items()}


def _arch_step(pipe, arch: str, seeds: list[int], name: str) -> None:
    t0 = time.perf_counter()
    cfg, b = pipe.cfg, pipe.cfg.baselines
    mcfg = cfg.metrics
    reader = ArchiveReader(pipe.path)
    test = pipe.splits.test
    n = len(test)
    size = tuple(pipe.test_images([0]).shape[-2:])
    selected = sample_mask(pipe, arch, mcfg.sample_set)
    tree: dict = {}
    if seeds:
        tree["seeds"] = _seed_tree(pipe, arch, seeds, reader, size, selected)
    if b.randomize:
        tree["randomisation"] = randomisation.run_check(pipe, arch, reader, size)
    with pipe.archive.commit(name, replace=(name,), started=t0, **pipe._stamp("baselines")) as f:
        g = f.require_group(name)
        write_tree(g, tree)
        g.attrs.update({"seeds": json.dumps(seeds), "phases": json.dumps(list(b.phases) if seeds else []),
                        "randomize": json.dumps(list(b.randomize)), "flag_alpha": b.flag_alpha,
                        "flag_normalised": b.flag_normalised,
                        "n_images": min(b.n_images, n) if b.randomize else 0})
    pipe.timings[name] = time.perf_counter() - t0
    what = []
    if seeds:
        what.append(f"systematic drift from {len(seeds)} seed replica{'s' if len(seeds) != 1 else ''} x "
                    f"{len(b.phases)} phase{'s' if len(b.phases) != 1 else ''}")
    if b.randomize:
        fl = [f"{m} at {layer}" for layer, by_score in tree["randomisation"].items() if isinstance(by_score, dict)
              for by_method in by_score.values() for m, node in by_method.items() if node.get("flagged")]
        refused = sum(bool(r) for r in json.loads(tree["randomisation"]["refused"]))
        what.append(f"randomisation check at {len(b.randomize)} cuts"
                    + (f", {refused} refused (randomised output independent of the input)" if refused else "")
                    + (f" (flagged: {', '.join(fl)})" if fl else " (no method flagged)"))
    log(f"{arch}: {' and '.join(what)} in {pipe.timings[name]:.0f} s")


def _ranking_step(pipe, seeds: list[int]) -> None:
    """The verdicts on the replicas (:mod:`drift.verdicts`): systematic drift beyond seed noise and the ranking of
    architectures on it (primary cell), and the reversal between LayerCAM and Grad-CAM++ with fine-tuning seeds
    resampled (every cell), on the statistics step's ranking sample."""
    from .stats_step import archive_accuracy, archive_agreement

    t0 = time.perf_counter()
    cfg, b, mcfg, a = pipe.cfg, pipe.cfg.baselines, pipe.cfg.metrics, pipe.cfg.attribution
    reader = ArchiveReader(pipe.path)
    archs = [x for x in cfg.run.archs if reader.has(f"drift/{x}") and reader.has(f"baselines/arch/{x}/seeds")]
    ranked = sample_mask(pipe, archs[0], mcfg.ranking_sample_set)
    labels = pipe.splits.test.labels
    primary = reader.primary_cell()
    kw = {"labels": labels, "min_per_class": mcfg.min_per_class}
    tree: dict = {}
    sentences: list[str] = []
    for phase in b.phases:
        nodes = {(arch, cell.key, method): reader.read(f"baselines/arch/{arch}/seeds/{phase}/{cell.key}/{method}"
                                                       "/systematic")
                 for arch in archs for cell in reader.cells() for method in a.methods
                 if reader.has(f"baselines/arch/{arch}/seeds/{phase}/{cell.key}/{method}/systematic")}
        metrics = [m for m in mcfg.ranking_metrics]
        entries, by_arch = {}, {}
        for (arch, key, method), node in nodes.items():
            if key != primary.key:
                continue
            for metric in metrics:
                n = node[metric.replace("/", "_")]
                entries[arch, method, metric] = (n["d_tl"], n["d_ft"])
                on_ranked = (np.where(ranked, n["d_tl"], np.nan), np.where(ranked, n["d_ft"], np.nan))
                by_arch.setdefault((method, metric), {})[arch] = on_ranked
        sysj = verdicts.judge_systematic(entries, **kw)
        rk = verdicts.judge_ranking(by_arch, **kw)
        out = {"systematic": verdicts.nested(sysj["results"]), "ranking": verdicts.nested(rk["results"])}
        said = [f"{phase} replicas ({len(seeds)}, {primary}):", sysj["sentence"], rk["sentence"]]
        if phase == "finetune" and len(archs) > 1:  # a reversal orders two architectures or more
            grid: dict = {}
            for (arch, key, method), node in nodes.items():
                for metric in metrics:
                    raw = node[metric.replace("/", "_")]["raw_tl"]
                    grid.setdefault(key, {}).setdefault(metric, {}).setdefault(arch, {})[method] = np.where(
                        ranked, instability(metric, raw, mcfg.fractions), np.nan)
            rev = verdicts.judge_reversals(grid, a.methods, agreement=archive_agreement(reader, archs, ranked),
                                           accuracy=archive_accuracy(reader, archs), **kw)
            out["reversal"] = verdicts.reversal_table(rev["tests"])
            said.append(rev["sentence"])
        tree[phase] = out
        sentences.append(" ".join(x for x in said if x))
    verdict = " ".join(sentences)
    with pipe.archive.commit("baselines/ranking", replace=("baselines/ranking",), started=t0,
                            **pipe._stamp("baselines")) as f:
        g = f.require_group("baselines/ranking")
        write_tree(g, tree)
        g.attrs.update({"verdict": verdict, "seeds": json.dumps(seeds), "phases": json.dumps(list(b.phases)),
                        "n_ranked": int(ranked.sum()), "ranking_sample_set": mcfg.ranking_sample_set,
                        "alpha": verdicts.ALPHA})
    log(f"baselines: {verdict}")


def _chains_step(pipe, chains: list[int]) -> None:
    """Whole chains (the run's own and ``chains``) in the primary cell: every pair of the 2R models scored, the
    energy test per architecture, and per chain the most stable architecture under each method
    (:func:`drift.verdicts.judge_chains`)."""
    t0 = time.perf_counter()
    cfg, mcfg, a = pipe.cfg, pipe.cfg.metrics, pipe.cfg.attribution
    reader = ArchiveReader(pipe.path)
    cell = reader.primary_cell()
    size = tuple(pipe.test_images([0]).shape[-2:])
    ranked = sample_mask(pipe, cfg.run.archs[0], mcfg.ranking_sample_set)
    n_test = len(pipe.splits.test)
    r = len(chains) + 1
    entries, tops, tree = {}, {}, {}
    for arch in cfg.run.archs:
        maps: dict[str, list[dict[str, np.ndarray]]] = {"transfer": [], "finetune": []}
        for phase in maps:
            tgt = attributions_step.targets(pipe, arch, phase)
            maps[phase].append({m: reader.maps(arch, phase, m, cell.layer, cell.score) for m in a.methods})
            for s in chains:
                model = pipe.trained(arch, "transfer" if phase == "transfer" else "chain", s).model.eval()
                got = attributions_step.cams(pipe, model, tgt, f"{arch} chain {s} {phase} CAMs")
                maps[phase].append(got[cell.layer, cell.score])
        for method in a.methods:
            tl = [m[method] for m in maps["transfer"]]
            ft = [m[method] for m in maps["finetune"]]
            raw = {k: {key: np.full((r, r, n_test), np.nan) for key in ("tt", "ff", "tf")}
                   for k in mcfg.ranking_metrics}
            for i in range(r):
                for j in range(r):
                    todo = [("tf", tl[i], ft[j])] + ([("tt", tl[i], tl[j]), ("ff", ft[i], ft[j])] if i < j else [])
                    for key, x, y in todo:
                        per = _pair_values(pipe, x, y, cell, size)
                        for metric in mcfg.ranking_metrics:
                            v = _masked(per, metric, ranked)
                            raw[metric][key][i, j] = v
                            if key != "tf":
                                raw[metric][key][j, i] = v
            node = tree.setdefault(arch, {}).setdefault(method, {})
            for metric, by in raw.items():
                d = {k: euclidean_instability(metric, v) for k, v in by.items()}
                entries[arch, method, metric] = (d["tt"], d["ff"], d["tf"])
                own = instability(metric, np.stack([by["tf"][i, i] for i in range(r)]), mcfg.fractions)
                tops.setdefault(metric, {}).setdefault(method, {})[arch] = np.nanmean(own, axis=1)
                node[metric.replace("/", "_")] = {**{f"raw_{k}": v for k, v in by.items()},
                                                  "instability": euclidean_label(metric)}
    top = {metric: {method: [min(by, key=lambda x, i=i: by[x][i]) for i in range(r)]
                    for method, by in by_method.items()} for metric, by_method in tops.items()}
    res = verdicts.judge_chains(entries, a.methods, top)
    with pipe.archive.commit("baselines/chains", replace=("baselines/chains",), started=t0,
                            **pipe._stamp("baselines")) as f:
        g = f.require_group("baselines/chains")
        write_tree(g, {"pairs": tree, "energy": res["results"],
                       "tops": {m: {me: json.dumps(v) for me, v in bm.items()} for m, bm in top.items()}})
        g.attrs.update({"verdict": res["sentence"], "chains": json.dumps([cfg.run.seed, *chains]), "cell": cell.key,
                        "alpha": verdicts.ALPHA})
    log(f"baselines: {res['sentence']}")
