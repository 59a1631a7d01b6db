"""``drift measure`` and :func:`measure`: two checkpoints of a classifier drift did not train (any timm model, or
your own ``nn.Module``) and a set of labelled images in; the per-image drift metrics, method agreement, protocol
cells, statistics, iFIM, archive and report of ``drift run`` out.

:class:`MeasureRun` is the pipeline (:class:`drift.pipeline.Pipeline`) with its training step replaced by loading
the two models (:func:`drift.user_models.load_model`): model A fills the archive's ``transfer`` slot and model B
its ``finetune`` slot, under the architecture name ``measure.name``, so every reader (summary, report, compare,
export) reads a measured pair as it reads a trained one. The models' groups ``models/<name>/<phase>`` record each
model's ``role`` (A or B), spec, state-dict file and its sha256, and the factory's code sha256.

Replicas of model B (``measure.replicas_b``: B retrained with other seeds) give the retraining-noise floor: for
every protocol cell, method and ranking metric, the archive holds ``d_tl`` (R+1, N), the instability of A against
B and each replica, and ``d_ft`` (R+1, R+1, N), the instability between every ordered pair of B and its replicas
(diagonal NaN), under ``measure/<name>/replicas/<layer>/<score>/<norm>/<method>/<metric>``, as the metric's
squared-Euclidean reading (:func:`drift.stats.euclidean_instability`: 1 - r, 1 - Dice, the squared shift), with
the systematic drift of :func:`systematic` beside them and, in the primary cell, the verdict of
:func:`drift.verdicts.judge_systematic` (at least two replicas).

Images are a folder or CSV manifest (``data.*`` as for ``drift run``; the measured images are the test split,
or every split with ``measure.images = "all"``) or, from Python, an array (N, 1, H, W) or (N, H, W) in [0, 1] with
labels (N,) (``data.source = "arrays"`` in the archived config).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import config as config_mod
from . import verdicts
from .archive import ArchiveReader
from .config import PHASES, Config
from .data.base import ImageSet, Splits
from .h5tree import write_tree
from .metrics import pair_metrics
from .pipeline import Pipeline, Trained
from .rundir import log
from .stats.systematic import euclidean_instability, euclidean_label
from .train import evaluate
from .user_models import ModelOrigin, load_model

__all__ = ["MEASURE_STEPS", "MeasureRun", "measure", "run_measure", "state_sha256", "systematic"]

MEASURE_STEPS = ("data", "models", "attributions", "drift", "fisher", "replicas", "stats", "report")
ROLES = {"transfer": "A", "finetune": "B"}


def systematic(d_tl: np.ndarray, d_ft: np.ndarray, metric: str, labels: np.ndarray | None = None,
               min_per_class: int = 1) -> dict:
    """The systematic drift of A -> B beyond retraining noise (:func:`drift.stats.systematic_drift` in the form
    :func:`drift.stats.systematic_form` gives ``metric``), from ``d_tl`` (R+1, N) and ``d_ft`` (R+1, R+1, N), the
    metric's squared-Euclidean instabilities (:func:`drift.stats.euclidean_instability`)."""
    from . import stats

    return stats.systematic_drift(d_tl, d_ft, labels, min_per_class=min_per_class,
                                  form=stats.systematic_form(metric)).as_dict()


def _concat(parts: Sequence[ImageSet]) -> ImageSet:
    """One ImageSet of every image of ``parts`` (same classes, size and storage), in order."""
    first = parts[0]
    labels = np.concatenate([p.labels for p in parts])
    ids = [i for p in parts for i in p.ids]

    def cat(name):
        arrs = [getattr(p, name) for p in parts]
        return None if any(a is None for a in arrs) else np.concatenate(arrs)

    if first.paths is not None:
        return ImageSet(first.class_names, labels, ids, size=first.size, paths=[q for p in parts for q in p.paths],
                        reader=first._reader, lung_masks=cat("lung_masks"), lesion_masks=cat("lesion_masks"),
                        marker_masks=cat("marker_masks"))
    return ImageSet(first.class_names, labels, ids, size=first.size, pixels=cat("_pixels"),
                    lung_masks=cat("lung_masks"), lesion_masks=cat("lesion_masks"), marker_masks=cat("marker_masks"))


def array_splits(images, labels, class_names: Sequence[str] | None = None) -> Splits:
    """Splits whose test split is ``images`` (N, 1, H, W) or (N, H, W) in [0, 1], square, with ``labels`` (N,);
    train and val are empty."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images).detach().cpu()
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3 or x.shape[-1] != x.shape[-2] or x.shape[0] < 1:
        raise ValueError(f"images must be (N, 1, H, W) or (N, H, W) grayscale with H = W and N >= 1, got "
                         f"{tuple(x.shape)}")
    x = x.float().numpy()
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError(f"images must be finite and in [0, 1], got range [{np.nanmin(x)}, {np.nanmax(x)}]")
    y = np.asarray(labels)
    if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be ({x.shape[0]},) integers, got {y.dtype} {y.shape}")
    n_classes = int(y.max()) + 1 if class_names is None else len(class_names)
    names = tuple(class_names) if class_names is not None else tuple(str(c) for c in range(n_classes))
    if y.min() < 0 or y.max() >= len(names):
        raise ValueError(f"labels must lie in [0, {len(names)}) for classes {names}, got [{y.min()}, {y.max()}]")
    ids = [f"image{i:05d}" for i in range(len(y))]
    test = ImageSet(names, y, ids, size=x.shape[-1], pixels=np.ascontiguousarray(x, dtype=np.float32))
    empty = ImageSet(names, np.zeros(0, np.int64), [], size=x.shape[-1],
                     pixels=np.zeros((0, x.shape[-1], x.shape[-1]), np.float32))
    return Splits(empty, empty, test)


class MeasureRun(Pipeline):
    """The pipeline of ``drift run`` on two given models (A in the ``transfer`` slot, B in ``finetune``)."""

    def __init__(self, cfg: Config, models: dict[str, tuple[nn.Module, ModelOrigin]],
                 replicas: Sequence[tuple[nn.Module, ModelOrigin]] = (), splits: Splits | None = None,
                 fresh: bool = False, force: tuple[str, ...] = ()):
        self.given = models
        self.replicas = list(replicas)
        self._given_splits = splits
        super().__init__(cfg, fresh=fresh, force=force)
        self.name = cfg.measure.name
        for model, _ in models.values():
            model.to(self.device).eval()
        for model, _ in self.replicas:
            model.to(self.device).eval()

    @property
    def splits(self) -> Splits:
        if self._splits is None:
            s = self._given_splits if self._given_splits is not None else Pipeline.splits.fget(self)
            if self.cfg.measure.images == "all":
                s = Splits(s.train, s.val, _concat([p for p in (s.train, s.val, s.test) if len(p)]), s.skipped)
            self._splits = s
        return self._splits

    @property
    def data_fingerprint(self) -> str:
        if self._data_fingerprint is None and self._given_splits is not None:
            t = self.splits.test
            h = hashlib.sha256(json.dumps(list(t.class_names)).encode())
            h.update(np.ascontiguousarray(t.labels).tobytes())
            h.update(np.ascontiguousarray(t.images().numpy()).tobytes())
            self._data_fingerprint = h.hexdigest()[:16]
        return Pipeline.data_fingerprint.fget(self)

    def _stamp(self, step: str) -> dict:
        stamp = super()._stamp(step)
        if step != "data":
            origins = [o.to_dict() for _, o in self.given.values()] + [o.to_dict() for _, o in self.replicas]
            stamp["inputs"]["models"] = hashlib.sha256(json.dumps(origins, sort_keys=True).encode()).hexdigest()[:16]
            stamp["inputs"]["measure"] = self.cfg.part_hash("measure")
            stamp["fingerprint"] = hashlib.sha256(json.dumps(stamp["inputs"], sort_keys=True).encode()
                                                  ).hexdigest()[:16]
        return stamp

    def _check_input_size(self, arch: str) -> None:
        """No registry sizes apply: a model too small for its layers fails in :mod:`drift.layers`, naming them."""

    def trained(self, arch: str, phase: str, seed: int | None = None) -> Trained:
        """Model A (``transfer``) or B (``finetune``) with its evaluation on the measured images, committed as
        ``models/<name>/<phase>`` with its origin."""
        if seed is not None or arch != self.name:
            raise ValueError(f"drift measure holds the two given models of {self.name!r}; it trains no "
                             f"replicas (give replica checkpoints with measure.replicas_b)")
        if (arch, phase) in self._models:
            return self._models[(arch, phase)]
        model, origin = self.given[phase]
        ev = evaluate(model, self.splits.test, self.device)
        n_classes = len(self.class_names)
        if ev.logits.shape[1] != n_classes:
            raise ValueError(f"model {ROLES[phase]} ({origin.spec}) gives {ev.logits.shape[1]} logits; the images "
                             f"have {n_classes} classes ({', '.join(self.class_names)})")
        name = self.model_name(arch, phase)
        if self._todo(name, "train"):
            t0 = time.perf_counter()
            with self.archive.commit(name, replace=(name,), started=t0, **self._stamp("train")) as f:
                g = f.require_group(name)
                write_tree(g, {"test": ev.to_dict()})
                g.attrs.update({"role": ROLES[phase], "spec": origin.spec, "kind": origin.kind,
                                "checkpoint": origin.weights, "sha256": origin.sha256,
                                "code_sha256": origin.code_sha256, "weights": _origin_text(origin),
                                "input_size": int(self.splits.test.size)})
            log(f"model {ROLES[phase]} ({_origin_text(origin)}): accuracy {ev.accuracy:.3f}, "
                f"macro AUC {ev.macro_auc:.3f} on {len(self.splits.test)} images")
        self._models[(arch, phase)] = Trained(model, ev)
        return self._models[(arch, phase)]

    def _run(self, steps: tuple[str, ...]) -> Path:
        t0 = time.perf_counter()
        if "data" in steps:
            self.step_data()
        arch = self.name
        for phase in PHASES:
            self.trained(arch, phase)
        self.arch_steps(arch, steps)
        if "replicas" in steps and self.replicas:
            self.step_replicas()
        if "stats" in steps:
            self.step_stats()
        self.timings["total"] = time.perf_counter() - t0
        if "report" in steps and self.cfg.report.enabled:
            self.step_report()
        return self.path

    def step_replicas(self) -> None:
        """The instabilities of A against B and each replica of B, and between B and its replicas (module
        docstring), per protocol cell, method and ranking metric; committed as ``measure/<name>/replicas``."""
        from .attribution import normalize, upsample
        from .attributions_step import cams
        from .drift_step import masks

        name = f"measure/{self.name}/replicas"
        if not self._todo(name, "baselines"):
            return
        t0 = time.perf_counter()
        acfg, mcfg = self.cfg.attribution, self.cfg.metrics
        test = self.splits.test
        size = (test.size, test.size)
        lung, lesion, marker = masks(self)
        b_models = [self.given["finetune"]] + self.replicas
        labels = test.labels

        def targets_of(model):
            return labels if acfg.target == "true" else evaluate(model, test, self.device).predictions

        reader = ArchiveReader(self.path)

        def maps_of(phase, r):  # A's and B's maps as the attributions step archived them, else computed
            if reader.has(f"attributions/{self.name}"):
                return {(la, sc): {m: reader.maps(self.name, phase, m, la, sc) for m in acfg.methods}
                        for la in acfg.layers for sc in acfg.scores}
            model = b_models[r][0] if phase == "finetune" else self.given["transfer"][0]
            return cams(self, model, targets_of(model), f"{phase} CAMs")

        a_maps = maps_of("transfer", 0)
        b_maps = [maps_of("finetune", 0)] + [cams(self, m, targets_of(m), f"B replica {r + 1} CAMs")
                                              for r, (m, _) in enumerate(self.replicas)]
        tree: dict = {}
        judged: dict = {}
        n, R1 = len(test), len(b_models)
        for layer in acfg.layers:
            for score in acfg.scores:
                for norm in mcfg.normalize:
                    for method in acfg.methods:
                        a, *bs = [normalize(upsample(torch.as_tensor(m[layer, score][method]), size), norm)
                                  for m in (a_maps, *b_maps)]
                        d_tl = {k: np.full((R1, n), np.nan) for k in mcfg.ranking_metrics}
                        d_ft = {k: np.full((R1, R1, n), np.nan) for k in mcfg.ranking_metrics}
                        for r in range(R1):
                            self._fill(d_tl, (r,), a, bs[r], lung, lesion, marker)
                            for s in range(R1):
                                if s != r:
                                    self._fill(d_ft, (r, s), bs[r], bs[s], lung, lesion, marker)
                        out = tree.setdefault(layer, {}).setdefault(score, {}).setdefault(norm, {})
                        for k in mcfg.ranking_metrics:
                            entry = {"d_tl": d_tl[k], "d_ft": d_ft[k], "instability": euclidean_label(k)}
                            if R1 >= 2:
                                entry["systematic"] = systematic(d_tl[k], d_ft[k], k, labels,
                                                                 mcfg.min_per_class)
                                if (layer, score, norm) == (acfg.layers[0], acfg.scores[0], mcfg.normalize[0]):
                                    judged[self.name, method, k] = (d_tl[k], d_ft[k])
                            out.setdefault(method, {})[k.replace("/", "_")] = entry
        origins = [o.to_dict() for _, o in b_models]
        verdict = verdicts.judge_systematic(judged, labels, min_per_class=mcfg.min_per_class)["sentence"]
        with self.archive.commit(name, replace=(name,), started=t0, **self._stamp("baselines")) as f:
            g = f.require_group(name)
            write_tree(g, tree)
            g.attrs.update({"origins": json.dumps(origins), "n_replicas": len(self.replicas),
                            "instability": "squared-Euclidean readings (drift.stats.euclidean_instability)",
                            "verdict": verdict})
        log(f"replicas: A against B and {len(self.replicas)} replica(s) of B in {time.perf_counter() - t0:.0f} s"
            + (f"; {verdict}" if verdict else ""))

    def _fill(self, out: dict, at: tuple, a, b, lung, lesion, marker) -> None:
        """The squared-Euclidean instabilities of the pair (a, b) into ``out[metric][at]``, NaN where invalid."""
        fr = tuple(self.cfg.metrics.fractions)
        per = pair_metrics(a, b, lung_mask=lung, lesion_mask=lesion, fractions=fr, marker_mask=marker)
        valid = per["valid"].cpu().numpy().astype(bool)
        for k, arr in out.items():
            v = euclidean_instability(k, per[k].cpu().numpy())
            arr[at] = np.where(valid, v, np.nan)


def _origin_text(o: ModelOrigin) -> str:
    what = o.spec + (f" + {o.weights} (sha256 {o.sha256[:12]})" if o.weights else " (weights as built)")
    return f"{o.kind}: {what}"


def state_sha256(model: nn.Module) -> str:
    """sha256 of a module's state dict: every entry's name, dtype, shape and bytes, in name order (the identity of
    a model given as an object rather than a file)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _model(m, weights: str, cfg: Config) -> tuple[nn.Module, ModelOrigin]:
    mc = cfg.measure
    mean, std = (tuple(mc.mean), tuple(mc.std)) if mc.mean else (None, None)
    if isinstance(m, nn.Module):
        from .user_models import UserModel

        wrapped = UserModel(m, mc.channels, tuple(mc.mean), tuple(mc.std)).eval()
        return wrapped, ModelOrigin(f"python:{type(m).__module__}.{type(m).__qualname__}", "module", "",
                                    state_sha256(m), "", -1)
    return load_model(m, weights, mean, std, mc.channels)


def measure(model_a: nn.Module | str, model_b: nn.Module | str | None = None, images=None, labels=None, *,
            weights_a: str = "", weights_b: str = "", replicas_b: Sequence[str | nn.Module] = (),
            class_names: Sequence[str] | None = None, out: str | os.PathLike = "runs/measure",
            config: str | os.PathLike | None = None, overrides: Sequence[str] = (), fresh: bool = False) -> Path:
    """Measure how the evidence of a classifier moved from ``model_a`` to ``model_b``: the outputs of ``drift run``
    for two given models. Returns the archive's path (``<out>/archive.h5``; the report beside it).

    Args:
        model_a, model_b: ``nn.Module`` objects (they take images (B, 1|C, H, W) in [0, 1]; ``measure.mean``,
            ``.std`` and ``.channels`` apply) or model specs (:func:`drift.user_models.load_model`) with
            ``weights_a`` / ``weights_b``; ``model_b`` None: the spec of ``model_a`` with ``weights_b``.
        images: (N, 1, H, W) or (N, H, W) in [0, 1], square, with ``labels`` (N,) ints; or a folder or CSV
            manifest (``labels`` None), read as ``drift run`` reads ``data.path``; or None for the config's data.
        replicas_b: replicas of model B (state-dict files for a spec, or modules): the retraining-noise floor.
        class_names: names of the label values (arrays only).
        out: the output folder.
        config, overrides: a config file and ``key=value`` overrides (``drift run``'s; ``attribution.*``,
            ``metrics.*``, ``fisher.*``, ``measure.*``, ``report.*`` apply).
        fresh: start a new archive even if ``out`` holds one.

    Raises:
        ValueError: bad images, labels or models (naming what is wrong), a model whose logits do not match the
            class count, or layers that do not resolve on the models (listing the candidates).
    """
    extra = [f'run.out="{Path(out).as_posix()}"']
    if isinstance(model_a, str):
        extra += [f'measure.model_a="{model_a}"', f'measure.weights_a="{weights_a}"']
    if isinstance(model_b, str):
        extra += [f'measure.model_b="{model_b}"']
    if weights_b:
        extra += [f'measure.weights_b="{weights_b}"']
    splits = None
    if isinstance(images, (str, os.PathLike)):
        if labels is not None:
            raise ValueError("images is a folder or manifest: its labels come from it; pass labels=None")
        src = "csv" if str(images).lower().endswith(".csv") else "folder"
        extra += [f'data.source="{src}"', f'data.path="{Path(images).as_posix()}"']
    elif images is not None:
        splits = array_splits(images, labels, class_names)
        extra += ['data.source="arrays"', f"data.image_size={splits.test.size}"]
    if not isinstance(model_a, str):  # a module: its class names the pair's first model in the config
        extra += [f'measure.model_a="python:{type(model_a).__qualname__}"']
    cfg = config_mod.load(config, [*overrides, *extra])
    return run_measure(cfg, model_a, model_b, replicas_b, splits, fresh)


def run_measure(cfg: Config, model_a=None, model_b=None, replicas_b: Sequence = (), splits: Splits | None = None,
                fresh: bool = False) -> Path:
    """Load the models ``cfg.measure`` names (or take the given modules) and run :class:`MeasureRun`."""
    mc = cfg.measure
    cfg.run.archs = [mc.name]
    a = _model(model_a if isinstance(model_a, nn.Module) else mc.model_a, mc.weights_a, cfg)
    spec_b = mc.model_b or (model_b if isinstance(model_b, str) else "") or mc.model_a
    if isinstance(model_b, nn.Module):
        b = _model(model_b, "", cfg)
    else:
        if isinstance(model_a, nn.Module) and not (mc.model_b or isinstance(model_b, str)):
            raise ValueError("model_b: pass a module or a spec (model_a is a module, so there is no spec to reuse)")
        b = _model(spec_b, mc.weights_b, cfg)
    reps = [_model(r, "", cfg) if isinstance(r, nn.Module) else _model(spec_b, str(r), cfg)
            for r in [*replicas_b, *mc.replicas_b]]
    run = MeasureRun(cfg, {"transfer": a, "finetune": b}, reps, splits, fresh=fresh)
    return run.run(MEASURE_STEPS)


class _CallableModule(types.ModuleType):
    """``drift.measure(...)`` is :func:`measure`: the module is callable, and its functions stay importable."""

    def __call__(self, *args, **kwargs) -> Path:
        return measure(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
