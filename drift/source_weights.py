"""Synthetic-source weights: each backbone pretrained once on a synthetic source task (a stand-in for ImageNet when
no weights are at hand) and cached, keyed by what the weights depend on, with a sha256 sidecar.

``model.weights = "synthetic-source"`` loads them (:meth:`drift.pipeline.Pipeline.initial_model`); ``drift pretrain``
makes the cache ahead of time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import torch

from . import distributed
from .config import Config, PhaseConfig
from .models import LEGACY_PREPROCESSING, build, get_spec
from .rundir import log
from .train import BN_CALIBRATION_IMAGES, pretrain_source
from .weights import load_state, sha256_file

RECIPE = 5
"""Version of the synthetic-source recipe (source task, pretraining, cache file format); part of the cache key."""


def input_side(cfg: Config, arch: str) -> int:
    """The side of the images ``arch`` sees under ``cfg`` (as :meth:`drift.pipeline.Pipeline.input_size`)."""
    return round(cfg.data.image_size * cfg.model.input_scale.get(arch, 1.0))

def cache_path(cfg: Config, arch: str) -> Path:
    """Cache file of the synthetic-source weights of ``arch``: ``<cache_dir>/source/<arch>-<side>px-<key>.pt``.

    The key hashes what the weights depend on: architecture, the input side the backbone sees, the
    ``[source]`` settings, the recipe version and ``run.seed``.
    """
    side = input_side(cfg, arch)
    parts = {"arch": arch, "size": side, "source": dataclasses.asdict(cfg.source), "recipe": RECIPE,
             "seed": cfg.run.seed}
    if arch in LEGACY_PREPROCESSING:  # normalisation corrected since: weights pretrained under the old one are stale
        parts["mean"] = list(get_spec(arch).mean)
    key = json.dumps(parts, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(cfg.model.cache_dir) / "source" / f"{arch}-{side}px-{digest}.pt"

def backbone(cfg: Config, arch: str, device: torch.device, progress: bool | None = None) -> dict:
    """The synthetic-source backbone of ``arch`` under ``cfg``: read from the cache, or pretrained and cached.

    A cache file is used only when its sha256 matches the sidecar ``<file>.sha256`` written after it; a
    missing sidecar, a truncated or altered file is reported and the weights are pretrained again.

    Args:
        cfg: The run's config (``[source]``, ``model.cache_dir``, ``run.seed``, the input side of ``arch``).
        arch: Registry name of the backbone.
        device: Where to pretrain.
        progress: Progress bars (default ``cfg.run.progress``).

    Returns:
        ``{"state_dict": backbone tensors, "meta": {"task", "description", "classes", "source_accuracy",
        "n_train", "n_val", "epochs", "input_size", "seconds", ...}}``.
    """
    path = cache_path(cfg, arch)
    payload = _read_cache(path)
    if payload is not None:
        log(f"{arch}: synthetic-source weights from cache {path}")
        return payload
    src = cfg.source
    side = input_side(cfg, arch)
    what = f"{round(side * src.crop)} px windows of {side} px images" if src.crop < 1 else f"{side} px images"
    log(f"{arch}: no cached synthetic-source weights for this config; pretraining once on the {src.task} task "
        f"({src.n_train} {what} x {src.epochs} epoch{'s' if src.epochs != 1 else ''})")
    payload = _pretrain(cfg, arch, device, cfg.run.progress if progress is None else progress)
    if distributed.is_main():  # every rank pretrained together; one writes the cache
        _write_cache(path, payload)
    meta = payload["meta"]
    log(f"{arch}: pretrained in {meta['seconds']:.0f} s, held-out source accuracy {meta['source_accuracy']:.3f} "
        f"({len(meta['classes'])} classes); cached {path}")
    return payload

def _pretrain(cfg: Config, arch: str, device: torch.device, progress: bool) -> dict:
    from .data import SOURCE_TASKS

    src = cfg.source
    if src.task not in SOURCE_TASKS:
        raise ValueError(f"source.task must be one of {', '.join(SOURCE_TASKS)}, got {src.task!r}")
    task = SOURCE_TASKS[src.task]
    side = input_side(cfg, arch)
    t0 = time.perf_counter()
    seed = cfg.run.seed + 7919  # source images never share a stream with the chest task's
    crop = round(side * src.crop) if src.crop < 1 else 0
    if crop and crop < get_spec(arch).min_size:
        raise ValueError(f"source.crop = {src.crop} gives {crop} px windows; {arch} needs >= "
                         f"{get_spec(arch).min_size} px")
    train = task.make(src.n_train, side, seed, crop=crop)
    # Held-out and BatchNorm images are whole radiographs: what the backbone sees in the transfer phase.
    heldout = task.make(src.n_val, side, seed, offset=src.n_train)
    calibration = task.make(BN_CALIBRATION_IMAGES, side, seed, offset=src.n_train + src.n_val) if crop else None
    st = PhaseConfig(epochs=src.epochs, lr=src.lr, batch_size=src.batch_size, patience=src.epochs,
                     bn_frozen=False, schedule=src.schedule, precision=src.precision)
    # The pretraining draws from torch's global generator; forking it keeps every later step's random
    # numbers the same whether the weights came from the cache or were pretrained in this process.
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.run.seed)
        model = build(arch, len(task.classes), cfg.model.dropout)
        res = pretrain_source(model, train, len(task.classes), st, device, cfg.run.seed, progress, heldout,
                              f"{arch} source pretraining", calibration)
    meta = {"task": task.name, "description": task.description, "classes": list(task.classes),
            "source_accuracy": res.history["heldout_accuracy"][0], "final_loss": res.history["train_loss"][-1],
            "n_train": src.n_train, "n_val": src.n_val, "crop": crop or side, "epochs": src.epochs, "lr": src.lr,
            "batch_size": src.batch_size, "precision": res.precision, "input_size": side, "arch": arch,
            "recipe": RECIPE, "seconds": time.perf_counter() - t0}
    state = {k: v.detach().cpu().clone() for k, v in model.backbone.state_dict().items()}
    return {"state_dict": state, "meta": meta}

def _read_cache(path: Path) -> dict | None:
    """The cached payload at ``path``, or None when absent, or (reported) incomplete or corrupt."""
    if not path.is_file():
        return None
    sidecar = path.with_name(path.name + ".sha256")
    expected = sidecar.read_text().split()[0] if sidecar.is_file() and sidecar.stat().st_size else ""
    # Checked before unpickling anything: a partly written or altered file is never loaded.
    if not expected or sha256_file(path) != expected:
        why = "no sha256 sidecar" if not expected else "sha256 mismatch"
        log(f"{path}: cache file incomplete or corrupt ({why}); pretraining again")
        return None
    try:
        payload = load_state(path)
    except ValueError as exc:
        log(f"{path}: unreadable cache file ({exc}); pretraining again")
        return None
    if not isinstance(payload.get("meta"), dict):
        log(f"{path}: cache file without metadata; pretraining again")
        return None
    return payload

def _write_cache(path: Path, payload: dict) -> None:
    """Write ``payload`` atomically, then its sha256 sidecar: a file without a matching sidecar is incomplete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sidecar = path.with_name(path.name + ".sha256")
    sidecar.unlink(missing_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    tmp = sidecar.with_name(f"{sidecar.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{digest}  {path.name}\n")
    os.replace(tmp, sidecar)

def origin(meta: dict, path: Path) -> str:
    """One line on synthetic-source weights: task, held-out accuracy, pretraining run, cache file."""
    epochs = meta["epochs"]
    return (f"synthetic-source: {meta['task']} task ({len(meta['classes'])} classes: {meta['description']}), "
            f"held-out accuracy {meta['source_accuracy']:.3f}; pretrained on {meta['n_train']} "
            + (f"{meta['crop']} px windows of " if meta["crop"] != meta["input_size"] else "")
            + f"{meta['input_size']} px images x {epochs} "
            f"epoch{'s' if epochs != 1 else ''} in {meta['seconds']:.0f} s; "
            f"cache {path.name}")
