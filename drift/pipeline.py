"""The stages of ``drift run``: data -> (per architecture) weights, transfer, fine-tuning, attributions,
drift metrics, iFIM -> statistics across architectures -> report.

Each stage commits its outputs to the archive as soon as it finishes (see :mod:`drift.archive`), and a re-run
with the same config skips the stages already committed: checkpoints are reloaded (their sha256 checked) and
the later stages resume where the last run stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed, source_weights
from .archive import ArchiveReader, as_tree, write_tree
from .config import Config
from .models import Classifier, build, get_spec
from .rundir import RunLock, log, make_out, nothing_finished, provenance
from .train import (
    BN_CALIBRATION_IMAGES,
    Evaluation,
    calibrate_bn,
    evaluate,
    evaluation_from_logits,
    resolve_device,
    train_finetune,
    train_transfer,
)
from .weights import (
    load_backbone_weights,
    load_checkpoint,
    load_imagenet,
    load_state,
    save_checkpoint,
    sha256_file,
)

STAGES = ("transfer", "finetune")
ALL_STEPS = ("data", "train", "attributions", "drift", "fisher", "stats", "baselines", "report")


@dataclass
class Trained:
    model: Classifier
    evaluation: Evaluation


class Pipeline:
    """Runs (and resumes) one study described by a :class:`Config` into ``<out>/archive.h5``."""

    def __init__(self, cfg: Config, fresh: bool = False, force: tuple[str, ...] = ()):
        distributed.init(cfg.run.device)  # a no-op unless started by torchrun with several processes
        distributed.check_batch_sizes(cfg)
        if not distributed.is_main():
            cfg.run.progress = False  # progress bars of rank 0 only
        self.cfg = cfg
        self.out = Path(cfg.run.out)
        make_out(self.out)
        self.lock = RunLock(self.out / ".lock")
        if distributed.is_main():  # rank 0 holds the folder for every rank
            self.lock.acquire()
        try:
            self.path = self.out / "archive.h5"
            if distributed.is_main() and self.path.exists() and (fresh or nothing_finished(self.path)):
                # --fresh, or a run that failed before finishing any step: nothing worth keeping, whatever the
                # config that run was started with.
                self.path.unlink()
            self.device = distributed.local_device(resolve_device(cfg.run.device))
            if cfg.run.threads:
                torch.set_num_threads(cfg.run.threads)
            self.archive = distributed.open_archive(self.path, cfg.to_toml(), cfg.science_hash(),
                                                    provenance(cfg, self.device))
            self.environment = self._environment()
        except BaseException:
            self.lock.release()
            raise
        self.force = set(force)
        self._splits = None
        self._data_fingerprint: str | None = None
        self._models: dict[tuple[str, str], Trained] = {}
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    @distributed.decided_by_rank0
    def _todo(self, name: str, step: str) -> bool:
        """Whether ``name`` must be (re)computed: forced, never committed, or committed under other settings,
        other data or another environment (logged, naming what changed)."""
        if step in self.force:
            return True
        stamp = self._stamp(step)
        if self.archive.done(name, stamp["fingerprint"]):
            return False
        entry = self.archive.entry(name)
        if entry is not None:
            old = entry.get("inputs") or {}
            changed = [k for k, v in stamp["inputs"].items() if k in old and old[k] != v]
            if "data" in changed:
                what = "the data changed (images added, removed, relabelled or modified)"
            elif "settings" in changed or not changed:
                what = "settings changed"
            else:
                what = ", ".join(f"{k} changed ({old[k]} -> {stamp['inputs'][k]})" for k in changed)
            log(f"{name}: {what} since it was computed; computing it again")
        return True

    def _environment(self) -> dict[str, str]:
        """What the results of training and every later step depend on beyond the config: the effective CPU thread
        count (``run.threads`` applied, or torch's default from the machine's cores), the device type, the
        training precision resolved on that device, and the torch and timm versions. Another thread count alone
        changes floating-point reduction order, hence the checkpoints."""
        import timm

        from .train import resolve_precision

        train = self.cfg.train
        precision = sorted({f"{st}={resolve_precision(getattr(train, st).for_arch(a).precision, self.device)}"
                            for a in self.cfg.run.archs for st in STAGES})
        return {"threads": str(torch.get_num_threads()), "device": self.device.type, "precision": ",".join(precision),
                "torch": torch.__version__, "timm": timm.__version__}

    @property
    def data_fingerprint(self) -> str:
        """Hash of the data as read: for real data every split's ids, labels and file sizes and modification times
        (and the skipped files), for synthetic data its settings (the images are a function of them)."""
        if self._data_fingerprint is None:
            if self.cfg.data.source == "synthetic":
                self._data_fingerprint = self.cfg.part_hash("data")
            else:
                s = self.splits
                h = hashlib.sha256(json.dumps(list(s.class_names)).encode())
                for name, part in (("train", s.train), ("val", s.val), ("test", s.test)):
                    for i, path, label in zip(part.ids, part.paths or [], part.labels.tolist()):
                        try:
                            st = os.stat(path)
                            stat = (st.st_size, st.st_mtime_ns)
                        except OSError:
                            stat = (-1, -1)
                        h.update(json.dumps([name, i, label, *stat]).encode())
                h.update(json.dumps([list(x) for x in s.skipped]).encode())
                self._data_fingerprint = h.hexdigest()[:16]
        return self._data_fingerprint

    def _stamp(self, step: str) -> dict:
        """``fingerprint`` and ``inputs`` of a step (see :meth:`drift.archive.Archive.commit`): its settings and the
        data, and from training on the environment (:meth:`_environment`)."""
        inputs = {"settings": self.cfg.step_hash(step), "data": self.data_fingerprint}
        if step != "data":
            inputs.update(self.environment)
        fingerprint = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
        return {"fingerprint": fingerprint, "inputs": inputs}

    @property
    def splits(self):
        if self._splits is None:
            from . import data

            d = self.cfg.data
            if d.source == "synthetic":
                self._splits = data.load_synthetic(d.n_train, d.n_val, d.n_test, d.image_size, self.cfg.data_seed,
                                                   d.difficulty, d.confounder)
            elif d.source == "folder":
                self._splits = data.load_folder(d.path, d.image_size, self.cfg.data_seed, d.val_fraction,
                                                d.test_fraction, d.skip_bad, classes=d.classes or None)
            else:
                self._splits = data.load_csv(d.path, d.image_size, self.cfg.data_seed, d.val_fraction,
                                             d.test_fraction, d.skip_bad, classes=d.classes or None)
        return self._splits

    @property
    def class_names(self) -> list[str]:
        return list(self.splits.test.class_names)

    def test_images(self, idx=None) -> torch.Tensor:
        return self.splits.test.images(idx)

    # ------------------------------------------------------------------ stages
    def run(self, steps: tuple[str, ...] = ALL_STEPS) -> Path:
        """Run (or resume) ``steps``; the output folder's lock is released when it returns or fails."""
        try:
            with distributed.guard():  # several processes: a failure on one rank stops every rank, named
                return self._run(steps)
        finally:
            self.lock.release()

    def _run(self, steps: tuple[str, ...]) -> Path:
        t0 = time.perf_counter()
        if "data" in steps:
            self.step_data()
        # Data (drawn or read on first use) and both training stages of every backbone, the later stages excluded.
        self.timings["data+training"] = time.perf_counter() - t0
        for arch in self.cfg.run.archs:
            self._check_input_size(arch)
            if "train" in steps:
                t_train = time.perf_counter()
                for stage in STAGES:
                    self.trained(arch, stage)
                self.timings["data+training"] += time.perf_counter() - t_train
            if "attributions" in steps:
                self.step_attributions(arch)
            if "drift" in steps:
                self.step_drift(arch)
            if "fisher" in steps and self.cfg.fisher.enabled:
                self.step_fisher(arch)
        if "stats" in steps:
            self.step_stats()
        if "baselines" in steps:
            self.step_baselines()
        self.timings["total"] = time.perf_counter() - t0
        if "report" in steps and self.cfg.report.enabled and distributed.is_main():
            self.step_report()
        return self.path

    def input_size(self, arch: str) -> int:
        """The side of the images ``arch`` sees: ``data.image_size`` times ``model.input_scale[arch]`` (default 1)."""
        return round(self.cfg.data.image_size * self.cfg.model.input_scale.get(arch, 1.0))

    def _check_input_size(self, arch: str) -> None:
        spec = get_spec(arch)
        size = self.input_size(arch)
        where = (f"data.image_size x model.input_scale.{arch}" if arch in self.cfg.model.input_scale
                 else "data.image_size")
        if size < spec.min_size:
            raise ValueError(f"{arch} needs input >= {spec.min_size} px; {where} = {size}")
        if size < spec.cam_min_size:
            warnings.warn(f"{arch} at {size} px: its CAM layer {spec.cam_layer!r} gives maps of 1 x 1 or 2 x 2; "
                          f"attribution metrics will be coarse (use >= {spec.cam_min_size} px)", stacklevel=2)

    def step_data(self) -> None:
        if not self._todo("data", "data"):
            return
        t0 = time.perf_counter()
        s = self.splits
        test = s.test
        log(f"data: {len(s.train)} train / {len(s.val)} val / {len(test)} test images, classes {self.class_names}")
        tree = {"test": {"ids": np.asarray(test.ids), "labels": test.labels}}
        if test.lung_masks is not None:
            tree["test"]["lung_masks"] = test.lung_masks.astype(bool)
        if test.lesion_masks is not None:
            tree["test"]["lesion_masks"] = test.lesion_masks.astype(bool)
        if (marker := _marker_masks(test)) is not None:
            tree["test"]["marker_masks"] = marker
        tree["counts"] = {"train": np.bincount(s.train.labels, minlength=len(self.class_names)),
                          "val": np.bincount(s.val.labels, minlength=len(self.class_names)),
                          "test": np.bincount(test.labels, minlength=len(self.class_names))}
        tree["skipped"] = {"files": np.asarray([f for f, _ in s.skipped] or [""])[: len(s.skipped)],
                           "reasons": np.asarray([r for _, r in s.skipped] or [""])[: len(s.skipped)]}
        with self.archive.commit("data", replace=("data",), started=t0, **self._stamp("data")) as f:
            g = f.require_group("data")
            g.attrs["class_names"] = json.dumps(self.class_names)
            g.attrs["n_skipped"] = len(s.skipped)
            write_tree(g, tree)

    # ---- weights
    def initial_model(self, arch: str) -> tuple[Classifier, str]:
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)
        side = self.input_size(arch)
        model = build(arch, len(self.class_names), cfg.model.dropout, 0 if side == cfg.data.image_size else side)
        w = cfg.model.weights
        if w == "none":
            # Random weights carry no BatchNorm statistics worth keeping (mean 0, variance 1 at every layer): a
            # frozen-BatchNorm stage would feed deep layers inputs that grow without bound. Estimate them once on
            # the training images, then keep them as the stage's config says.
            calibrate_bn(model.to(self.device), self.splits.train, self.device,
                         precision=cfg.train.transfer.for_arch(arch, "train.transfer").precision,
                         max_images=BN_CALIBRATION_IMAGES)
            return model, "random init (BatchNorm statistics of the training images)"
        if w == "imagenet":
            return model, load_imagenet(model, cfg.model.weights_file or None)
        if w == "synthetic-source":
            return model, self._source_weights(model)
        load_backbone_weights(model, load_state(w), w)
        return model, w

    def _source_weights(self, model: Classifier) -> str:
        """Load the synthetic-source backbone of ``model.arch`` into ``model`` (pretrained and cached on first use).

        Returns:
            The weights' origin: source task, its held-out accuracy, the pretraining run and the cache file; the
            same string whether the weights were pretrained now or read from the cache.
        """
        payload = source_weights.backbone(self.cfg, model.arch, self.device)
        path = source_weights.cache_path(self.cfg, model.arch)
        load_backbone_weights(model, payload, str(path))
        return source_weights.origin(payload["meta"], path)

    # ---- training
    def checkpoint_path(self, arch: str, stage: str, seed: int | None = None) -> Path:
        """Checkpoint file of (arch, stage); with ``seed``, of that seed replica of the stage."""
        return self.out / "checkpoints" / (f"{arch}-{stage}.pt" if seed is None else f"{arch}-{stage}-seed{seed}.pt")

    @staticmethod
    def model_name(arch: str, stage: str, seed: int | None = None) -> str:
        """Archive group of a trained model: ``models/<arch>/<stage>``, or ``replicas/<arch>/<stage>/seed<seed>``
        for a seed replica (:mod:`drift.baselines`)."""
        return f"models/{arch}/{stage}" if seed is None else f"replicas/{arch}/{stage}/seed{seed}"

    def trained(self, arch: str, stage: str, seed: int | None = None) -> Trained:
        """The model of (arch, stage): reloaded from its checkpoint when that stage is committed, else trained.

        With ``seed``, the seed replica of the stage: the same stage trained again from the same starting point (the
        initial weights for ``transfer``, the run's own transfer checkpoint for ``finetune``) with training seed
        ``seed`` in place of ``run.seed``; ``seed = run.seed`` reproduces the run's own model.
        """
        key = (arch, stage) if seed is None else (arch, stage, seed)
        if key in self._models:
            return self._models[key]
        name = self.model_name(arch, stage, seed)
        ckpt = self.checkpoint_path(arch, stage, seed)
        if not self._todo(name, "train"):
            reader = ArchiveReader(self.path)
            attrs = reader.read(name)
            # Rank 0's verdict for every rank: a rank that cannot read the checkpoint then fails naming it.
            if distributed.broadcast(ckpt.is_file() and sha256_file(ckpt) == attrs.get("sha256")
                                     if distributed.is_main() else None):
                model = load_checkpoint(ckpt, arch, len(self.class_names), self.cfg.model.dropout).to(self.device)
                model.eval()
                t = attrs["test"]
                ev = evaluation_from_logits(np.asarray(t["logits"]), np.asarray(t["labels"]))
                self._models[key] = Trained(model, ev)
                return self._models[key]
            warnings.warn(f"{name}: checkpoint {ckpt} missing or changed; training this stage again", stacklevel=2)
        return self._train(arch, stage, seed)

    def _train(self, arch: str, stage: str, replica: int | None = None) -> Trained:
        t0 = time.perf_counter()
        cfg, s = self.cfg, self.splits
        seed = cfg.run.seed if replica is None else replica
        what = f"{arch} {stage}" + ("" if replica is None else f" (seed replica {replica})")
        st = getattr(cfg.train, stage).for_arch(arch, f"train.{stage}")
        if stage == "transfer":
            model, origin = self.initial_model(arch)
            log(f"{what}: weights {origin}")
            res = train_transfer(model, s.train, s.val, st, self.device, seed, cfg.run.progress, what)
            bn_frozen = True
        else:
            self.trained(arch, "transfer")  # make sure stage 1 is committed first
            model = load_checkpoint(self.checkpoint_path(arch, "transfer"), arch, len(self.class_names),
                                    cfg.model.dropout)
            origin = "transfer checkpoint"
            res = train_finetune(model, s.train, s.val, st, self.device, seed + 1, cfg.run.progress, what)
            bn_frozen = st.bn_frozen
        ev = evaluate(model, s.test, self.device, progress=cfg.run.progress)
        ckpt = self.checkpoint_path(arch, stage, replica)
        sha = save_checkpoint(model, ckpt, {"stage": stage, "seed": seed}) if distributed.is_main() else ""
        log(f"{what}: test accuracy {ev.accuracy:.3f}, macro AUC {ev.macro_auc:.3f} "
            f"(best epoch {res.best_epoch + 1}, {res.seconds:.0f} s)")
        name = self.model_name(arch, stage, replica)
        with self.archive.commit(name, replace=(name,), started=t0, **self._stamp("train")) as f:
            g = f.require_group(name)
            write_tree(g, {"history": res.history, "test": ev.to_dict()})
            g.attrs.update({"checkpoint": str(ckpt), "sha256": sha, "best_epoch": res.best_epoch,
                            "best_val_auc": res.best_val_auc, "bn_frozen": bn_frozen, "weights": origin,
                            "seconds": res.seconds, "precision": res.precision, "seed": seed,
                            "schedule": st.schedule, "epochs": st.epochs, "lr": st.lr, "batch_size": st.batch_size,
                            "input_size": self.input_size(arch), "processes": distributed.world_size(),
                            "sync_bn": bool(st.sync_bn and not bn_frozen and distributed.world_size() > 1)})
        key = (arch, stage) if replica is None else (arch, stage, replica)
        self._models[key] = Trained(model, ev)
        return self._models[key]

    # ---- attributions
    def targets(self, arch: str, stage: str) -> np.ndarray:
        if self.cfg.attribution.target == "true":
            return self.splits.test.labels
        return self.trained(arch, stage).evaluation.predictions

    def step_attributions(self, arch: str) -> None:
        """Raw CAMs of every method, layer and score, for both checkpoints, from one forward pass and one backward
        pass per score and batch (:func:`drift.attribution.cams_multi`)."""
        name = f"attributions/{arch}"
        if not self._todo(name, "attributions"):
            return
        from .models import cam_layer_name, keras_layer_name

        acfg = self.cfg.attribution
        t0 = time.perf_counter()
        tree: dict = {"targets": {}}
        for stage in STAGES:
            tgt = self.targets(arch, stage)
            res = self.cams(self.trained(arch, stage).model, tgt, f"{arch} {stage} CAMs")
            for (layer, score), by_method in res.items():
                for m, v in by_method.items():
                    tree.setdefault(layer, {}).setdefault(score, {}).setdefault(stage, {})[m] = v
            tree["targets"][stage] = np.asarray(tgt)
        with self.archive.commit(name, replace=(name,), started=t0, **self._stamp("attributions")) as f:
            g = f.require_group(name)
            write_tree(g, tree)
            g.attrs.update({"target": acfg.target, "eps": acfg.eps, "methods": json.dumps(list(acfg.methods)),
                            "scores": json.dumps(list(acfg.scores))})
            for layer in acfg.layers:
                grid = tree[layer][acfg.scores[0]]["transfer"][acfg.methods[0]].shape[1:]
                g[layer].attrs.update({"module": cam_layer_name(arch, layer),
                                       "keras": keras_layer_name(arch, layer) or "", "grid": list(grid)})
        self.timings[name] = time.perf_counter() - t0
        first = {layer: tree[layer][acfg.scores[0]]["transfer"][acfg.methods[0]] for layer in acfg.layers}
        grids = ", ".join(f"{layer} {'x'.join(map(str, m.shape[1:]))}" for layer, m in first.items())
        log(f"{arch}: attribution maps ({grids}) for {len(acfg.methods)} methods x {len(acfg.scores)} scores x "
            f"2 checkpoints in {self.timings[name]:.0f} s")

    def cams(self, model, targets: np.ndarray, desc: str = "CAMs") -> dict[tuple[str, str], dict[str, np.ndarray]]:
        """The run's CAMs of ``model`` on every test image (every method, layer and score of ``attribution``) for
        the class ``targets`` (N,): ``{(layer, score): {method: (N, h, w) float32}}``, from one forward pass and one
        backward pass per score and batch (:func:`drift.attribution.cams_multi`); batches shared out among the
        processes of a distributed run and gathered in order."""
        from tqdm.auto import tqdm

        from .attribution import cams_multi

        acfg = self.cfg.attribution
        n = len(self.splits.test)
        tgt = torch.as_tensor(targets)
        parts: dict[tuple[str, str, str], list[torch.Tensor]] = {}
        for lo in tqdm(distributed.my_batches(range(0, n, acfg.batch_size)), desc=desc,
                       disable=not self.cfg.run.progress, leave=False):
            idx = np.arange(lo, min(n, lo + acfg.batch_size))
            res = cams_multi(model, self.test_images(idx).to(self.device), tgt[idx].to(self.device),
                             methods=tuple(acfg.methods), layers=tuple(acfg.layers), scores=tuple(acfg.scores),
                             eps=acfg.eps)
            for (layer, score), by_method in res.items():
                for m, v in by_method.items():
                    parts.setdefault((layer, score, m), []).append(v.float().cpu())
        parts = distributed.gather_batches(parts)  # several processes: every rank's batches, in order
        out: dict = {}
        for (layer, score, m), p in parts.items():
            out.setdefault((layer, score), {})[m] = torch.cat(p).numpy().astype(np.float32)
        return out

    # ---- drift metrics
    def step_drift(self, arch: str) -> None:
        """Per-image drift metrics TL -> FT for every cell of the protocol grid and every method, over all test
        images (the sample set is a mask), and the per-image agreement between methods of one checkpoint."""
        name = f"drift/{arch}"
        if not self._todo(name, "drift"):
            return
        from . import stats
        from .attribution import normalize, upsample
        from .metrics import pair_metrics, pearson

        t0 = time.perf_counter()
        mcfg, acfg = self.cfg.metrics, self.cfg.attribution
        reader = ArchiveReader(self.path)
        test = self.splits.test
        size = tuple(test.images([0]).shape[-2:])
        lung, lesion, marker = self.masks()
        n_classes = len(self.class_names)
        selected = self.sample_mask(arch, mcfg.sample_set)
        tree: dict = {}
        for layer in acfg.layers:
            for score in acfg.scores:
                up = {(st, m): upsample(torch.as_tensor(reader.maps(arch, st, m, layer, score)), size)
                      for st in STAGES for m in acfg.methods}
                cell = tree.setdefault(layer, {}).setdefault(score, {})
                cell["agreement"] = {st: {f"{m1} vs {m2}": pearson(up[st, m1], up[st, m2]).cpu().numpy()
                                          for i, m1 in enumerate(acfg.methods) for m2 in acfg.methods[i + 1:]}
                                     for st in STAGES}
                for norm in mcfg.normalize:
                    for method in acfg.methods:
                        a, b = normalize(up["transfer", method], norm), normalize(up["finetune", method], norm)
                        cell.setdefault(norm, {})[method] = self._pair_tree(a, b, lung, lesion, marker, selected,
                                                                            n_classes, stats, pair_metrics)
        with self.archive.commit(name, replace=(name,), started=t0, **self._stamp("drift")) as f:
            g = f.require_group(name)
            write_tree(g, tree)
            g.attrs["sample_set"] = mcfg.sample_set
            g.attrs["n_selected"] = int(selected.sum())
        self.timings[name] = time.perf_counter() - t0
        n_cells = len(acfg.layers) * len(acfg.scores) * len(mcfg.normalize)
        log(f"{arch}: drift metrics of {n_cells} protocol cells x {len(acfg.methods)} methods in "
            f"{self.timings[name]:.0f} s")

    def masks(self, n: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Lung, lesion and shortcut-marker masks of the first ``n`` test images (all when None), each None when
        the data has none: what the localisation metrics of :func:`drift.metrics.pair_metrics` score against."""
        test = self.splits.test
        marker = _marker_masks(test)
        return tuple(torch.as_tensor(m[:n]) if m is not None else None
                     for m in (test.lung_masks, test.lesion_masks, marker))

    def _pair_tree(self, a, b, lung, lesion, marker, selected, n_classes, stats, pair_metrics, n=None) -> dict:
        """Per-image metrics of map pairs (a TL, b FT) and their summaries over the selected, valid images (the
        first ``n`` test images when given, else all)."""
        test = self.splits.test
        labels, ids = test.labels[:n], np.asarray(test.ids)[:n]
        mcfg = self.cfg.metrics
        per = distributed.by_images(pair_metrics, len(a), a, b, lung_mask=lung, lesion_mask=lesion,
                                    fractions=tuple(mcfg.fractions), marker_mask=marker)
        per = {k: v.cpu().numpy() for k, v in per.items()}
        valid = per.pop("valid").astype(bool)
        deg = {"transfer": per.pop("degenerate_tl"), "finetune": per.pop("degenerate_ft")}
        use = selected & valid
        summary = {}
        for metric, values in per.items():
            agg = stats.aggregate(np.where(use, values, np.nan), labels, n_classes, mcfg.n_boot,
                                  self.cfg.run.seed, min_per_class=mcfg.min_per_class)
            summary[metric] = as_tree(agg)
        for q in ("entropy", "gini", "top10_mass", "lung_mass", "lesion_energy", "marker_mass"):
            tl, ft = per.get(f"{q}_tl"), per.get(f"{q}_ft")
            if tl is not None and ft is not None:
                summary.setdefault("paired", {})[q] = as_tree(stats.paired_test(tl[use], ft[use]))
        return {"per_sample": {**per, "ids": ids, "labels": labels, "valid": valid,
                               "selected": selected},
                "degenerate": deg, "summary": summary}

    def sample_mask(self, arch: str | None, rule: str) -> np.ndarray:
        """The images a statistic uses (N,) bool: ``rule`` applied to ``arch``'s checkpoints, or with ``tp_all`` to
        every architecture of the run (correct under both checkpoints of each: one common sample)."""
        from . import stats

        labels = self.splits.test.labels
        if rule == "tp_all":
            preds = [(self.trained(a, "transfer").evaluation.predictions,
                      self.trained(a, "finetune").evaluation.predictions) for a in self.cfg.run.archs]
            return stats.common_sample(labels, preds)
        return stats.select_samples(labels, self.trained(arch, "transfer").evaluation.predictions,
                                    self.trained(arch, "finetune").evaluation.predictions, rule)

    # ---- iFIM
    def step_fisher(self, arch: str) -> None:
        name = f"fisher/{arch}"
        if not self._todo(name, "fisher"):
            return
        from .ifim_study import ifim_study

        fc = self.cfg.fisher
        test = self.splits.test
        n = len(test) if fc.n_spectrum <= 0 else min(fc.n_spectrum, len(test))
        m = min(fc.n_components, len(test))
        comp_idx = np.arange(m)
        t0 = time.perf_counter()
        tree = {}
        for stage in STAGES:
            model = self.trained(arch, stage).model.eval()
            # One Jacobian per batch serves the spectra (first n images), components and perturbations (first m).
            st = ifim_study(model, lambda idx: self.test_images(idx).to(self.device), test.labels[comp_idx], n, m,
                            schedule=distributed.my_batches, gather=distributed.gather_batches,
                            eps_grid=fc.eps_grid, alphas=fc.alphas, energy=fc.energy, head=fc.head,
                            n_draws=fc.n_draws, seed=self.cfg.run.seed, batch_size=fc.batch_size)
            eig_t, pert = st.eigenvalues, st.perturbation
            share = eig_t / eig_t.sum(1, keepdim=True).clamp_min(1e-300)
            tree[stage] = {"eigenvalues": eig_t.numpy(), "eigen_share": share.numpy(),
                           "rank": st.rank.numpy(), "probs": st.probs.numpy(),
                           "ids": np.asarray(test.ids[:n]), "perturbation": pert.to_arrays(),
                           "summary": as_tree(pert.summary())}
            x_all, high_all = st.x, st.x_high.float()
            tree[stage]["components"] = {"ids": np.asarray([test.ids[i] for i in comp_idx]),
                                         "x": x_all.numpy().astype(np.float16),
                                         "x_high": high_all.numpy().astype(np.float32),
                                         "x_low": (x_all - high_all).numpy().astype(np.float32),
                                         "k": st.components.k.numpy(),
                                         "energy_share": st.components.energy_share.numpy()}
        with self.archive.commit(name, replace=(name,), started=t0, **self._stamp("fisher")) as f:
            write_tree(f.require_group(name), tree)
        self.timings[name] = time.perf_counter() - t0
        log(f"{arch}: iFIM spectra of {n} images and perturbations of {min(fc.n_components, len(test))} "
            f"per checkpoint in {self.timings[name]:.0f} s")

    # ---- statistics across architectures
    def step_stats(self) -> None:
        """Rank architectures by stability under each method in every cell of the protocol grid, on one sample
        (``metrics.ranking_sample_set``), with paired bootstrap probabilities of a reversal; store the run's
        headline numbers and example images for the readers (:mod:`drift.headline`)."""
        if not self._todo("stats", "stats"):
            return
        from . import headline, stats
        from .archive import Cell

        t0 = time.perf_counter()
        mcfg, acfg = self.cfg.metrics, self.cfg.attribution
        reader = ArchiveReader(self.path)
        archs = [a for a in self.cfg.run.archs if reader.has(f"drift/{a}")]
        labels = self.splits.test.labels
        n_classes = len(self.class_names)
        ranked = (self.sample_mask(archs[0], mcfg.ranking_sample_set) if archs
                  else np.zeros(len(labels), dtype=bool))
        tree: dict = {}
        for layer in acfg.layers if len(archs) > 1 else ():  # ranking needs two architectures
            for score in acfg.scores:
                for norm in mcfg.normalize:
                    cell = Cell(layer, score, norm)
                    out = tree.setdefault(layer, {}).setdefault(score, {}).setdefault(norm, {})
                    for metric in mcfg.ranking_metrics:
                        out[metric.replace("/", "_")] = self._rank(reader, cell, metric, archs, ranked, n_classes,
                                                                   stats)
        verdict = headline.grid_verdict(tree, acfg.methods, mcfg.ranking_metrics)
        counts = np.bincount(labels[ranked], minlength=n_classes) if ranked.any() else np.zeros(n_classes, int)
        numbers = headline.compute(reader, mcfg.n_boot, self.cfg.run.seed)
        examples = headline.examples(reader, lambda idx: self.test_images(idx).numpy(), self.cfg.report.n_examples)
        with self.archive.commit("stats", replace=("stats",), started=t0, **self._stamp("stats")) as f:
            g = f.require_group("stats")
            write_tree(g.require_group("ranking"), tree)
            write_tree(g, {"headline": numbers, "examples": examples})
            write_tree(g, {"ranked": ranked})
            g.attrs.update({"ranking_sample_set": mcfg.ranking_sample_set, "n_ranked": int(ranked.sum()),
                            "n_ranked_per_class": json.dumps(counts.tolist()), "min_per_class": mcfg.min_per_class,
                            "verdict": verdict})
        log(f"stats: architectures ranked on {int(ranked.sum())} images ({mcfg.ranking_sample_set}); {verdict}")

    def _rank(self, reader, cell, metric: str, archs: list[str], ranked: np.ndarray, n_classes: int, stats) -> dict:
        from .metrics import stability

        values = {}
        for arch in archs:
            values[arch] = {}
            for method in self.cfg.attribution.methods:
                per = reader.drift(arch, method, cell)
                if metric not in per:
                    raise KeyError(f"metrics.ranking_metrics: no metric {metric!r}; "
                                   f"available: {sorted(k for k in per if k not in ('ids', 'labels'))}")
                use = ranked & per["valid"].astype(bool)
                values[arch][method] = (np.where(use, per[metric], np.nan), per["labels"])
        higher, absolute = stability(metric, self.cfg.metrics.fractions)
        try:
            m = self.cfg.metrics
            return as_tree(stats.rank_reversal(values, n_classes, higher_is_stable=higher, n_boot=m.n_boot,
                                                seed=self.cfg.run.seed, absolute=absolute,
                                                min_per_class=m.min_per_class))
        except ValueError as exc:  # e.g. no image of an architecture left: record why, keep the rest
            warnings.warn(f"ranking by {metric} in cell ({cell}): {exc}", stacklevel=2)
            return {"unranked": str(exc)}

    def step_baselines(self) -> None:
        """Seed floors and the randomisation check (:func:`drift.baselines.run_step`; off unless configured)."""
        from .baselines import run_step

        run_step(self)

    def step_report(self) -> None:
        try:
            from .report import write_report
        except ImportError:
            return
        path = write_report(self.path, self.out / "report")
        log(f"report: {path}")


def _marker_masks(test) -> np.ndarray | None:
    """The test split's shortcut-marker masks (bool), or None when the confounder is off or masks are unknown."""
    m = test.marker_masks
    return m.astype(bool) if m is not None and m.any() else None
