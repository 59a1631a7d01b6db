"""The stages of ``drift run``: data -> (per architecture) weights, transfer, fine-tuning, attributions,
drift metrics, iFIM -> statistics across architectures -> report.

Each stage commits its outputs to the archive as soon as it finishes (see :mod:`drift.archive`), and a re-run
with the same config skips the stages already committed: checkpoints are reloaded (their sha256 checked) and
the later stages resume where the last run stopped.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .archive import Archive, ArchiveReader, write_tree
from .config import Config, StageConfig
from .models import (
    Classifier,
    build,
    get_spec,
    load_backbone_weights,
    load_checkpoint,
    load_imagenet,
    load_state,
    save_checkpoint,
    sha256_file,
)
from .train import (
    BN_CALIBRATION_IMAGES,
    Evaluation,
    calibrate_bn,
    evaluate,
    evaluation_from_logits,
    pretrain_source,
    resolve_device,
    train_finetune,
    train_transfer,
)

STAGES = ("transfer", "finetune")
ALL_STEPS = ("data", "train", "attributions", "drift", "fisher", "stats", "report")


def log(msg: str) -> None:
    print(msg, flush=True)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                             capture_output=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(cfg: Config, device: torch.device) -> dict:
    import h5py
    import timm

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "seed": cfg.run.seed,
        "data_seed": cfg.data_seed,
        "git_commit": git_commit(),
        "device": f"{device} ({dev_name})",
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "timm": timm.__version__,
                     "h5py": h5py.__version__, "numpy": np.__version__, "drift": __version__},
    }


@dataclass
class Trained:
    model: Classifier
    evaluation: Evaluation


class Pipeline:
    """Runs (and resumes) one study described by a :class:`Config` into ``<out>/archive.h5``."""

    def __init__(self, cfg: Config, fresh: bool = False, force: tuple[str, ...] = ()):
        self.cfg = cfg
        self.out = Path(cfg.run.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "archive.h5"
        if fresh and self.path.exists():
            self.path.unlink()
        self.device = resolve_device(cfg.run.device)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.archive = Archive(self.path, cfg.to_toml(), cfg.science_hash(), provenance(cfg, self.device))
        self.force = set(force)
        self._splits = None
        self._models: dict[tuple[str, str], Trained] = {}
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    def _todo(self, name: str, step: str) -> bool:
        return step in self.force or not self.archive.done(name)

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
                                                d.test_fraction, d.skip_bad)
            else:
                self._splits = data.load_csv(d.path, d.image_size, self.cfg.data_seed, d.val_fraction,
                                             d.test_fraction, d.skip_bad)
        return self._splits

    @property
    def class_names(self) -> list[str]:
        return list(self.splits.test.class_names)

    def test_images(self, idx=None) -> torch.Tensor:
        return self.splits.test.images(idx)

    # ------------------------------------------------------------------ stages
    def run(self, steps: tuple[str, ...] = ALL_STEPS) -> Path:
        t0 = time.perf_counter()
        if "data" in steps:
            self.stage_data()
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
                self.stage_attributions(arch)
            if "drift" in steps:
                self.stage_drift(arch)
            if "fisher" in steps and self.cfg.fisher.enabled:
                self.stage_fisher(arch)
        if "stats" in steps:
            self.stage_stats()
        self.timings["total"] = time.perf_counter() - t0
        if "report" in steps and self.cfg.report.enabled:
            self.stage_report()
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

    def stage_data(self) -> None:
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
        with self.archive.stage("data", replace=("data",), started=t0) as f:
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
        from .data import make_source

        cfg = self.cfg
        key = json.dumps({"arch": model.arch, "size": cfg.data.image_size, "source": vars(cfg.source), "recipe": 3,
                          "seed": cfg.run.seed}, sort_keys=True)
        import hashlib

        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        path = Path(cfg.model.cache_dir) / "source" / f"{model.arch}-{cfg.data.image_size}px-{digest}.pt"
        if path.is_file():
            load_backbone_weights(model, load_state(path), str(path))
            log(f"{model.arch}: synthetic-source weights from cache {path}")
            return f"synthetic-source (cached {path.name})"
        src = make_source(cfg.source.n_train, cfg.data.image_size, cfg.run.seed + 7919)
        st = StageConfig(epochs=cfg.source.epochs, lr=cfg.source.lr, batch_size=cfg.source.batch_size,
                         patience=cfg.source.epochs)
        t0 = time.perf_counter()
        res = pretrain_source(model, src, len(src.class_names), st, self.device, cfg.run.seed, cfg.run.progress)
        calibrate_bn(model, src, self.device)  # exact statistics of the final weights, not a running average
        log(f"{model.arch}: synthetic-source pretraining, {len(res.history['epoch'])} epochs, "
            f"final loss {res.history['train_loss'][-1]:.3f}, {time.perf_counter() - t0:.0f} s")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"state_dict": model.backbone.state_dict()}, tmp)
        tmp.replace(path)
        return f"synthetic-source (trained, cached {path.name})"

    # ---- training
    def checkpoint_path(self, arch: str, stage: str) -> Path:
        return self.out / "checkpoints" / f"{arch}-{stage}.pt"

    def trained(self, arch: str, stage: str) -> Trained:
        """The model of (arch, stage): reloaded from its checkpoint when that stage is committed, else trained."""
        if (arch, stage) in self._models:
            return self._models[(arch, stage)]
        name = f"models/{arch}/{stage}"
        ckpt = self.checkpoint_path(arch, stage)
        if not self._todo(name, "train"):
            reader = ArchiveReader(self.path)
            attrs = reader.read(name)
            if ckpt.is_file() and sha256_file(ckpt) == attrs.get("sha256"):
                model = load_checkpoint(ckpt, arch, len(self.class_names), self.cfg.model.dropout).to(self.device)
                model.eval()
                t = attrs["test"]
                ev = evaluation_from_logits(np.asarray(t["logits"]), np.asarray(t["labels"]))
                self._models[(arch, stage)] = Trained(model, ev)
                return self._models[(arch, stage)]
            warnings.warn(f"{name}: checkpoint {ckpt} missing or changed; training this stage again", stacklevel=2)
        return self._train(arch, stage)

    def _train(self, arch: str, stage: str) -> Trained:
        t0 = time.perf_counter()
        cfg, s = self.cfg, self.splits
        seed = cfg.run.seed
        st = getattr(cfg.train, stage).for_arch(arch, f"train.{stage}")
        if stage == "transfer":
            model, origin = self.initial_model(arch)
            log(f"{arch}: weights {origin}")
            res = train_transfer(model, s.train, s.val, st, self.device, seed, cfg.run.progress,
                                 f"{arch} transfer")
            bn_frozen = True
        else:
            model = load_checkpoint(self.checkpoint_path(arch, "transfer"), arch, len(self.class_names),
                                    cfg.model.dropout)
            self.trained(arch, "transfer")  # make sure stage 1 is committed first
            origin = "transfer checkpoint"
            res = train_finetune(model, s.train, s.val, st, self.device, seed + 1,
                                 cfg.run.progress, f"{arch} finetune")
            bn_frozen = st.bn_frozen
        ev = evaluate(model, s.test, self.device, progress=cfg.run.progress)
        ckpt = self.checkpoint_path(arch, stage)
        sha = save_checkpoint(model, ckpt, {"stage": stage, "seed": seed})
        log(f"{arch} {stage}: test accuracy {ev.accuracy:.3f}, macro AUC {ev.macro_auc:.3f} "
            f"(best epoch {res.best_epoch + 1}, {res.seconds:.0f} s)")
        name = f"models/{arch}/{stage}"
        with self.archive.stage(name, replace=(name,), started=t0) as f:
            g = f.require_group(name)
            write_tree(g, {"history": res.history, "test": ev.to_dict()})
            g.attrs.update({"checkpoint": str(ckpt), "sha256": sha, "best_epoch": res.best_epoch,
                            "best_val_auc": res.best_val_auc, "bn_frozen": bn_frozen, "weights": origin,
                            "seconds": res.seconds, "precision": res.precision,
                            "schedule": st.schedule, "epochs": st.epochs, "lr": st.lr, "batch_size": st.batch_size,
                            "input_size": self.input_size(arch)})
        self._models[(arch, stage)] = Trained(model, ev)
        return self._models[(arch, stage)]

    # ---- attributions
    def targets(self, arch: str, stage: str) -> np.ndarray:
        if self.cfg.attribution.target == "true":
            return self.splits.test.labels
        return self.trained(arch, stage).evaluation.predictions

    def stage_attributions(self, arch: str) -> None:
        name = f"attributions/{arch}"
        if not self._todo(name, "attributions"):
            return
        from .attribution import cams

        acfg = self.cfg.attribution
        t0 = time.perf_counter()
        out: dict[str, dict[str, np.ndarray]] = {}
        for stage in STAGES:
            model = self.trained(arch, stage).model
            tgt = torch.as_tensor(self.targets(arch, stage))
            maps: dict[str, list[torch.Tensor]] = {m: [] for m in acfg.methods}
            n = len(self.splits.test)
            from tqdm.auto import tqdm

            for lo in tqdm(range(0, n, acfg.batch_size), desc=f"{arch} {stage} CAMs", disable=not self.cfg.run.progress,
                           leave=False):
                idx = np.arange(lo, min(n, lo + acfg.batch_size))
                x = self.test_images(idx).to(self.device)
                res = cams(model, x, tgt[idx].to(self.device), methods=tuple(acfg.methods), eps=acfg.eps)
                for m in acfg.methods:
                    maps[m].append(res[m].float().cpu())
            out[stage] = {m: torch.cat(v).numpy().astype(np.float32) for m, v in maps.items()}
            out[stage]["targets"] = np.asarray(tgt)
        with self.archive.stage(name, replace=(name,), started=t0) as f:
            g = f.require_group(name)
            write_tree(g, out)
            g.attrs.update({"layer": get_spec(arch).cam_layer, "target": acfg.target, "eps": acfg.eps})
        self.timings[name] = time.perf_counter() - t0
        log(f"{arch}: attribution maps {out['transfer'][acfg.methods[0]].shape[1:]} for {len(acfg.methods)} "
            f"methods x 2 checkpoints in {self.timings[name]:.0f} s")

    # ---- drift metrics
    def stage_drift(self, arch: str) -> None:
        name = f"drift/{arch}"
        if not self._todo(name, "drift"):
            return
        from . import stats
        from .attribution import upsample
        from .metrics import pair_metrics

        t0 = time.perf_counter()
        reader = ArchiveReader(self.path)
        test = self.splits.test
        size = tuple(test.images([0]).shape[-2:])
        lung = torch.as_tensor(test.lung_masks) if test.lung_masks is not None else None
        lesion = torch.as_tensor(test.lesion_masks) if test.lesion_masks is not None else None
        marker = _marker_masks(test)
        marker = torch.as_tensor(marker) if marker is not None else None
        pred_tl = self.trained(arch, "transfer").evaluation.predictions
        pred_ft = self.trained(arch, "finetune").evaluation.predictions
        selected = stats.select_samples(test.labels, pred_tl, pred_ft, self.cfg.metrics.sample_set)
        tree = {}
        for method in self.cfg.attribution.methods:
            a = upsample(torch.as_tensor(reader.maps(arch, "transfer", method)), size)
            b = upsample(torch.as_tensor(reader.maps(arch, "finetune", method)), size)
            per = pair_metrics(a, b, lung_mask=lung, lesion_mask=lesion, fractions=tuple(self.cfg.metrics.fractions),
                               marker_mask=marker)
            per = {k: v.cpu().numpy() for k, v in per.items()}
            valid = per.pop("valid").astype(bool)
            deg = {"transfer": per.pop("degenerate_tl"), "finetune": per.pop("degenerate_ft")}
            use = selected & valid
            summary = {}
            for metric, values in per.items():
                agg = stats.aggregate(np.where(use, values, np.nan), test.labels, len(self.class_names),
                                      self.cfg.metrics.n_boot, self.cfg.run.seed)
                summary[metric] = _as_tree(agg)
            for q in ("entropy", "gini", "top10_mass", "lung_mass", "lesion_energy", "marker_mass"):
                tl, ft = per.get(f"{q}_tl"), per.get(f"{q}_ft")
                if tl is not None and ft is not None:
                    summary.setdefault("paired", {})[q] = _as_tree(stats.paired_test(tl[use], ft[use]))
            tree[method] = {"per_sample": {**per, "ids": np.asarray(test.ids), "labels": test.labels,
                                           "valid": valid, "selected": selected},
                            "degenerate": deg, "summary": summary}
        with self.archive.stage(name, replace=(name,), started=t0) as f:
            g = f.require_group(name)
            write_tree(g, tree)
            g.attrs["sample_set"] = self.cfg.metrics.sample_set
            g.attrs["n_selected"] = int(selected.sum())

    # ---- iFIM
    def stage_fisher(self, arch: str) -> None:
        name = f"fisher/{arch}"
        if not self._todo(name, "fisher"):
            return
        from .fisher import decompose, ifim
        from .perturb import run_perturbations

        fc = self.cfg.fisher
        test = self.splits.test
        n = len(test) if fc.n_spectrum <= 0 else min(fc.n_spectrum, len(test))
        t0 = time.perf_counter()
        tree = {}
        for stage in STAGES:
            model = self.trained(arch, stage).model.eval()
            eig, rank, probs = [], [], []
            for lo in range(0, n, fc.batch_size):
                idx = np.arange(lo, min(n, lo + fc.batch_size))
                res = ifim(model, self.test_images(idx).to(self.device), head=fc.head)
                eig.append(res.eigenvalues.double().cpu())
                rank.append(res.rank.cpu())
                probs.append(res.probs.double().cpu())
            eig_t = torch.cat(eig)
            share = eig_t / eig_t.sum(1, keepdim=True).clamp_min(1e-300)
            m = min(fc.n_components, len(test))
            comp_idx = np.arange(m)
            pert = run_perturbations(model, self.test_images(comp_idx).to(self.device),
                                     torch.as_tensor(test.labels[comp_idx]).to(self.device), fc.eps_grid, fc.alphas,
                                     energy=fc.energy, head=fc.head, n_draws=fc.n_draws, seed=self.cfg.run.seed,
                                     batch_size=fc.batch_size)
            tree[stage] = {"eigenvalues": eig_t.numpy(), "eigen_share": share.numpy(),
                           "rank": torch.cat(rank).numpy(), "probs": torch.cat(probs).numpy(),
                           "ids": np.asarray(test.ids[:n]), "perturbation": pert.to_arrays(),
                           "summary": _as_tree(pert.summary())}
            xs, highs, ks, shares = [], [], [], []
            for lo in range(0, m, fc.batch_size):
                x = self.test_images(comp_idx[lo:lo + fc.batch_size]).to(self.device)
                x_high, _, info = decompose(model, x, energy=fc.energy, head=fc.head)
                xs.append(x.cpu())
                highs.append(x_high.detach().float().cpu())
                ks.append(info.k.cpu())
                shares.append(info.energy_share.cpu())
            x_all, high_all = torch.cat(xs), torch.cat(highs)
            tree[stage]["components"] = {"ids": np.asarray([test.ids[i] for i in comp_idx]),
                                         "x": x_all.numpy().astype(np.float16),
                                         "x_high": high_all.numpy().astype(np.float32),
                                         "x_low": (x_all - high_all).numpy().astype(np.float32),
                                         "k": torch.cat(ks).numpy(), "energy_share": torch.cat(shares).numpy()}
        with self.archive.stage(name, replace=(name,), started=t0) as f:
            write_tree(f.require_group(name), tree)
        self.timings[name] = time.perf_counter() - t0
        log(f"{arch}: iFIM spectra of {n} images and perturbations of {min(fc.n_components, len(test))} "
            f"per checkpoint in {self.timings[name]:.0f} s")

    # ---- statistics across architectures
    def stage_stats(self) -> None:
        if not self._todo("stats", "stats"):
            return
        from . import stats

        t0 = time.perf_counter()
        reader = ArchiveReader(self.path)
        archs = [a for a in self.cfg.run.archs if reader.has(f"drift/{a}")]
        methods = self.cfg.attribution.methods
        tree = {}
        for metric in self.cfg.metrics.ranking_metrics:
            values = {}
            for arch in archs:
                values[arch] = {}
                for method in methods:
                    per = reader.drift(arch, method)
                    if metric not in per:
                        raise KeyError(f"metrics.ranking_metrics: no metric {metric!r}; "
                                       f"available: {sorted(k for k in per if k not in ('ids', 'labels'))}")
                    use = per["selected"].astype(bool) & per["valid"].astype(bool)
                    values[arch][method] = (np.where(use, per[metric], np.nan), per["labels"])
            higher, absolute = stats.stability(metric)
            try:
                rr = _as_tree(stats.rank_reversal(values, len(self.class_names), higher_is_stable=higher,
                                                  n_boot=self.cfg.metrics.n_boot, seed=self.cfg.run.seed,
                                                  absolute=absolute))
            except ValueError as exc:  # e.g. no selected sample of an architecture: record why, keep the rest
                warnings.warn(f"ranking by {metric}: {exc}", stacklevel=2)
                rr = {"unranked": str(exc)}
            tree[metric.replace("/", "_")] = rr
        with self.archive.stage("stats", replace=("stats",), started=t0) as f:
            write_tree(f.require_group("stats/ranking"), tree)

    def stage_report(self) -> None:
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


def _as_tree(obj) -> dict:
    """A stats/perturbation result (dataclass, dict, tuple) as a tree of arrays and scalars for the archive."""
    import dataclasses

    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            k = " vs ".join(map(str, k)) if isinstance(k, tuple) else k
            if isinstance(v, dict) or dataclasses.is_dataclass(v):
                out[str(k)] = _as_tree(v)
            elif isinstance(v, (list, tuple)) and v and isinstance(v[0], str):
                out[str(k)] = json.dumps(list(v))
            elif torch.is_tensor(v):
                out[str(k)] = v.detach().cpu().numpy()
            elif v is None:
                continue
            else:
                out[str(k)] = v
        return out
    return {"value": obj}
