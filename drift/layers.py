"""CAM layer presets for any CNN: timm models outside the registry and user-defined ``nn.Module`` classifiers.

The registry backbones name their presets in :data:`drift.models.REGISTRY`; every other model gets them from one
traced forward pass (:func:`trace`) on an input of the shape the maps will be computed at, and, for timm models,
from ``feature_info`` (the list of ``{"module", "reduction", "num_chs"}`` stages timm declares):

    ``auto``       the last module to finish in the forward pass whose output is a map (B, K, h, w) with
                   h x w > 1: of the modules that return the same tensor (a block and its last child), the
                   outermost, which finishes last.
    ``block``      timm: the module of the last ``feature_info`` entry (the last stage or block); other models:
                   ``auto``.
    ``last-conv``  the last ``nn.Conv2d`` that finished before ``auto`` finished (so a 1 x 1 convolution of a
                   pre-logits head, e.g. VGG's ``pre_logits``, is not taken).
    ``stride16``   timm: the module of the last ``feature_info`` entry with reduction 16; other models: the last
                   module to finish whose output grid is the input's divided by 16 (h = ceil(H / 16)).

Only modules that run exactly once per forward pass are candidates (a CAM needs one activation per image). A
model whose layers after its last map return tokens (B, N, D) (a vision transformer: ``patch_embed`` is a
convolution, then the blocks work on tokens) is refused with an error that says so: drift does not apply a
token-to-grid reshape, since the grid a token belongs to is a property of the model that its modules do not
record. A name that does not resolve raises an error listing the candidate layers with their output shapes.
"""

from __future__ import annotations

import difflib
import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["PRESETS", "LayerInfo", "candidates", "resolve", "trace"]

PRESETS = ("auto", "block", "last-conv", "stride16")
"""The layer presets every CNN gets here (see the module docstring)."""


@dataclass(frozen=True)
class LayerInfo:
    """One module of a traced forward pass.

    Attributes:
        name: dotted name inside the model passed to :func:`trace`.
        kind: the module's class name.
        shape: its output shape (the first tensor output), or () when it returned no tensor.
        calls: how many times it ran in the forward pass.
        order: its finishing position (0 = first to finish).
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    calls: int
    order: int

    @property
    def is_map(self) -> bool:
        """A (B, K, h, w) output with more than one cell, from a module that ran once."""
        return len(self.shape) == 4 and self.shape[-1] * self.shape[-2] > 1 and self.calls == 1


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, torch.Tensor):
                return o
    return None


def trace(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerInfo]:
    """Every named submodule that ran in one eval-mode forward pass of a seeded random input of shape
    ``input_shape`` (B, C, H, W) in [0, 1], in finishing order; the model's own train/eval flags are restored.

    Raises:
        ValueError: ``input_shape`` is not (B, C, H, W), or the forward pass fails (the error names the shape).
    """
    if len(input_shape) != 4 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (B, C, H, W) with positive sizes, got {tuple(input_shape)}")
    names = {id(m): n for n, m in model.named_modules() if n}
    calls: dict[str, int] = {}
    finished: list[tuple[str, str, tuple[int, ...]]] = []

    def hook(module, args, out):
        name = names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        t = _first_tensor(out)
        finished.append((name, type(module).__name__, tuple(t.shape) if t is not None else ()))

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n]
    flags = [(m, m.training) for m in model.modules()]
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.rand(tuple(int(s) for s in input_shape), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    model.eval()
    try:
        with torch.no_grad():
            model(x)
    except Exception as e:
        raise ValueError(f"{type(model).__name__}: the forward pass on an input of shape {tuple(input_shape)} "
                         f"failed ({type(e).__name__}: {e}); layers are traced at the images' shape") from e
    finally:
        for h in handles:
            h.remove()
        for m, flag in flags:
            m.training = flag
    seen: dict[str, LayerInfo] = {}
    for k, (name, kind, shape) in enumerate(finished):
        seen[name] = LayerInfo(name, kind, shape, calls[name], k)  # the last finish of a module counts
    return sorted(seen.values(), key=lambda info: info.order)


def candidates(model: nn.Module, input_shape: tuple[int, ...]) -> list[LayerInfo]:
    """The layers a CAM can explain: modules that run once and return a map (B, K, h, w) with h x w > 1, in
    finishing order."""
    return [info for info in trace(model, input_shape) if info.is_map]


def _listing(cands: list[LayerInfo], limit: int = 25) -> str:
    shown = cands[-limit:]
    text = ", ".join(f"{c.name} {'x'.join(map(str, c.shape[1:]))}" for c in shown)
    return (f"... ({len(cands) - limit} earlier), " if len(cands) > limit else "") + text


def _timm_part(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The timm model inside ``model`` (itself, or the submodule that carries ``feature_info``) and its prefix."""
    for name, m in model.named_modules():
        fi = getattr(m, "feature_info", None)
        if fi is not None and hasattr(m, "pretrained_cfg"):
            return m, (name + "." if name else "")
    return None


def _feature_entries(model: nn.Module) -> list[tuple[str, int]]:
    part = _timm_part(model)
    if part is None:
        return []
    timm_model, prefix = part
    fi = timm_model.feature_info
    entries = fi.get_dicts() if hasattr(fi, "get_dicts") else list(fi)
    return [(prefix + e["module"], int(e["reduction"])) for e in entries if e.get("module")]


def _refuse_tokens(model: nn.Module, infos: list[LayerInfo], after: LayerInfo) -> None:
    tokens = [i for i in infos if i.order > after.order and len(i.shape) == 3 and i.shape[1] > 1]
    if tokens:
        t = tokens[-1]
        raise ValueError(
            f"{type(model).__name__}: after its last map layer {after.name!r} {tuple(after.shape)} the model works "
            f"on tokens (e.g. {t.name!r} returns {tuple(t.shape)}, {len(tokens)} such layers): a transformer. "
            "drift computes CAMs of (B, K, h, w) maps and applies no token-to-grid reshape; pass a "
            "convolutional model, or a dotted name of a (B, K, h, w) layer if the map is what you mean to explain"
        )


_RESOLVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def resolve(model: nn.Module, layer: str, input_shape: tuple[int, ...]) -> str:
    """The dotted module name of ``layer`` in ``model``: a preset of :data:`PRESETS` (see the module docstring)
    or a dotted name, checked to be a candidate layer.

    Args:
        model: any ``nn.Module`` classifier (a timm model, a model holding one, or a user-defined CNN).
        layer: a preset or a dotted module name.
        input_shape: (B, C, H, W), the shape of the images the maps are computed at.

    Raises:
        ValueError: the preset finds no layer, or the name is not a module that runs once with a map output;
            the message lists the candidate layers and their shapes; a model whose maps end in tokens (a vision
            transformer) is refused naming its token layers.
    """
    # Resolved once per model, layer and image shape (C, H, W): the forward order does not depend on the batch.
    key = (layer, tuple(int(s) for s in input_shape[1:]))
    memo = _RESOLVED.setdefault(model, {})
    if key not in memo:
        memo[key] = _resolve(model, layer, (1, *key[1]))
    return memo[key]


def _resolve(model: nn.Module, layer: str, input_shape: tuple[int, ...]) -> str:
    infos = trace(model, input_shape)
    cands = [i for i in infos if i.is_map]
    by_name = {i.name: i for i in infos}
    if not cands:
        shapes = sorted({i.shape for i in infos if len(i.shape) == 4})
        raise ValueError(f"{type(model).__name__}: no layer returns a map larger than 1 x 1 at input "
                         f"{tuple(input_shape)} (4-D outputs seen: {shapes or 'none'}); use a larger input")
    auto = cands[-1]
    if layer not in PRESETS:
        info = by_name.get(layer)
        if info is None or not info.is_map:
            why = ("is not a module of the model" if info is None else
                   f"returns {info.shape} and runs {info.calls} time(s), not one (B, K, h, w) map with h x w > 1")
            close = difflib.get_close_matches(layer, [c.name for c in cands], n=3, cutoff=0.5)
            raise ValueError(f"layer {layer!r} {why}; closest candidates: {close or 'none'}; candidate layers "
                             f"(name and K x h x w, in forward order): {_listing(cands)}")
        return layer
    _refuse_tokens(model, infos, auto)
    if layer == "auto":
        return auto.name
    if layer == "last-conv":
        convs = [i for i in infos if i.kind == "Conv2d" and i.calls == 1 and i.order <= auto.order]
        if not convs:
            raise ValueError(f"{type(model).__name__}: no nn.Conv2d runs once before {auto.name!r}; candidate "
                             f"layers: {_listing(cands)}")
        return convs[-1].name
    entries = _feature_entries(model)
    if layer == "block":
        if entries:
            name = entries[-1][0]
            _check_preset(model, layer, name, by_name, cands)
            return name
        return auto.name
    # stride16
    if entries:
        at16 = [name for name, red in entries if red == 16]
        if at16:
            _check_preset(model, layer, at16[-1], by_name, cands)
            return at16[-1]
    H, W = int(input_shape[-2]), int(input_shape[-1])
    grid = (math.ceil(H / 16), math.ceil(W / 16))
    at16 = [c for c in cands if tuple(c.shape[-2:]) == grid]
    if not at16:
        raise ValueError(f"{type(model).__name__}: no layer has the stride-16 grid {grid[0]} x {grid[1]} at input "
                         f"{H} x {W}; candidate layers: {_listing(cands)}")
    return at16[-1].name


def _check_preset(model, preset: str, name: str, by_name: dict[str, LayerInfo], cands: list[LayerInfo]) -> None:
    info = by_name.get(name)
    if info is None or not info.is_map:
        got = "did not run" if info is None else f"returns {info.shape} ({info.calls} call(s))"
        raise ValueError(f"{type(model).__name__}: preset {preset!r} is {name!r} by timm's feature_info, which "
                         f"{got}, not one map larger than 1 x 1; candidate layers: {_listing(cands)}")
