"""Classifiers from outside drift's registry: a timm name plus a state-dict file, a ``module:function`` factory
returning an ``nn.Module`` (plus an optional state-dict file), or a checkpoint written by ``drift run``.

A model spec is one of

    ``timm:<name>`` or ``<name>``   a timm model built with ``pretrained=False``; its class count is read from the
                                    state dict's classifier weight (``pretrained_cfg["classifier"]``), so the file
                                    is required.
    ``<module>:<function>``         ``function()`` of an importable module (``pkg.mod:make``), or of a Python file
    ``<file.py>:<function>``        (``path/to/net.py:make``), returning an ``nn.Module`` that maps images to
                                    logits (B, C); the state-dict file, when given, is loaded into it (strict).
    a registry name                 with a checkpoint of ``drift run`` (it carries ``arch``): the drift classifier.

State-dict files are read without unpickling objects (:func:`drift.weights.load_state`: ``.safetensors`` through
safetensors, anything else through ``torch.load(weights_only=True)``); a ``module.`` prefix (DistributedDataParallel)
is dropped. Every model is wrapped in :class:`UserModel`, which takes drift's images (B, 1, H, W) in [0, 1] and
feeds the wrapped network ``(x - mean) / std`` with the grayscale channel repeated to its input channels.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .weights import load_state, sha256_file

__all__ = ["ModelOrigin", "UserModel", "load_model"]


@dataclass(frozen=True)
class ModelOrigin:
    """Where a measured model came from, as the archive records it.

    Attributes:
        spec: the model spec as given.
        kind: ``timm``, ``factory`` or ``drift``.
        weights: the state-dict file ('' when none).
        sha256: the state-dict file's sha256 ('' when none).
        code_sha256: for a factory, the sha256 of the file that defines it ('' when it has no file).
        num_classes: C, the number of logits.
    """

    spec: str
    kind: str
    weights: str
    sha256: str
    code_sha256: str
    num_classes: int

    def to_dict(self) -> dict:
        return asdict(self)


class UserModel(nn.Module):
    """Any classifier behind drift's input convention: (B, 1|3, H, W) in [0, 1] -> logits (B, C).

    The wrapped network (``backbone``) receives ``(x' - mean) / std`` where ``x'`` repeats a grayscale channel to
    ``in_chans`` channels (``in_chans = 0`` passes the channels as given); ``mean``/``std`` of length 0 apply no
    normalisation. Layer names are accepted relative to ``backbone`` (:func:`drift.models.resolve_layer`).
    """

    def __init__(self, backbone: nn.Module, in_chans: int = 0, mean: tuple[float, ...] = (),
                 std: tuple[float, ...] = ()):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean {mean} and std {std} differ in length")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be > 0, got {std}")
        self.backbone = backbone
        self.in_chans = int(in_chans)
        self.normalised = bool(mean)
        if mean:
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"{type(self.backbone).__name__}: expected input (B, C, H, W), got {tuple(x.shape)}")
        if self.in_chans and x.shape[1] != self.in_chans:
            if x.shape[1] != 1:
                raise ValueError(f"{type(self.backbone).__name__}: input has {x.shape[1]} channels; the model "
                                 f"takes {self.in_chans} (a grayscale image is repeated)")
            x = x.expand(-1, self.in_chans, -1, -1)
        if self.normalised:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.backbone(x)


def _state_dict(path: str) -> dict:
    obj = load_state(path)
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def _load_strict(module: nn.Module, sd: dict, path: str, what: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shaped = [f"{k} {tuple(sd[k].shape)} (model {tuple(own[k].shape)})" for k in own
              if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shaped:
        raise ValueError(f"{path} does not fit {what}: {len(missing)} missing (first {missing[:3]}), "
                         f"{len(unexpected)} unexpected (first {unexpected[:3]}), {len(shaped)} of another shape "
                         f"(first {shaped[:2]})")
    module.load_state_dict(sd)


def _factory(spec: str):
    target, _, func = spec.rpartition(":")
    if target.endswith(".py") or os.sep in target or "/" in target:
        path = Path(target)
        if not path.is_file():
            raise ValueError(f"model {spec!r}: file {path} does not exist")
        name = f"drift_user_model_{sha256_file(path)[:12]}"
        mod = sys.modules.get(name)
        if mod is None:
            loader_spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = mod
            loader_spec.loader.exec_module(mod)
        code = sha256_file(path)
    else:
        try:
            mod = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"model {spec!r}: cannot import module {target!r} ({e})") from e
        file = getattr(mod, "__file__", None)
        code = sha256_file(file) if file and Path(file).is_file() else ""
    fn = getattr(mod, func, None)
    if not callable(fn):
        raise ValueError(f"model {spec!r}: {target} has no callable {func!r}")
    return fn, code


def load_model(spec: str, weights: str = "", mean: tuple[float, ...] | None = None,
               std: tuple[float, ...] | None = None, channels: int = 0) -> tuple[UserModel | nn.Module, ModelOrigin]:
    """Build the model ``spec`` names (see the module docstring) and load ``weights`` into it.

    Args:
        spec: ``timm:<name>``, a timm name, ``<module>:<function>``, ``<file.py>:<function>``, or a registry name
            with a ``drift run`` checkpoint.
        weights: state-dict file (``.safetensors``, or a torch file read with ``weights_only=True``); '' for none
            (factories only).
        mean, std: input normalisation; None: timm's ``pretrained_cfg`` for timm models, none for factories.
        channels: input channels of the wrapped network; 0: timm's ``in_chans``, or as given for factories.

    Returns:
        (model in eval mode, its :class:`ModelOrigin`).

    Raises:
        ValueError: an unknown spec, a missing or unreadable file, a state dict that does not fit (naming the
            file and the keys), a factory that does not return an ``nn.Module``.
    """
    import timm

    from .models import REGISTRY
    from .weights import load_checkpoint

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}")
    if weights and not Path(weights).is_file():
        raise ValueError(f"model {spec!r}: weights file {weights} does not exist")
    sha = sha256_file(weights) if weights else ""
    name = spec.removeprefix("timm:")
    if spec in REGISTRY and weights and "arch" in load_state(weights):
        obj = load_state(weights)
        model = load_checkpoint(weights, spec, int(obj["num_classes"]))
        return model.eval(), ModelOrigin(spec, "drift", str(weights), sha, "", model.num_classes)
    if spec.startswith("timm:") or (":" not in spec and timm.is_model(name)):
        if not timm.is_model(name):
            raise ValueError(f"model {spec!r}: timm has no model {name!r}")
        if not weights:
            raise ValueError(f"model {spec!r}: timm models are built with pretrained=False; pass the state-dict file")
        sd = _state_dict(weights)
        probe = timm.create_model(name, pretrained=False)
        key = f"{probe.pretrained_cfg.get('classifier', '')}.weight"
        if key not in sd:
            raise ValueError(f"{weights}: no classifier weight {key!r} for timm {name!r} (first keys "
                             f"{list(sd)[:3]})")
        net = timm.create_model(name, pretrained=False, num_classes=int(sd[key].shape[0]))
        _load_strict(net, sd, weights, f"timm {name!r}")
        cfg = net.pretrained_cfg
        mean = tuple(cfg.get("mean", ())) if mean is None else tuple(mean)
        std = tuple(cfg.get("std", ())) if std is None else tuple(std)
        model = UserModel(net, channels or int(cfg.get("input_size", (3,))[0]), mean, std)
        return model.eval(), ModelOrigin(spec, "timm", str(weights), sha, "", int(sd[key].shape[0]))
    if ":" not in spec:
        raise ValueError(f"model {spec!r} is neither a timm model, a registry model with a drift checkpoint, nor "
                         "a module:function / file.py:function factory")
    fn, code = _factory(spec)
    net = fn()
    if not isinstance(net, nn.Module):
        raise ValueError(f"model {spec!r}: the factory returned a {type(net).__name__}, not an nn.Module")
    if weights:
        _load_strict(net, _state_dict(weights), weights, f"{spec} ({type(net).__name__})")
    mean, std = tuple(mean or ()), tuple(std or ())
    model = UserModel(net, channels, mean, std).eval()
    return model, ModelOrigin(spec, "factory", str(weights), sha, code, -1)
