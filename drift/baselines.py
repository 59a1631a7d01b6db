"""Is the drift real? Two controls for every TL -> FT drift number.

**Seed floor.** A training phase run again from the same starting point with another training seed (batch order,
dropout, augmentation) changes its maps without any change of phase. The drift metrics between the run's model and
such a replica of the *same* phase (FT vs FT', TL vs TL') are the floor below which a TL -> FT drift is
indistinguishable from training noise. Each metric is read as an *instability* (:func:`instability`: 1 - value for
the overlaps and correlations, the value for displacements, |value| for concentration changes), so that drift,
floor, their ratio and their difference read the same way for every metric.

**Randomisation check** (cascading model randomisation with nulls): :mod:`drift.randomisation`; this step
calls it (:func:`drift.randomisation.run_check`) and archives its result.

The pipeline's ``baselines`` step (:func:`run_step`) trains the replicas (archived and resumed like the run's own
models: ``replicas/<arch>/<phase>/seed<s>``), scores them, and ranks architectures by drift minus floor.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from . import attributions_step, randomisation, stats
from .archive import ArchiveReader, Cell
from .attribution import normalize, upsample
from .drift_step import masks, pair_tree, sample_mask
from .h5tree import as_tree, write_tree
from .headline import judged_pairs
from .metrics import DEFAULT_FRACTIONS, stability
from .rundir import log

REPLICA_SEED_OFFSET = 1000
"""Replica ``r`` of a run with seed ``s`` trains with seed ``s + 1000 + r`` (unless ``baselines.replica_seeds``)."""


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


# ---------------------------------------------------------------------------------------------- floors
def _drift_and_floor(drift: np.ndarray, floors: Sequence[np.ndarray], metric: str,
                     fractions: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per-image instabilities of the drift and of the floor (the mean over the replicas)."""
    return (instability(metric, drift, fractions),
            np.mean([instability(metric, x, fractions) for x in floors], axis=0))


def replica_values(replicas: Sequence[dict], metric: str) -> list[np.ndarray]:
    """A metric's per-image values of each replica (``per_sample`` trees), NaN where a replica's map pair is
    degenerate."""
    return [np.where(r["valid"].astype(bool), r[metric], np.nan) for r in replicas]


def against_floor(drift: np.ndarray, floors: Sequence[np.ndarray], metric: str, use: np.ndarray, labels: np.ndarray,
                  n_classes: int, n_boot: int, seed: int, min_per_class: int,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict:
    """TL -> FT drift beside its seed floor, for one metric (per-image values, as the metric gives them).

    The floor of an image is the mean instability over the replicas. Over the images in ``use`` with finite
    drift and floor: the macro means (:func:`drift.stats.aggregate`) of the drift's instability, of the floor and of
    their per-image difference (with bootstrap intervals), and ``ratio`` = drift mean / floor mean (inf when the
    floor is 0 and the drift is not, NaN when both are 0).
    """
    d, f = _drift_and_floor(drift, floors, metric, fractions)
    ok = use & np.isfinite(d) & np.isfinite(f)
    agg = {}
    for key, v in (("drift", d), ("floor", f), ("excess", d - f)):
        agg[key] = stats.aggregate(np.where(ok, v, np.nan), labels, n_classes, n_boot, seed,
                                   min_per_class=min_per_class)
    dm, fm = agg["drift"].mean, agg["floor"].mean
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = float(np.float64(dm) / np.float64(fm)) if math.isfinite(dm) and math.isfinite(fm) else math.nan
    return {"ratio": ratio, "n": int(ok.sum()), **{k: a for k, a in agg.items()}}


def excess_values(drift: np.ndarray, floors: Sequence[np.ndarray], metric: str, use: np.ndarray,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS) -> np.ndarray:
    """Per-image drift minus floor as instabilities (NaN outside ``use``): what :func:`floor_verdict` ranks."""
    d, f = _drift_and_floor(drift, floors, metric, fractions)
    return np.where(use & np.isfinite(d) & np.isfinite(f), d - f, np.nan)


def floor_verdict(raw: dict, corrected: dict, ratios: dict, methods: Sequence[str], phase: str, n_seeds: int,
                  cell: str) -> str:
    """One sentence: does the reversal between LayerCAM and Grad-CAM++ exceed the seed noise?

    Args:
        raw: ``{metric: rank reversal tree}`` of the TL -> FT drift in the cell (the statistics step's).
        corrected: ``{metric: rank reversal tree}`` of drift minus floor in the same cell and sample.
        ratios: ``{metric: [drift / floor ratio of every (arch, method)]}``.
        methods, phase, n_seeds, cell: what the sentence names.
    """
    pairs, _ = judged_pairs(list(methods))
    parts = []
    for metric, rr in raw.items():
        r = np.asarray(ratios.get(metric, []), dtype=np.float64)
        r = r[np.isfinite(r)]
        span = f"drift/floor {r.min():.2g}-{r.max():.2g}x" if r.size else "drift/floor undefined"
        rev = [p for p in pairs if rr.get("reverses", {}).get(p)]
        if "unranked" in rr or "unranked" in corrected.get(metric, {}):
            parts.append(f"by {metric} ({span}) not ranked")
        elif not rev:
            parts.append(f"by {metric} ({span}) no reversal to test")
        else:
            cr = corrected.get(metric, {})
            kept = [p for p in rev if cr.get("reverses", {}).get(p)]
            if kept:
                p_rev = ", ".join(f"{cr.get('p_reverse', {}).get(p, math.nan):.2f}" for p in kept)
                parts.append(f"by {metric} ({span}) the reversal exceeds the seed noise (it persists on drift "
                             f"minus floor, P {p_rev})")
            else:
                parts.append(f"by {metric} ({span}) the reversal does not survive the seed floor")
    if not parts:
        return f"Seed floor ({phase}, {n_seeds} replicas, {cell}): no ranking metric to judge"
    return f"Seed floor ({phase}, {n_seeds} replica{'s' if n_seeds != 1 else ''}, {cell}): " + "; ".join(parts) + "."


# ---------------------------------------------------------------------------------------------- pipeline step
def run_step(pipe) -> None:
    """The pipeline's ``baselines`` step: seed replicas and floors per architecture, the randomisation check, and
    the floor-corrected ranking. A no-op when ``baselines.seeds`` (or ``replica_seeds``) and ``randomize`` are
    empty."""
    b = pipe.cfg.baselines
    seeds = replica_seeds(pipe.cfg.run.seed, b.seeds, b.replica_seeds)
    if not seeds and not b.randomize:
        return
    for arch in pipe.cfg.run.archs:
        name = f"baselines/arch/{arch}"
        if seeds:
            for phase in b.phases:
                for s in seeds:
                    pipe.trained(arch, phase, s)
        if pipe._todo(name, "baselines"):
            _arch_step(pipe, arch, seeds, name)
    if seeds and len(pipe.cfg.run.archs) > 1 and pipe._todo("baselines/ranking", "baselines"):
        _ranking_step(pipe, seeds)


def _pair(pipe, a: np.ndarray, b: np.ndarray, norm: str, size, selected: np.ndarray) -> dict:
    """Per-image pair metrics and summaries of maps ``a`` vs ``b`` (as the drift step scores TL vs FT)."""
    n = len(a)
    lung, lesion, marker = masks(pipe, n)
    ua = normalize(upsample(torch.as_tensor(a), size), norm)
    ub = normalize(upsample(torch.as_tensor(b), size), norm)
    return pair_tree(pipe, ua, ub, lung, lesion, marker, selected[:n], n=n)


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
        floor: dict = {}
        for phase in b.phases:
            targets = attributions_step.targets(pipe, arch, phase)
            for s in seeds:
                rep = attributions_step.cams(pipe, pipe.trained(arch, phase, s).model.eval(), targets,
                                             f"{arch} {phase} seed {s} CAMs")
                for (layer, score), by_method in rep.items():
                    for method, maps in by_method.items():
                        own = reader.maps(arch, phase, method, layer, score)
                        for norm in mcfg.normalize:
                            node = (floor.setdefault(phase, {}).setdefault(layer, {}).setdefault(score, {})
                                    .setdefault(norm, {}).setdefault(method, {}))
                            node[f"seed{s}"] = _pair(pipe, own, maps, norm, size, selected)
        # drift beside floor, per phase / cell / method / ranking metric
        for by_layer in floor.values():
            for layer, by_score in by_layer.items():
                for score, by_norm in by_score.items():
                    for norm, by_method in by_norm.items():
                        cell = Cell(layer, score, norm)
                        for method, reps in by_method.items():
                            per = reader.drift(arch, method, cell)
                            use = per["selected"].astype(bool) & per["valid"].astype(bool)
                            comp = {}
                            replicas = [r["per_sample"] for r in reps.values()]
                            for metric in mcfg.ranking_metrics:
                                res = against_floor(per[metric], replica_values(replicas, metric), metric, use,
                                                    per["labels"], len(pipe.class_names), mcfg.n_boot, cfg.run.seed,
                                                    mcfg.min_per_class, mcfg.fractions)
                                comp[metric.replace("/", "_")] = as_tree(res)
                            reps["against"] = comp
        tree["floor"] = floor
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
        what.append(f"seed floors of {len(seeds)} replica{'s' if len(seeds) != 1 else ''} x {len(b.phases)} "
                    f"phase{'s' if len(b.phases) != 1 else ''}")
    if b.randomize:
        fl = [f"{m} at {layer}" for layer, by_score in tree["randomisation"].items() if isinstance(by_score, dict)
              for by_method in by_score.values() for m, node in by_method.items() if node.get("flagged")]
        refused = sum(bool(r) for r in json.loads(tree["randomisation"]["refused"]))
        what.append(f"randomisation check at {len(b.randomize)} cuts"
                    + (f", {refused} refused (randomised output independent of the input)" if refused else "")
                    + (f" (flagged: {', '.join(fl)})" if fl else " (no method flagged)"))
    log(f"{arch}: {' and '.join(what)} in {pipe.timings[name]:.0f} s")


def _ranking_step(pipe, seeds: list[int]) -> None:
    """Rank architectures by drift minus floor in every cell, on the statistics step's sample, and say whether
    the reversal between LayerCAM and Grad-CAM++ survives the floor."""
    t0 = time.perf_counter()
    cfg, b, mcfg, a = pipe.cfg, pipe.cfg.baselines, pipe.cfg.metrics, pipe.cfg.attribution
    reader = ArchiveReader(pipe.path)
    archs = [x for x in cfg.run.archs if reader.has(f"drift/{x}") and reader.has(f"baselines/arch/{x}")]
    ranked = sample_mask(pipe, archs[0], mcfg.ranking_sample_set)
    n_classes = len(pipe.class_names)
    tree: dict = {}
    verdicts = []
    for phase in b.phases:
        for layer in a.layers:
            for score in a.scores:
                for norm in mcfg.normalize:
                    cell = Cell(layer, score, norm)
                    out = tree.setdefault(phase, {}).setdefault(layer, {}).setdefault(score, {}).setdefault(norm, {})
                    ratios: dict[str, list[float]] = {}
                    # Every (arch, method)'s drift, replicas and comparison, read once for all ranking metrics.
                    stored = {}
                    for arch in archs:
                        base = f"baselines/arch/{arch}/floor/{phase}/{cell.key}"
                        for method in a.methods:
                            stored[arch, method] = (reader.drift(arch, method, cell),
                                                    [reader.read(f"{base}/{method}/seed{s}/per_sample")
                                                     for s in seeds],
                                                    reader.read(f"{base}/{method}/against"))
                    for metric in mcfg.ranking_metrics:
                        values: dict = {arch: {} for arch in archs}
                        for (arch, method), (per, replicas, against) in stored.items():
                            use = ranked & per["valid"].astype(bool)
                            values[arch][method] = (excess_values(per[metric], replica_values(replicas, metric),
                                                                  metric, use, mcfg.fractions), per["labels"])
                            ratios.setdefault(metric, []).append(
                                float(against.get(metric.replace("/", "_"), {}).get("ratio", math.nan)))
                        try:
                            rr = stats.rank_reversal(values, n_classes, higher_is_stable=False, n_boot=mcfg.n_boot,
                                                     seed=cfg.run.seed, min_per_class=mcfg.min_per_class)
                            out[metric.replace("/", "_")] = as_tree(rr)
                        except ValueError as exc:
                            warnings.warn(f"ranking by {metric} minus its floor in cell ({cell}): {exc}", stacklevel=2)
                            out[metric.replace("/", "_")] = {"unranked": str(exc)}
                    if (layer, score, norm) == (a.layers[0], a.scores[0], mcfg.normalize[0]):
                        raw = reader.ranking(cell)
                        verdicts.append(floor_verdict(raw, out, ratios, a.methods, phase, len(seeds), str(cell)))
    verdict = " ".join(verdicts)
    with pipe.archive.commit("baselines/ranking", replace=("baselines/ranking",), started=t0,
                            **pipe._stamp("baselines")) as f:
        g = f.require_group("baselines/ranking")
        write_tree(g, tree)
        g.attrs.update({"verdict": verdict, "seeds": json.dumps(seeds), "phases": json.dumps(list(b.phases)),
                        "n_ranked": int(ranked.sum()), "ranking_sample_set": mcfg.ranking_sample_set})
    log(f"baselines: {verdict}")
