"""The pipeline's ``attributions`` step: the raw CAMs of every method, layer and score for both checkpoints of an
architecture, on every test image, stored under ``attributions/<arch>``.

:func:`cams` also serves :mod:`drift.baselines`, which maps its seed replicas the same way.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import distributed
from .config import PHASES
from .export import write_maps_view
from .h5tree import write_tree
from .models import REGISTRY, cam_layer_name, keras_layer_name
from .rundir import log

if TYPE_CHECKING:
    from .models import Classifier
    from .pipeline import Pipeline


def targets(pipe: Pipeline, arch: str, phase: str) -> np.ndarray:
    """The class each test image's maps explain, ``(N,)``: its label (``attribution.target = "true"``), else the
    prediction of ``arch``'s ``phase`` checkpoint."""
    if pipe.cfg.attribution.target == "true":
        return pipe.splits.test.labels
    return pipe.trained(arch, phase).evaluation.predictions


def saturated(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(N,) bool: the test images whose float32 softmax probability of the explained class is exactly 1 or 0
    (:func:`drift.capture.float32_saturated`), from the checkpoint's stored test logits (N, C): there a float32
    softmax score would have a zero derivative; drift differentiates it in float64."""
    from .capture import float32_saturated

    return float32_saturated(torch.as_tensor(logits), torch.as_tensor(targets)).numpy()


def run_step(pipe: Pipeline, arch: str) -> None:
    """Raw CAMs of every method, layer and score, for both checkpoints, from one forward pass and one backward
    pass per score and batch (:func:`drift.attribution.cams_multi`); committed as ``attributions/<arch>`` unless
    already committed under the same inputs."""
    name = f"attributions/{arch}"
    if not pipe._todo(name, "attributions"):
        return
    acfg = pipe.cfg.attribution
    t0 = time.perf_counter()
    tree: dict = {"targets": {}, "saturated": {}}
    for phase in PHASES:
        tgt = targets(pipe, arch, phase)
        trained = pipe.trained(arch, phase)
        res = cams(pipe, trained.model, tgt, f"{arch} {phase} CAMs")
        for (layer, score), by_method in res.items():
            for m, v in by_method.items():
                tree.setdefault(layer, {}).setdefault(score, {}).setdefault(phase, {})[m] = v
        tree["targets"][phase] = np.asarray(tgt)
        tree["saturated"][phase] = saturated(trained.evaluation.logits, tgt)
    with pipe.archive.commit(name, replace=(name,), started=t0, **pipe._stamp("attributions")) as f:
        g = f.require_group(name)
        write_tree(g, tree)
        g.attrs.update({"target": acfg.target, "eps": acfg.eps, "methods": json.dumps(list(acfg.methods)),
                        "scores": json.dumps(list(acfg.scores)), "score_dtype": "float64",
                        **{f"n_saturated_{phase}": int(tree["saturated"][phase].sum()) for phase in PHASES}})
        for layer in acfg.layers:
            grid = tree[layer][acfg.scores[0]]["transfer"][acfg.methods[0]].shape[1:]
            g[layer].attrs.update({"module": _module_name(pipe, arch, layer),
                                   "keras": (keras_layer_name(arch, layer) if arch in REGISTRY else "") or "",
                                   "grid": list(grid)})
        write_maps_view(f, arch)  # the xarray view of the same maps (drift.export)
    pipe.timings[name] = time.perf_counter() - t0
    first = {layer: tree[layer][acfg.scores[0]]["transfer"][acfg.methods[0]] for layer in acfg.layers}
    grids = ", ".join(f"{layer} {'x'.join(map(str, m.shape[1:]))}" for layer, m in first.items())
    log(f"{arch}: attribution maps ({grids}) for {len(acfg.methods)} methods x {len(acfg.scores)} scores x "
        f"2 checkpoints in {pipe.timings[name]:.0f} s; float32-saturated softmax probabilities (scored in float64): "
        + ", ".join(f"{phase} {int(tree['saturated'][phase].sum())}/{len(tree['targets'][phase])}"
                    for phase in PHASES))


def _module_name(pipe: Pipeline, arch: str, layer: str) -> str:
    """The dotted module a layer of the config names: the registry's preset, or for ``auto`` and for a model
    outside the registry (``drift measure``) the layer :mod:`drift.layers` resolves at the test images' shape."""
    if arch in REGISTRY and layer != "auto":
        return cam_layer_name(arch, layer)
    from .capture import resolve_target_layer

    return resolve_target_layer(pipe.trained(arch, "transfer").model, layer, tuple(pipe.test_images([0]).shape))[1]


def cams(pipe: Pipeline, model: Classifier, targets: np.ndarray,
         desc: str = "CAMs") -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """The run's CAMs of ``model`` on every test image (every method, layer and score of ``attribution``) for
    the class ``targets`` (N,): ``{(layer, score): {method: (N, h, w) float32}}``, from one forward pass and one
    backward pass per score and batch (:func:`drift.attribution.cams_multi`); batches shared out among the
    processes of a distributed run and gathered in order."""
    from .measuring import cams as measure_cams

    acfg = pipe.cfg.attribution
    out, _ = measure_cams(model, pipe.test_images, len(pipe.splits.test), targets, methods=acfg.methods,
                          layers=acfg.layers, scores=acfg.scores, eps=acfg.eps, batch_size=acfg.batch_size,
                          device=pipe.device, batches=distributed.my_batches, gather=distributed.gather_batches,
                          progress=pipe.cfg.run.progress, desc=desc)
    return out
