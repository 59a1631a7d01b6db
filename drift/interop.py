"""drift's CAM engine for Quantus and Captum users, and maps exported in their layout.

* :func:`export_maps`: raw CAMs (N, h, w) -> (N, 1, H, W) float32 at input resolution (bilinear,
  :func:`drift.maps.upsample`, then :func:`drift.maps.normalize`) with the degeneracy code of each raw map
  (:func:`drift.metrics.degenerate`: 0 ok, 1 non-finite, 2 all zero, 3 constant). :func:`archive_maps` does
  the same for maps read from an archive, so the arrays are exactly the archive's maps, resized.
* :func:`explain_func`: a Quantus ``explain_func`` (``explain_func(model, inputs, targets, **kwargs)`` on NumPy
  batches, returning (N, 1, H, W)); Quantus metrics that re-explain (randomisation tests) call it on each
  perturbed model, which precomputed maps cannot serve.
* :class:`CamAttribution`: a Captum-style ``attribute(inputs, target)`` returning (N, 1, h, w) at the layer's
  grid like Captum's ``LayerGradCam`` (or at input resolution with ``upsample=True``).

All three run :func:`drift.attribution.cams_multi` in batches: one forward pass and one backward pass per batch
serve every method. Neither Quantus nor Captum is imported here; install them with ``.[interop]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .attribution import cams_multi
from .maps import normalize, upsample
from .metrics import degenerate

__all__ = ["CamAttribution", "archive_maps", "explain_func", "export_maps"]


def export_maps(maps: torch.Tensor | np.ndarray, size: int | tuple[int, int],
                norm: str = "minmax") -> tuple[np.ndarray, np.ndarray]:
    """Raw maps (N, h, w) as (N, 1, H, W) float32 at ``size``, normalised per map (``norm``: minmax | sum |
    none), and the (N,) int64 degeneracy code of each raw map (0 = ok)."""
    m = torch.as_tensor(np.asarray(maps) if not isinstance(maps, torch.Tensor) else maps).float()
    if m.ndim != 3 or m.shape[0] < 1:
        raise ValueError(f"maps must have shape (N, h, w) with N >= 1, got {tuple(m.shape)}")
    codes = degenerate(m).cpu().numpy().astype(np.int64)
    out = normalize(upsample(m, size), norm)
    return out[:, None].cpu().numpy().astype(np.float32), codes


def archive_maps(archive, arch: str, phase: str, method: str, layer: str | None = None, score: str | None = None,
                 norm: str = "minmax") -> tuple[np.ndarray, np.ndarray]:
    """The archive's maps of (arch, phase, method, layer, score) as :func:`export_maps` gives them, at the size of
    the archived images (the data's masks or ``models/<arch>/<phase>`` ``input_size``)."""
    from .archive import ArchiveReader

    r = archive if isinstance(archive, ArchiveReader) else ArchiveReader(archive)
    maps = r.maps(arch, phase, method, layer, score)
    size = _image_size(r, arch, phase)
    return export_maps(maps, size, norm)


def _image_size(r, arch: str, phase: str) -> int:
    attrs = r.read(f"models/{arch}/{phase}")
    size = attrs.get("input_size") if isinstance(attrs, dict) else None
    if size:
        return int(size)
    cfg = r.config
    return int(round(cfg.data.image_size * cfg.model.input_scale.get(arch, 1.0)))


def _batched(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, method: str, layer, score: str,
             eps: float, batch_size: int) -> torch.Tensor:
    out = []
    for lo in range(0, len(x), batch_size):
        res = cams_multi(model, x[lo:lo + batch_size], targets[lo:lo + batch_size], methods=(method,),
                         layers=(layer,), scores=(score,), eps=eps)
        out.append(res[layer, score][method].float().cpu())
    return torch.cat(out)


def explain_func(model: nn.Module, inputs, targets, *, method: str = "gradcam++", layer: str = "auto",
                 score: str = "logit", norm: str = "minmax", eps: float = 0.0, batch_size: int = 32,
                 device: str | torch.device | None = None, **_) -> np.ndarray:
    """A Quantus ``explain_func``: drift's CAMs of ``inputs`` (N, C, H, W) for ``targets`` (N,) as (N, 1, H, W)
    float32 at input resolution, normalised per map (``norm``).

    ``layer`` is a preset (``auto``, ``block``, ``last-conv``, ``stride16``), a dotted name or a module;
    presets are resolved on the model Quantus passes (a randomised copy keeps its module names). Extra keyword
    arguments Quantus adds (e.g. ``softmax``) are ignored.
    """
    x = torch.as_tensor(np.asarray(inputs), dtype=torch.float32)
    t = torch.as_tensor(np.asarray(targets), dtype=torch.int64).reshape(-1)
    if device is not None:
        model = model.to(device)
    maps = _batched(model, x, t, method, layer, score, eps, batch_size)
    out, _ = export_maps(maps, tuple(x.shape[-2:]), norm)
    return out


class CamAttribution:
    """Captum-style attribution with drift's CAM engine: ``CamAttribution(model, layer, method).attribute(x,
    target)``.

    Args:
        model: classifier returning logits (B, C).
        layer: a preset (``auto``, ``block``, ``last-conv``, ``stride16``), a dotted name or a module.
        method: a method of :data:`drift.attribution.METHODS` (``gradcam`` is Captum's ``LayerGradCam`` with
            ``relu_attributions=True``).
        score: ``logit`` or ``softmax``.
        eps: the Grad-CAM++ denominator term.
        batch_size: images per forward pass.
    """

    def __init__(self, model: nn.Module, layer: str | nn.Module = "auto", method: str = "gradcam++",
                 score: str = "logit", eps: float = 0.0, batch_size: int = 32):
        self.forward_func = model
        self.layer, self.method, self.score, self.eps, self.batch_size = layer, method, score, eps, batch_size

    def attribute(self, inputs: torch.Tensor, target: int | Sequence[int] | torch.Tensor | None = None,
                  upsample_to_input: bool = False, norm: str = "none") -> torch.Tensor:
        """Maps (N, 1, h, w) at the layer's grid (raw unless ``norm``), or (N, 1, H, W) at input resolution with
        ``upsample_to_input``; ``target`` an int (every image), (N,) indices or None (the predicted class)."""
        x = inputs
        if target is None:
            with torch.no_grad():
                t = self.forward_func(x).argmax(1).cpu()
        elif isinstance(target, int):
            t = torch.full((len(x),), target, dtype=torch.int64)
        else:
            t = torch.as_tensor(target, dtype=torch.int64).reshape(-1).cpu()
        maps = _batched(self.forward_func, x, t, self.method, self.layer, self.score, self.eps, self.batch_size)
        if upsample_to_input:
            maps = upsample(maps, tuple(x.shape[-2:]))
        return normalize(maps, norm)[:, None].to(x.device)
