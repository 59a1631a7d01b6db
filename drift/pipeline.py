"""The steps of ``drift run``: data -> (per architecture) weights, transfer, fine-tuning, attributions,
drift metrics, iFIM -> statistics across architectures -> report.

Each step commits its outputs to the archive as soon as a unit of its work finishes (see :mod:`drift.archive`),
and a re-run with the same config skips what is already committed: checkpoints are reloaded (their sha256 checked)
and the later steps resume where the last run stopped.

:class:`Pipeline` holds what the steps share (data, trained models, archive, fingerprints) and runs the data,
training and iFIM steps; the attribution, drift, statistics and baselines steps are in :mod:`drift.attributions_step`,
:mod:`drift.drift_step`, :mod:`drift.stats_step` and :mod:`drift.baselines`.
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
from .archive import ArchiveReader
from .config import PHASES, Config
from .h5tree import as_tree, write_tree
from .models import LEGACY_PREPROCESSING, Classifier, build, get_spec
from .rundir import (
    RunLock,
    drift_version,
    log,
    make_out,
    nothing_finished,
    provenance,
    science_hash_to_resume,
    setting_changes,
    stored_config,
)
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
            # The config the archive was written under, before this run's first commit replaces it: what a resume
            # names when it recomputes a step for changed settings.
            self._old_cfg = stored_config(self.path) if self.path.exists() else None
            science = (science_hash_to_resume(self.path, cfg) if distributed.is_main() and self.path.exists()
                       else cfg.science_hash())
            self.archive = distributed.open_archive(self.path, cfg.to_toml(), science, provenance(cfg, self.device))
            self.environment = self._environment()
        except BaseException:
            self.lock.release()
            raise
        self.force = set(force)
        self._splits = None
        self._transfer_splits = None
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
            damage = self.archive.damaged(name)
            if damage is None:
                return False
            log(f"{name}: damaged in the archive ({damage}); computing it again")
            return True
        entry = self.archive.entry(name)
        if entry is not None:
            old = entry.get("inputs") or {}
            changed = [k for k, v in stamp["inputs"].items() if k in old and old[k] != v]
            if "data" in changed:
                what = "the data changed (images added, removed, relabelled or modified)"
            elif "settings" in changed or not changed:
                from .config import STEP_SECTIONS

                old_cfg = getattr(self, "_old_cfg", None)
                diff = setting_changes(old_cfg, self.cfg, STEP_SECTIONS[step]) if old_cfg is not None else []
                what = f"settings changed ({'; '.join(diff)})" if diff else "settings changed"
            else:
                what = ", ".join(f"{k} changed ({old[k]} -> {stamp['inputs'][k]})" for k in changed)
            if "drift" not in old and "data" not in changed:
                what = "it was computed by an earlier drift, which recorded no version"
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
                            for a in self.cfg.run.archs for st in PHASES})
        env = {"threads": str(torch.get_num_threads()), "device": self.device.type, "precision": ",".join(precision),
               "torch": torch.__version__, "timm": timm.__version__}
        # A backbone whose normalisation was corrected (LEGACY_PREPROCESSING): its earlier checkpoints are stale.
        fixed = {a: get_spec(a).mean for a in self.cfg.run.archs if a in LEGACY_PREPROCESSING}
        if fixed:
            env["preprocessing"] = json.dumps(fixed, sort_keys=True)
        return env

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
        """``fingerprint`` and ``inputs`` of a step (see :meth:`drift.archive.Archive.commit`): its settings, the
        data and drift's own version (and git commit when run from a checkout), and from training on the
        environment (:meth:`_environment`)."""
        inputs = {"settings": self.cfg.step_hash(step), "data": self.data_fingerprint, "drift": drift_version()}
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
                                                   d.difficulty, d.confounder, d.marker_region)
            elif d.source == "folder":
                self._splits = data.load_folder(d.path, d.image_size, self.cfg.data_seed, d.val_fraction,
                                                d.test_fraction, d.skip_bad, classes=d.classes or None)
            else:
                self._splits = data.load_csv(d.path, d.image_size, self.cfg.data_seed, d.val_fraction,
                                             d.test_fraction, d.skip_bad, classes=d.classes or None)
        return self._splits

    @property
    def transfer_splits(self):
        """The transfer phase's training and validation images: :attr:`splits`, or with ``data.confounder_transfer``
        set apart from ``data.confounder`` the same patients at the transfer strength of the marker (a planted
        shift); its test split is empty (every phase is evaluated on :attr:`splits`' test images)."""
        d = self.cfg.data
        if d.source != "synthetic" or d.confounder_transfer in (-1, d.confounder):
            return self.splits
        if self._transfer_splits is None:
            from . import data

            self._transfer_splits = data.load_synthetic(d.n_train, d.n_val, 0, d.image_size, self.cfg.data_seed,
                                                        d.difficulty, d.confounder_transfer)
        return self._transfer_splits

    @property
    def class_names(self) -> list[str]:
        return list(self.splits.test.class_names)

    def test_images(self, idx=None) -> torch.Tensor:
        return self.splits.test.images(idx)

    # ------------------------------------------------------------------ steps
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
        if "train" in steps and self.cfg.data.source != "synthetic":
            from .validate import check_batches

            check_batches(self.cfg, len(self.splits.train))  # the batch sizes against the data, before training
        # Data (drawn or read on first use) and both training phases of every backbone, the later steps excluded.
        self.timings["data+training"] = time.perf_counter() - t0
        for arch in self.cfg.run.archs:
            self._check_input_size(arch)
            if "train" in steps:
                t_train = time.perf_counter()
                for phase in PHASES:
                    self.trained(arch, phase)
                self.timings["data+training"] += time.perf_counter() - t_train
            self.arch_steps(arch, steps)
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
        from .drift_step import marker_masks

        t0 = time.perf_counter()
        s = self.splits
        test = s.test
        log(f"data: {len(s.train)} train / {len(s.val)} val / {len(test)} test images, classes {self.class_names}")
        if self.transfer_splits is not s:
            d = self.cfg.data
            log(f"data: marker plates on {d.confounder_transfer:g} of each class in the transfer phase's images, "
                f"{d.confounder:g} in the fine-tuning and test images (a planted shift)")
        tree = {"test": {"ids": np.asarray(test.ids), "labels": test.labels}}
        if test.lung_masks is not None:
            tree["test"]["lung_masks"] = test.lung_masks.astype(bool)
        if test.lesion_masks is not None:
            tree["test"]["lesion_masks"] = test.lesion_masks.astype(bool)
        if (marker := marker_masks(test)) is not None:
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
            # frozen-BatchNorm phase would feed deep layers inputs that grow without bound. Estimate them once on
            # the training images, then keep them as the phase's config says.
            calibrate_bn(model.to(self.device), self.transfer_splits.train, self.device,
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
    def checkpoint_path(self, arch: str, phase: str, seed: int | None = None) -> Path:
        """Checkpoint file of (arch, phase); with ``seed``, of that seed replica of the phase."""
        return self.out / "checkpoints" / (f"{arch}-{phase}.pt" if seed is None else f"{arch}-{phase}-seed{seed}.pt")

    @staticmethod
    def model_name(arch: str, phase: str, seed: int | None = None) -> str:
        """Archive group of a trained model: ``models/<arch>/<phase>``, or ``replicas/<arch>/<phase>/seed<seed>``
        for a seed replica (:mod:`drift.baselines`)."""
        return f"models/{arch}/{phase}" if seed is None else f"replicas/{arch}/{phase}/seed{seed}"

    def trained(self, arch: str, phase: str, seed: int | None = None) -> Trained:
        """The model of (arch, phase): reloaded from its checkpoint when it is committed, else trained.

        With ``seed``, the seed replica of the phase: the same phase trained again from the same starting point (the
        initial weights for ``transfer``, the run's own transfer checkpoint for ``finetune``) with training seed
        ``seed`` in place of ``run.seed``; ``seed = run.seed`` reproduces the run's own model. Phase ``chain`` (with
        a seed) is the fine-tuning phase of a whole chain: fine-tuned, with ``train.finetune`` settings, from the
        transfer replica of the same seed (``baselines.chains``).
        """
        key = (arch, phase) if seed is None else (arch, phase, seed)
        if key in self._models:
            return self._models[key]
        name = self.model_name(arch, phase, seed)
        ckpt = self.checkpoint_path(arch, phase, seed)
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
            warnings.warn(f"{name}: checkpoint {ckpt} missing or changed; training this phase again", stacklevel=2)
        return self._train(arch, phase, seed)

    def _train(self, arch: str, phase: str, replica: int | None = None) -> Trained:
        t0 = time.perf_counter()
        cfg, s = self.cfg, self.splits
        seed = cfg.run.seed if replica is None else replica
        what = f"{arch} {phase}" + ("" if replica is None else f" (seed replica {replica})")
        settings = "finetune" if phase == "chain" else phase
        st = getattr(cfg.train, settings).for_arch(arch, f"train.{settings}")
        if phase == "transfer":
            model, origin = self.initial_model(arch)
            log(f"{what}: weights {origin}")
            fit = self.transfer_splits
            res = train_transfer(model, fit.train, fit.val, st, self.device, seed, cfg.run.progress, what)
            bn_frozen = True
        else:
            start = replica if phase == "chain" else None  # a chain fine-tunes its own transfer replica
            self.trained(arch, "transfer", start)  # make sure that transfer phase is committed first
            model = load_checkpoint(self.checkpoint_path(arch, "transfer", start), arch, len(self.class_names),
                                    cfg.model.dropout)
            origin = "transfer checkpoint" if start is None else f"transfer replica seed {start}"
            res = train_finetune(model, s.train, s.val, st, self.device, seed + 1, cfg.run.progress, what)
            bn_frozen = st.bn_frozen
        ev = evaluate(model, s.test, self.device, progress=cfg.run.progress)
        ckpt = self.checkpoint_path(arch, phase, replica)
        sha = save_checkpoint(model, ckpt, {"phase": phase, "seed": seed}) if distributed.is_main() else ""
        log(f"{what}: test accuracy {ev.accuracy:.3f}, macro AUC {ev.macro_auc:.3f} "
            f"(best epoch {res.best_epoch + 1}, {res.seconds:.0f} s)")
        name = self.model_name(arch, phase, replica)
        with self.archive.commit(name, replace=(name,), started=t0, **self._stamp("train")) as f:
            g = f.require_group(name)
            write_tree(g, {"history": res.history, "test": ev.to_dict()})
            g.attrs.update({"checkpoint": str(ckpt), "sha256": sha, "best_epoch": res.best_epoch,
                            "best_val_auc": res.best_val_auc, "bn_frozen": bn_frozen, "weights": origin,
                            "seconds": res.seconds, "precision": res.precision, "seed": seed,
                            "schedule": st.schedule, "epochs": st.epochs, "lr": st.lr, "batch_size": st.batch_size,
                            "input_size": self.input_size(arch), "processes": distributed.world_size(),
                            "sync_bn": bool(st.sync_bn and not bn_frozen and distributed.world_size() > 1),
                            "input_mean": json.dumps(model.normalization["mean"]),
                            "input_std": json.dumps(model.normalization["std"])})
        key = (arch, phase) if replica is None else (arch, phase, replica)
        self._models[key] = Trained(model, ev)
        return self._models[key]

    def arch_steps(self, arch: str, steps: tuple[str, ...]) -> None:
        """The steps of one architecture's trained models, in order: attributions, drift metrics, iFIM (those of
        ``steps``; iFIM only when ``fisher.enabled``)."""
        if "attributions" in steps:
            self.step_attributions(arch)
        if "drift" in steps:
            self.step_drift(arch)
        if "fisher" in steps and self.cfg.fisher.enabled:
            self.step_fisher(arch)

    # ---- attributions, drift metrics
    def step_attributions(self, arch: str) -> None:
        """Raw CAMs of ``arch``'s checkpoints (:func:`drift.attributions_step.run_step`)."""
        from .attributions_step import run_step

        run_step(self, arch)

    def step_drift(self, arch: str) -> None:
        """Drift metrics TL -> FT of ``arch``'s maps (:func:`drift.drift_step.run_step`)."""
        from .drift_step import run_step

        run_step(self, arch)

    # ---- iFIM
    def step_fisher(self, arch: str) -> None:
        name = f"fisher/{arch}"
        if not self._todo(name, "fisher"):
            return
        from .archive import ArchiveReader
        from .ifim_study import cam_regions, ifim_study, untrained_model

        fc = self.cfg.fisher
        test = self.splits.test
        n = len(test) if fc.n_spectrum <= 0 else min(fc.n_spectrum, len(test))
        m = min(fc.n_components, len(test))
        comp_idx = np.arange(m)
        t0 = time.perf_counter()
        tree = {}
        a, reader = self.cfg.attribution, ArchiveReader(self.path)
        shape = tuple(self.test_images([0]).shape[1:])

        def regions(phase):  # the fine-tuned model's top CAM region for the untrained control
            path = f"attributions/{arch}/{a.layers[0]}/{a.scores[0]}/{phase}/{a.methods[0]}"
            if not reader.has(path):
                return None
            maps = reader.read(path)
            return lambda idx: cam_regions(maps[idx], shape, fc.cam_fraction)

        models = [(phase, self.trained(arch, phase).model.eval(), phase) for phase in PHASES]
        if fc.untrained:
            models.append(("untrained", untrained_model(self, arch), "finetune"))
        for phase, model, region_phase in models:
            # One Jacobian per batch serves the spectra (first n images), components and perturbations (first m).
            st = ifim_study(model, lambda idx: self.test_images(idx).to(self.device), test.labels[comp_idx], n, m,
                            schedule=distributed.my_batches, gather=distributed.gather_batches,
                            region_of=regions(region_phase),
                            eps_grid=fc.eps_grid, alphas=fc.alphas, energy=fc.energy, head=fc.head,
                            n_draws=fc.n_draws, seed=self.cfg.run.seed, batch_size=fc.batch_size)
            eig_t, pert = st.eigenvalues, st.perturbation
            share = eig_t / eig_t.sum(1, keepdim=True).clamp_min(1e-300)
            tree[phase] = {"eigenvalues": eig_t.numpy(), "eigen_share": share.numpy(),
                           "rank": st.rank.numpy(), "probs": st.probs.numpy(),
                           "ids": np.asarray(test.ids[:n]), "perturbation": pert.to_arrays(),
                           "summary": as_tree(pert.summary())}
            x_all, high_all = st.x, st.x_high.float()
            tree[phase]["components"] = {"ids": np.asarray([test.ids[i] for i in comp_idx]),
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

    # ---- across architectures
    def step_stats(self) -> None:
        """Rankings of the architectures and the headline numbers (:func:`drift.stats_step.run_step`)."""
        from .stats_step import run_step

        run_step(self)

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
