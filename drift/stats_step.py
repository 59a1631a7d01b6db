"""The pipeline's ``stats`` step: architectures ranked by attribution stability in every cell of the protocol grid
(with the descriptive bootstrap probability P(top differs | these checkpoints, image resampling)), the reversal
verdict over the grid (:func:`drift.verdicts.judge_reversals`: intersection-union tests, Holm across cells), and the
run's headline numbers and example images (:mod:`drift.headline`), stored under ``stats``."""

from __future__ import annotations

import json
import time
import warnings
from typing import TYPE_CHECKING

import numpy as np

from . import headline, stats, verdicts
from .archive import ArchiveReader, Cell
from .baselines import instability
from .drift_step import sample_mask
from .h5tree import as_tree, write_tree
from .metrics import stability
from .rundir import log

if TYPE_CHECKING:
    from .pipeline import Pipeline


def run_step(pipe: Pipeline) -> None:
    """Rank architectures by stability under each method in every cell of the protocol grid, on one sample
    (``metrics.ranking_sample_set``), with paired bootstrap probabilities of a reversal; store the run's
    headline numbers and example images for the readers (:mod:`drift.headline`)."""
    if not pipe._todo("stats", "stats"):
        return
    t0 = time.perf_counter()
    mcfg, acfg = pipe.cfg.metrics, pipe.cfg.attribution
    reader = ArchiveReader(pipe.path)
    archs = [a for a in pipe.cfg.run.archs if reader.has(f"drift/{a}")]
    labels = pipe.splits.test.labels
    n_classes = len(pipe.class_names)
    ranked = sample_mask(pipe, archs[0], mcfg.ranking_sample_set) if archs else np.zeros(len(labels), dtype=bool)
    tree: dict = {}
    for layer in acfg.layers if len(archs) > 1 else ():  # ranking needs two architectures
        for score in acfg.scores:
            for mode in mcfg.upsample:
                for norm in mcfg.normalize:
                    cell = Cell(layer, score, norm, mode)
                    out = tree.setdefault(layer, {}).setdefault(score, {}).setdefault(cell.leaf, {})
                    for metric in mcfg.ranking_metrics:
                        out[metric.replace("/", "_")] = _rank(pipe, reader, cell, metric, archs, ranked, n_classes)
    numbers = headline.compute(reader, mcfg.n_boot, pipe.cfg.run.seed)
    grid = {}
    for cell in reader.cells():
        for metric in mcfg.ranking_metrics if len(archs) > 1 else ():
            for arch in archs:
                for method in acfg.methods:
                    per = reader.drift(arch, method, cell)
                    if metric in per:
                        use = ranked & per["valid"].astype(bool)
                        grid.setdefault(cell.key, {}).setdefault(metric, {}).setdefault(arch, {})[method] = \
                            np.where(use, instability(metric, per[metric], mcfg.fractions), np.nan)
    rev = verdicts.judge_reversals(grid, acfg.methods, labels, agreement=archive_agreement(reader, archs, ranked),
                                   accuracy=_accuracy(numbers), min_per_class=mcfg.min_per_class)
    verdict = rev["sentence"]
    counts = np.bincount(labels[ranked], minlength=n_classes) if ranked.any() else np.zeros(n_classes, int)
    examples = headline.examples(reader, lambda idx: pipe.test_images(idx).numpy(), pipe.cfg.report.n_examples)
    with pipe.archive.commit("stats", replace=("stats",), started=t0, **pipe._stamp("stats")) as f:
        g = f.require_group("stats")
        write_tree(g.require_group("ranking"), tree)
        write_tree(g.require_group("reversal"), verdicts.reversal_table(rev["tests"]))
        g["reversal"].attrs.update({"scope": rev["scope"], "alpha": verdicts.ALPHA, "n_tests": rev["n_tests"],
                                    "untestable": json.dumps(rev["untestable"]),
                                    "collapsed": json.dumps(rev["collapsed"])})
        write_tree(g, {"headline": numbers, "examples": examples})
        write_tree(g, {"ranked": ranked})
        g.attrs.update({"ranking_sample_set": mcfg.ranking_sample_set, "n_ranked": int(ranked.sum()),
                        "n_ranked_per_class": json.dumps(counts.tolist()), "min_per_class": mcfg.min_per_class,
                        "verdict": verdict})
    log(f"stats: architectures ranked on {int(ranked.sum())} images ({mcfg.ranking_sample_set}); {verdict}")


def _rank(pipe: Pipeline, reader: ArchiveReader, cell: Cell, metric: str, archs: list[str], ranked: np.ndarray,
          n_classes: int) -> dict:
    """The rank reversal of ``archs`` by ``metric`` in ``cell`` over the ranked, valid images (``ranked`` (N,)
    bool), as an archive tree; ``{"unranked": why}`` when no ranking can be made."""
    values = {}
    for arch in archs:
        values[arch] = {}
        for method in pipe.cfg.attribution.methods:
            per = reader.drift(arch, method, cell)
            if metric not in per:
                raise KeyError(f"metrics.ranking_metrics: no metric {metric!r}; "
                               f"available: {sorted(k for k in per if k not in ('ids', 'labels'))}")
            use = ranked & per["valid"].astype(bool)
            if pipe.cfg.metrics.method_sample == "common" and "in_common" in per:
                use &= per["in_common"].astype(bool)
            values[arch][method] = (np.where(use, per[metric], np.nan), per["labels"])
    m = pipe.cfg.metrics
    higher, absolute = stability(metric, m.fractions)
    try:
        return as_tree(stats.rank_reversal(values, n_classes, higher_is_stable=higher, n_boot=m.n_boot,
                                            seed=pipe.cfg.run.seed, absolute=absolute, min_per_class=m.min_per_class))
    except ValueError as exc:  # e.g. no image of an architecture left: record why, keep the rest
        warnings.warn(f"ranking by {metric} in cell ({cell}): {exc}", stacklevel=2)
        return {"unranked": str(exc)}


def _accuracy(numbers: dict) -> dict:
    """``{arch: {phase: (accuracy, lo, hi)}}`` from the headline numbers (:func:`drift.headline.compute`)."""
    return {arch: {phase: (e.get("accuracy", np.nan), e.get("accuracy_lo", np.nan), e.get("accuracy_hi", np.nan))
                   for phase, e in by_phase.items()}
            for arch, by_phase in numbers.get("classification", {}).items()}


def archive_accuracy(reader: ArchiveReader, archs: list[str]) -> dict:
    """Test accuracy with its interval per (architecture, phase), from the stored headline numbers."""
    acc = _accuracy(headline.load(reader))
    return {a: v for a, v in acc.items() if a in archs}


def archive_agreement(reader: ArchiveReader, archs: list[str], use: np.ndarray) -> dict:
    """``{"layer/score": {(m1, m2): smallest mean method agreement}}``: the mean over the images in ``use`` of the
    per-image Pearson r between two methods' maps (the drift step's ``agreement``), smallest over phases and
    architectures (a pair is untestable in a cell only when it agrees for every architecture and phase)."""
    out: dict = {}
    for arch in archs:
        for layer in reader.layers(arch):
            for score in reader.keys(f"drift/{arch}/{layer}"):
                for by_pair in reader.agreement(arch, layer, score).values():
                    for pair, r in by_pair.items():
                        r = np.asarray(r, dtype=np.float64)
                        ok = use[:r.size] & np.isfinite(r)
                        if not ok.any():
                            continue
                        key = tuple(pair.split(" vs "))
                        node = out.setdefault(f"{layer}/{score}", {})
                        node[key] = min(node.get(key, np.inf), float(r[ok].mean()))
    return out
