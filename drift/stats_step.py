"""The pipeline's ``stats`` step: architectures ranked by attribution stability in every cell of the protocol grid,
with paired bootstrap probabilities of a reversal, and the run's headline numbers and example images
(:mod:`drift.headline`), stored under ``stats``."""

from __future__ import annotations

import json
import time
import warnings
from typing import TYPE_CHECKING

import numpy as np

from . import headline, stats
from .archive import ArchiveReader, Cell
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
    verdict = headline.grid_verdict(tree, acfg.methods, mcfg.ranking_metrics)
    counts = np.bincount(labels[ranked], minlength=n_classes) if ranked.any() else np.zeros(n_classes, int)
    numbers = headline.compute(reader, mcfg.n_boot, pipe.cfg.run.seed)
    examples = headline.examples(reader, lambda idx: pipe.test_images(idx).numpy(), pipe.cfg.report.n_examples)
    with pipe.archive.commit("stats", replace=("stats",), started=t0, **pipe._stamp("stats")) as f:
        g = f.require_group("stats")
        write_tree(g.require_group("ranking"), tree)
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
