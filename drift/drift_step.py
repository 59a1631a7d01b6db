"""The pipeline's ``drift`` step: per-image drift metrics TL -> FT of every method in every cell of the protocol grid
(layer x score x normalisation x resampling), their summaries over the selected images, and the agreement between
methods.

The step scores every test image and records which ones its summaries use (:func:`sample_mask`); the seed
replicas of :mod:`drift.baselines` score their map pairs with the same :func:`pair_tree`. The data step archives
the marker masks of :func:`marker_masks` that the metrics score against.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import distributed, measuring, stats
from .archive import ArchiveReader, Cell
from .attribution import normalize, upsample
from .config import PHASES
from .export import write_metrics_view
from .h5tree import write_tree
from .maps import to_grid
from .measuring import empty_reason  # noqa: F401  (the step's name for it, as before)
from .metrics import degenerate, pearson
from .rundir import log

if TYPE_CHECKING:
    from .data import ImageSet
    from .pipeline import Pipeline


def run_step(pipe: Pipeline, arch: str) -> None:
    """Per-image drift metrics TL -> FT for every cell of the protocol grid and every method, over all test
    images (the sample set is a mask), and the per-image agreement between methods of one checkpoint; committed as
    ``drift/<arch>`` unless already committed under the same inputs."""
    name = f"drift/{arch}"
    if not pipe._todo(name, "drift"):
        return
    t0 = time.perf_counter()
    mcfg, acfg = pipe.cfg.metrics, pipe.cfg.attribution
    reader = ArchiveReader(pipe.path)
    size = tuple(pipe.splits.test.images([0]).shape[-2:])
    lung, lesion, marker = masks(pipe)
    selected = sample_mask(pipe, arch, mcfg.sample_set)
    tree: dict = {}
    for layer in acfg.layers:
        for score in acfg.scores:
            raw = {(st, m): torch.as_tensor(reader.maps(arch, st, m, layer, score))
                   for st in PHASES for m in acfg.methods}
            grid = tuple(next(iter(raw.values())).shape[-2:])
            node = tree.setdefault(layer, {}).setdefault(score, {})
            for k, mode in enumerate(mcfg.upsample):
                up = {key: upsample(v, size, mode) for key, v in raw.items()}
                if k == 0:  # method agreement: on the primary resampling's maps
                    node["agreement"] = {st: {f"{m1} vs {m2}": pearson(up[st, m1], up[st, m2]).cpu().numpy()
                                              for i, m1 in enumerate(acfg.methods) for m2 in acfg.methods[i + 1:]}
                                         for st in PHASES}
                # Metrics at the layer's grid: each mask cell weighs its fraction of mask pixels.
                cell_masks = tuple(to_grid(mk, grid) for mk in (lung, lesion, marker)) if mode == "none" else (
                    lung, lesion, marker)
                for norm in mcfg.normalize:
                    leaf = Cell(layer, score, norm, mode).leaf
                    pairs = {m: (normalize(up["transfer", m], norm), normalize(up["finetune", m], norm))
                             for m in acfg.methods}
                    valid = {m: ((degenerate(a) == 0) & (degenerate(b) == 0)).cpu().numpy()
                             for m, (a, b) in pairs.items()}
                    common = np.logical_and.reduce(list(valid.values()))
                    use = common if mcfg.method_sample == "common" else None
                    for method, (a, b) in pairs.items():
                        pt = pair_tree(pipe, a, b, *cell_masks, selected, use=use)
                        pt["per_sample"]["in_common"] = common
                        pt["methods"] = method_counts(pipe, selected, valid, method, mcfg.method_sample)
                        node.setdefault(leaf, {})[method] = pt
    with pipe.archive.commit(name, replace=(name,), started=t0, **pipe._stamp("drift")) as f:
        g = f.require_group(name)
        write_tree(g, tree)
        g.attrs["sample_set"] = mcfg.sample_set
        g.attrs["n_selected"] = int(selected.sum())
        g.attrs.update({"upsample": json.dumps(list(mcfg.upsample)), "ties": mcfg.ties,
                        "agreement_upsample": mcfg.upsample[0], "method_sample": mcfg.method_sample})
        write_metrics_view(f, arch)  # the xarray view of the same numbers (drift.export)
    pipe.timings[name] = time.perf_counter() - t0
    n_cells = len(acfg.layers) * len(acfg.scores) * len(mcfg.normalize) * len(mcfg.upsample)
    log(f"{arch}: drift metrics of {n_cells} protocol cells x {len(acfg.methods)} methods in "
        f"{pipe.timings[name]:.0f} s")


def masks(pipe: Pipeline, n: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                          torch.Tensor | None]:
    """Lung, lesion and shortcut-marker masks of the first ``n`` test images (all when None).

    Returns:
        ``(lung, lesion, marker)``, each ``(n, H, W)`` bool or None when the data has none: what the localisation
        metrics of :func:`drift.metrics.pair_metrics` score against.
    """
    test = pipe.splits.test
    return tuple(torch.as_tensor(m[:n]) if m is not None else None
                 for m in (test.lung_masks, test.lesion_masks, marker_masks(test)))


def method_counts(pipe: Pipeline, selected: np.ndarray, valid: dict[str, np.ndarray], method: str,
                  rule: str) -> dict:
    """How the sample of one method relates to the other methods of its cell.

    Args:
        pipe: The run (its test ids).
        selected: ``(N,)`` bool, the sample set.
        valid: ``{method: (N,) bool}`` neither map degenerate, for every method of the cell.
        method: The method described.
        rule: ``metrics.method_sample``: ``common`` (summaries over images valid under every method) or
            ``per-method``.

    Returns:
        ``{"rule", "n_common": selected images valid under every method, "n_valid": selected images valid under
        this method, "dropped": ids of selected images this method's maps leave out of the common sample}``.
    """
    ids = np.asarray(pipe.splits.test.ids)[: len(selected)]
    common = np.logical_and.reduce(list(valid.values()))
    mine = valid[method]
    return {"rule": rule, "n_common": int((selected & common).sum()), "n_valid": int((selected & mine).sum()),
            "dropped": json.dumps([str(i) for i in ids[selected & ~mine]])}


def pair_tree(pipe: Pipeline, a: torch.Tensor, b: torch.Tensor, lung: torch.Tensor | None,
              lesion: torch.Tensor | None, marker: torch.Tensor | None, selected: np.ndarray,
              n: int | None = None, use: np.ndarray | None = None) -> dict:
    """Per-image metrics of the map pairs (``a`` TL, ``b`` FT) and their summaries over the selected, valid images.

    Args:
        pipe: The run; its test split gives the labels and ids, its config the fractions and bootstrap settings.
        a, b: ``(n, H, W)`` maps of the first ``n`` test images (all when ``n`` is None), at the masks' size.
        lung, lesion, marker: ``(n, H, W)`` bool masks or None (:func:`masks`).
        selected: ``(n,)`` bool, the images the summaries use (:func:`sample_mask`).
        n: How many test images, from the first; None for all.
        use: ``(n,)`` bool, the images the summaries may use besides selected and valid ones (the common sample
            of the cell's methods), or None.

    Returns:
        ``{"per_sample": {metric: (n,), ids, labels, valid, selected}, "degenerate": {phase: (n,), "topk_short":
        {iou@XX: count}}, "summary": {metric: aggregate, "paired": {quantity: paired test}}, "empty": why the
        summaries have no image, or ""}``, as written under ``drift/<arch>``.
    """
    test = pipe.splits.test
    mcfg = pipe.cfg.metrics
    return measuring.pair_tree(a, b, test.labels[:n], np.asarray(test.ids)[:n], len(pipe.class_names), selected,
                               lung=lung, lesion=lesion, marker=marker, fractions=mcfg.fractions,
                               n_boot=mcfg.n_boot, seed=pipe.cfg.run.seed, min_per_class=mcfg.min_per_class,
                               by_images=distributed.by_images, ties=mcfg.ties, thresholds=mcfg.binarize,
                               centroid_norm=mcfg.centroid_norm, use=use)


def sample_mask(pipe: Pipeline, arch: str | None, rule: str) -> np.ndarray:
    """The test images a statistic uses, ``(N,)`` bool: ``rule`` applied to ``arch``'s checkpoints, or with
    ``tp_all`` to every architecture of the run (correct under both checkpoints of each: one common sample)."""
    labels = pipe.splits.test.labels
    if rule == "tp_all":
        preds = [(pipe.trained(a, "transfer").evaluation.predictions,
                  pipe.trained(a, "finetune").evaluation.predictions) for a in pipe.cfg.run.archs]
        return stats.common_sample(labels, preds)
    return stats.select_samples(labels, pipe.trained(arch, "transfer").evaluation.predictions,
                                pipe.trained(arch, "finetune").evaluation.predictions, rule)


def marker_masks(test: ImageSet) -> np.ndarray | None:
    """The split's shortcut-marker masks ``(N, H, W)`` bool, or None when the confounder is off (no image tagged) or
    the data has no marker masks."""
    m = test.marker_masks
    return m.astype(bool) if m is not None and m.any() else None
