"""Calibration of every verdict on simulated studies with known answers (``drift calibrate``).

A simulated study draws attribution maps for A architectures, two methods (Grad-CAM++ and LayerCAM), a transfer
checkpoint and M fine-tuned models per architecture (the run's and R = M - 1 seed replicas), on N images; it scores
them with drift's own metric functions (:func:`drift.metrics.metric_spec`), after drift's own normalisations, and
hands the per-image values to the functions that judge archives (:mod:`drift.verdicts`), exactly as the pipeline
does. Known answers make every printed claim either true or false, so the share of simulated studies in which a
verdict makes a false claim is its false-positive rate, and the share in which it finds a planted effect its power.

The map model (log intensities on an S x S grid, maps = exp): an image's anatomy (a smooth random field shared by
every model and method), a base pattern (the same for every architecture), a method pattern, a planted TL -> FT
change (a smooth field per architecture and method, scaled to the scenario's size), and seed noise: a model-level
field shared by every image of one fine-tuned model (what makes replicas differ as a whole) plus image-level noise,
each method with its own share. Transfer checkpoints carry no seed noise of their own except in the chain
scenario: the verdicts on replicas are conditional on each architecture's transfer checkpoint, and so is their null.

Scenarios (:data:`SCENARIOS`): ``null`` (exchangeable architectures and methods, FT = TL + seed noise),
``checkpoint-null`` (no seed noise at the model level, one fine-tuned model: the null of the checkpoint-level
reversal verdict), ``drift`` (a planted systematic change of the same size for every architecture), ``interaction``
(a planted architecture x method interaction: architecture 0 changes under LayerCAM only, architecture 1 under
Grad-CAM++ only), ``unequal-noise`` (equal systematic change, seed noise 0.5x / 1x / 2x), ``chains-null`` and
``chains-drift`` (whole chains, TL and FT both noisy).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .maps import normalize
from .metrics import metric_spec
from .stats.systematic import euclidean_instability
from .verdicts import ALPHA, judge_chains, judge_ranking, judge_reversals, judge_systematic

METHODS = ("gradcam++", "layercam")
METRICS = ("iou@20", "centroid_shift", "pearson")
NORMS = ("minmax", "sum")
_METRIC_FNS = {k: metric_spec(k).fn for k in METRICS}


@dataclass(frozen=True)
class Scenario:
    """One simulated study design with its known answers.

    Attributes:
        name, text: key and description.
        drift: planted TL -> FT change per architecture (size of the log-intensity field), or a dict
            ``{(arch, method): size}``.
        noise: seed-noise scale per architecture.
        model_share: share of the seed noise's variance shared by all images of one model.
        m: fine-tuned models per architecture (the run's and replicas).
        chains: whole chains (0: the replica design).
        truth: which claims are true: ``systematic`` (S > 0 for every entry), ``ranking`` (some architecture
            drifts less), ``reversal`` (a reversal exists), ``chains`` (TL and FT differ).
    """

    name: str
    text: str
    drift: tuple[float, ...] | dict = (0.0, 0.0, 0.0)
    noise: tuple[float, ...] = (1.0, 1.0, 1.0)
    model_share: float = 0.5
    m: int = 3
    chains: int = 0
    truth: dict = field(default_factory=dict)

    def verdicts(self) -> tuple[str, ...]:
        """The verdicts a study of this scenario judges."""
        if self.chains:
            return ("chains",)
        return ("reversal", "systematic", "ranking") if self.m >= 3 else ("reversal",)


SCENARIOS = (
    Scenario("null", "exchangeable architectures and methods, FT = TL + seed noise", truth={}),
    Scenario("checkpoint-null", "no model-level seed noise, one fine-tuned model per architecture", model_share=0.0,
             m=1, truth={}),
    Scenario("drift", "planted systematic change of equal size for every architecture", drift=(0.6, 0.6, 0.6),
             truth={"systematic": True}),
    Scenario("interaction", "planted architecture x method interaction (arch 0 changes under LayerCAM only, arch 1 "
             "under Grad-CAM++ only)", drift={(0, "layercam"): 0.9, (1, "gradcam++"): 0.9}, model_share=0.3,
             truth={"reversal": True, "systematic": None, "ranking": None}),
    Scenario("unequal-noise", "equal systematic change, seed noise 0.5x / 1x / 2x", drift=(0.6, 0.6, 0.6),
             noise=(0.5, 1.0, 2.0), truth={"systematic": True}),
    Scenario("chains-null", "whole chains, TL and FT equally distributed over seeds", m=1, chains=8, truth={}),
    Scenario("chains-drift", "whole chains with a planted TL -> FT change", drift=(0.8, 0.8, 0.8), m=1, chains=8,
             truth={"chains": True}),
)


def _field(rng: np.random.Generator, shape: tuple, side: int, smooth: int = 3) -> np.ndarray:
    """Smooth random fields (..., side, side) with unit variance: white noise blurred by a box of ``smooth``."""
    x = rng.standard_normal((*shape, side + smooth - 1, side + smooth - 1))
    c = np.cumsum(np.cumsum(x, -1), -2)
    c = np.pad(c, [(0, 0)] * len(shape) + [(1, 0), (1, 0)])
    k = smooth
    box = c[..., k:, k:] - c[..., :-k, k:] - c[..., k:, :-k] + c[..., :-k, :-k]
    return box / k


class Study:
    """One simulated study of a scenario: maps drawn, scored and judged (see the module docstring)."""

    def __init__(self, sc: Scenario, n: int, side: int, rng: np.random.Generator):
        self.sc, self.n, self.side, self.rng = sc, n, side, rng
        self.archs = [f"arch{i}" for i in range(len(sc.noise))]
        self.labels = np.arange(n) % 5

    def _size(self, a: int, method: str) -> float:
        d = self.sc.drift
        return float(d.get((a, method), 0.0)) if isinstance(d, dict) else float(d[a])

    def draw(self) -> dict:
        """{(arch index, method): {"tl": (T, N, S, S), "ft": (F, N, S, S)}} maps as torch tensors; T = 1 except
        for chains (T = F = number of chains)."""
        sc, n, s, rng = self.sc, self.n, self.side, self.rng
        anatomy = _field(rng, (n,), s)
        method_pat = {m: 0.4 * _field(rng, (), s) for m in METHODS}
        f = max(sc.m, sc.chains)
        out = {}
        # One base pattern for every architecture: they differ only by the planted change and the seed noise, so
        # that "equal systematic change" holds in every metric's representation too (with a pattern per
        # architecture, a nonlinear metric such as the centroid turns one log-intensity change into unequal ones).
        arch_pat = 0.4 * _field(rng, (), s)
        for a, noise in enumerate(sc.noise):
            shift_dir = _field(rng, (), s)  # the planted change's direction, shared by the methods
            # model-level seed noise: one field per model shared by its images; common to both methods in part
            mod = _field(rng, (f,), s)
            tl_mod = _field(rng, (f,), s)
            for method in METHODS:
                own_mod = _field(rng, (f,), s)
                common = anatomy + arch_pat + method_pat[method]
                sd_mod = noise * math.sqrt(sc.model_share)
                sd_img = noise * math.sqrt(1 - sc.model_share)
                model_noise = sd_mod * (0.7 * mod + 0.714 * own_mod)[:, None]
                img_noise = sd_img * _field(rng, (f, n), s)
                ft = common[None] + self._size(a, method) * shift_dir + model_noise + img_noise
                if sc.chains:
                    tl_noise = sd_mod * (0.7 * tl_mod + 0.714 * _field(rng, (f,), s))[:, None] + \
                        sd_img * _field(rng, (f, n), s)
                    tl = common[None] + tl_noise
                else:
                    tl = common[None]
                out[a, method] = {"tl": torch.from_numpy(np.exp(tl)), "ft": torch.from_numpy(np.exp(ft))}
        return out

    @staticmethod
    def _scores(pairs: list[tuple[torch.Tensor, torch.Tensor]], norm: str) -> dict[str, np.ndarray]:
        """Every metric of a list of map stacks ((B, S, S), (B, S, S)), scored in one batch: {metric: (P, B)}."""
        xa = normalize(torch.cat([a for a, _ in pairs]), norm)
        ya = normalize(torch.cat([b for _, b in pairs]), norm)
        b = pairs[0][0].shape[0]
        return {k: _METRIC_FNS[k](xa, ya).double().numpy().reshape(len(pairs), b) for k in METRICS}

    def judge(self) -> dict:
        """Every verdict on one draw: ``{verdict: {"claims": bool, "truth": bool | None}}``."""
        from .baselines import instability

        maps = self.draw()
        sc = self.sc
        out = {}
        if sc.chains:
            r = sc.chains
            entries, tops = {}, {}
            idx = [(i, j) for i in range(r) for j in range(r)]
            upper = [(i, j) for i, j in idx if i < j]
            for (a, method), mm in maps.items():
                tt = self._scores([(mm["tl"][i], mm["tl"][j]) for i, j in upper], NORMS[0])
                ff = self._scores([(mm["ft"][i], mm["ft"][j]) for i, j in upper], NORMS[0])
                tf = self._scores([(mm["tl"][i], mm["ft"][j]) for i, j in idx], NORMS[0])
                for metric in METRICS:
                    d = {"tf": tf[metric].reshape(r, r, self.n)}
                    for key, v in (("tt", tt), ("ff", ff)):
                        d[key] = np.zeros((r, r, self.n))
                        for q, (i, j) in enumerate(upper):
                            d[key][i, j] = d[key][j, i] = v[metric][q]
                    entries[self.archs[a], method, metric] = tuple(euclidean_instability(metric, d[k])
                                                                  for k in ("tt", "ff", "tf"))
                    diag = instability(metric, np.stack([d["tf"][i, i] for i in range(r)]))
                    tops.setdefault(metric, {}).setdefault(method, {})[self.archs[a]] = np.nanmean(diag, 1)
            top = {m: {me: [min(by, key=lambda x: by[x][i]) for i in range(r)] for me, by in bm.items()}
                   for m, bm in tops.items()}
            res = judge_chains(entries, METHODS, top)
            out["chains"] = {"claims": any(d["different"] for d in res["results"].values()),
                             "truth": bool(sc.truth.get("chains", False))}
            return out
        m = sc.m
        grid: dict = {}
        sys_entries: dict = {}
        by_arch: dict = {}
        keys = list(maps)
        ft_pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
        for norm in NORMS:
            cell = f"last/logit/{norm}"
            d_tl = self._scores([(maps[k]["tl"][0], maps[k]["ft"][r]) for k in keys for r in range(m)], norm)
            d_ft = (self._scores([(maps[k]["ft"][i], maps[k]["ft"][j]) for k in keys for i, j in ft_pairs], norm)
                    if norm == NORMS[0] and ft_pairs else None)
            for e, (a, method) in enumerate(keys):
                arch = self.archs[a]
                for metric in METRICS:
                    tl = d_tl[metric][e * m:(e + 1) * m]
                    grid.setdefault(cell, {}).setdefault(metric, {}).setdefault(arch, {})[method] = \
                        instability(metric, tl)
                    if d_ft is None or m < 3:
                        continue
                    ft = np.zeros((m, m, self.n))
                    for q, (i, j) in enumerate(ft_pairs):
                        ft[i, j] = ft[j, i] = d_ft[metric][e * len(ft_pairs) + q]
                    pair = (euclidean_instability(metric, tl), euclidean_instability(metric, ft))
                    sys_entries[arch, method, metric] = pair
                    by_arch.setdefault((method, metric), {})[arch] = pair
        rev = judge_reversals(grid, METHODS, self.labels)
        out["reversal"] = {"claims": any(r["supported"] for r in rev["tests"]),
                           "truth": sc.truth.get("reversal", False)}
        if m >= 3:
            sysj = judge_systematic(sys_entries, self.labels)
            out["systematic"] = {"claims": any(d["beyond"] for d in sysj["results"].values()),
                                 "truth": sc.truth.get("systematic", False)}
            rk = judge_ranking(by_arch, self.labels)
            out["ranking"] = {"claims": any(d["claim"] for d in rk["results"].values()),
                              "truth": sc.truth.get("ranking", False)}
        return out


@dataclass
class Rate:
    hits: int = 0
    total: int = 0

    @property
    def rate(self) -> float:
        return self.hits / self.total if self.total else math.nan

    @property
    def se(self) -> float:
        p = self.rate
        return math.sqrt(p * (1 - p) / self.total) if self.total else math.nan


def _chunk(task: tuple) -> dict[str, tuple[int, int]]:
    """Studies of one scenario from one seed sequence: ``{verdict: (claims, studies)}``."""
    name, n, n_images, side, seq = task
    sc = next(s for s in SCENARIOS if s.name == name)
    rng = np.random.default_rng(seq)
    out: dict[str, list] = {}
    for _ in range(n):
        for verdict, r in Study(sc, n_images, side, rng).judge().items():
            acc = out.setdefault(verdict, [0, 0])
            acc[0] += bool(r["claims"])
            acc[1] += 1
    return {k: tuple(v) for k, v in out.items()}


def run(n_studies: int = 200, n_images: int = 40, side: int = 16, seed: int = 0,
        scenarios: tuple[Scenario, ...] = SCENARIOS, workers: int = 1, chunk: int = 20,
        chain_studies: int | None = None) -> dict:
    """Simulate ``n_studies`` studies per scenario (``chain_studies`` for the chain scenarios) and count each
    verdict's claims.

    Studies run in chunks of ``chunk``, each from its own child of ``numpy.random.SeedSequence([seed, scenario
    index])``, so the result does not depend on ``workers`` (processes; 1 = this process).

    Returns:
        ``{scenario name: {"rates": {verdict: Rate}, "scenario": Scenario}}``: under a scenario where a verdict's
        claim is false (truth False) the rate is its false-positive rate; where it is true, its power; ``truth
        None`` (a claim that may hold either way, e.g. the systematic drift of the interaction scenario) is reported
        without a reading.
    """
    tasks, owner = [], []
    for sc in scenarios:
        n = chain_studies if sc.chains and chain_studies is not None else n_studies
        sizes = [min(chunk, n - lo) for lo in range(0, n, chunk)]
        for size, seq in zip(sizes, np.random.SeedSequence([seed, SCENARIOS.index(sc)]).spawn(len(sizes)),
                             strict=True):
            tasks.append((sc.name, size, n_images, side, seq))
            owner.append(sc)
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
            parts = list(ex.map(_chunk, tasks))
    else:
        parts = [_chunk(t) for t in tasks]
    out: dict = {sc.name: {"rates": {}, "scenario": sc} for sc in scenarios}
    for sc, part in zip(owner, parts, strict=True):
        for verdict, (hits, total) in part.items():
            rate = out[sc.name]["rates"].setdefault(verdict, Rate())
            rate.hits += hits
            rate.total += total
    return out


def table(results: dict) -> list[dict]:
    """One row per (scenario, verdict): reading (false-positive rate or power), rate, Monte Carlo SE."""
    rows = []
    for name, res in results.items():
        sc = res["scenario"]
        for verdict, rate in res["rates"].items():
            truth = sc.truth.get(verdict, False)
            reading = "power" if truth else ("false-positive rate" if truth is False else "not read")
            rows.append({"scenario": name, "verdict": verdict, "reading": reading, "rate": rate.rate, "se": rate.se,
                         "n": rate.total, "text": sc.text})
    return rows


def markdown(results: dict, seconds: float, n_studies: int, n_images: int, side: int, seed: int,
             chain_studies: int | None = None) -> str:
    rows = table(results)
    lines = ["# Calibration of drift's verdicts", "",
             "Generated by `drift calibrate` (module `drift.calibrate`): simulated studies with known answers, scored "
             "by drift's own metric functions and judged by the functions that judge archives (`drift.verdicts`). "
             f"{n_studies} studies per scenario ({chain_studies or n_studies} for the chain scenarios), {n_images} "
             f"images, {side} x {side} maps, 3 architectures, 2 methods, seed {seed}; {seconds:.0f} s. Family-wise "
             f"alpha = {ALPHA:g} for every verdict.", "",
             "A false-positive rate is the share of studies in which the verdict claims something that is false "
             "in that scenario; it must be at most alpha within Monte Carlo error (SE = sqrt(p (1 - p) / n)). "
             "Power is the share in which it finds the planted effect.", "",
             "| scenario | verdict | reading | rate | MC SE | studies |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scenario']} | {r['verdict']} | {r['reading']} | {r['rate']:.3f} | {r['se']:.3f} | "
                     f"{r['n']} |")
    lines += ["", "Scenarios:", ""]
    lines += [f"- `{sc.name}`: {sc.text} (fine-tuned models per architecture M = {sc.m}"
              + (f", {sc.chains} chains" if sc.chains else "") + ")." for sc in SCENARIOS if sc.name in results]
    lines += ["", "Verdicts:", "",
              "- `systematic`: 'systematic drift beyond seed noise' for some (architecture, method, metric) "
              "(`drift.verdicts.judge_systematic`; its power is the share of studies in which some entry is found).",
              "- `ranking`: 'architecture a drifts less than b' on systematic drift (`judge_ranking`).",
              "- `reversal`: 'the stability order reverses between LayerCAM and Grad-CAM++' in some distinct "
              "testable cell (`judge_reversals`); with one fine-tuned model it is conditional on the checkpoints "
              "(its null is `checkpoint-null`), with replicas on the transfer checkpoints.",
              "- `chains`: 'TL and FT maps differ over training seeds' (energy permutation test, `judge_chains`).",
              ""]
    return "\n".join(lines)


def failures(results: dict) -> list[str]:
    """Verdicts whose false-positive rate exceeds alpha + 2 Monte Carlo standard errors (none for a valid one)."""
    bad = []
    for r in table(results):
        if r["reading"] == "false-positive rate" and r["rate"] > ALPHA + 2 * max(r["se"], math.sqrt(
                ALPHA * (1 - ALPHA) / max(r["n"], 1))):
            bad.append(f"{r['scenario']}/{r['verdict']}: {r['rate']:.3f} over {r['n']} studies")
    return bad


def main(quick: bool = False, out: str | None = None, n_studies: int | None = None, seed: int = 0) -> int:
    """``drift calibrate``: print the table, write it to ``out`` (Markdown) when given; exit 1 when a
    false-positive rate exceeds alpha + 2 Monte Carlo SE.

    ``quick``: the scenarios in which some verdict's claim is false (every null; the power-only scenarios are
    left out), 100 studies each (50 for chains) of 24 images on 12 x 12 maps; the full run: every scenario, 1000
    studies of 60 images on 16 x 16 maps. Studies are shared among up to four processes."""
    n = n_studies or (100 if quick else 1000)
    chains = max(n // 2, 20) if quick else n  # a chain study scores 8 chains: the quick run takes fewer
    n_images, side = (24, 12) if quick else (60, 16)
    scenarios = tuple(sc for sc in SCENARIOS if not quick or any(sc.truth.get(v, False) is False
                                                                 for v in sc.verdicts()))
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small batches: threads cost more than they give; processes share the cores
    try:
        res = run(n, n_images, side, seed, scenarios, workers=max(1, min(os.cpu_count() or 1, 4)),
                  chain_studies=chains)
    finally:
        torch.set_num_threads(threads)
    text = markdown(res, time.perf_counter() - t0, n, n_images, side, seed, chains)
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    bad = failures(res)
    for b in bad:
        print(f"calibrate: false-positive rate above alpha: {b}")
    return 1 if bad else 0
