"""The pipeline's iFIM step on one input Jacobian per batch (:func:`ifim_study`): the spectra of the first n test
images, and the components and perturbation experiment (:mod:`drift.perturb`) of the first m, each image
differentiated once."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import nn

from .fisher import IFIM, Components, head_probs, ifim_from_jacobian, input_jacobian
from .perturb import PerturbationResult, _Perturbations, run_perturbations


@dataclass
class IFIMStudy:
    """iFIM spectra of n inputs, and the components and perturbation experiment of the first m of them.

    Attributes:
        eigenvalues: (n, r) float64 nonzero spectrum of F at each input (:class:`drift.fisher.IFIM`).
        rank: (n,) int64 numerical rank of F.
        probs: (n, C) float64 head probabilities at x.
        x: (m, *S) the first m inputs, as ``load`` returned them.
        x_high: (m, *S) V_k V_k^T x in x's dtype (x_low = x - x_high).
        components: :class:`drift.fisher.Components` of the m inputs.
        perturbation: :class:`PerturbationResult` of the m inputs.

    Tensors are on the CPU.
    """

    eigenvalues: torch.Tensor
    rank: torch.Tensor
    probs: torch.Tensor
    x: torch.Tensor
    x_high: torch.Tensor
    components: Components
    perturbation: PerturbationResult


@dataclass
class _StudyBatch:
    """One batch of :func:`ifim_study`, on the CPU: spectrum rows (below n) and component rows (below m)."""

    eigenvalues: torch.Tensor
    rank: torch.Tensor
    probs: torch.Tensor
    x: torch.Tensor
    x_high: torch.Tensor
    components: Components | None
    outcomes: dict[str, np.ndarray] | None


def _rows(spec: IFIM, n: int) -> IFIM:
    """The spectrum of a batch's first n samples: every per-sample tensor cut to its first n rows."""
    values = {f.name: getattr(spec, f.name) for f in fields(IFIM)}
    return IFIM(**{name: v[:n] if isinstance(v, torch.Tensor) else v for name, v in values.items()})


def ifim_study(
    model: nn.Module,
    load: Callable[[np.ndarray], torch.Tensor],
    labels: torch.Tensor | np.ndarray | Sequence[int],
    n_spectrum: int,
    n_components: int,
    schedule: Callable[[list[int]], list[int]] = list,
    gather: Callable[[list[_StudyBatch]], list[_StudyBatch]] = list,
    region_of: Callable[[np.ndarray], torch.Tensor] | None = None,
    **settings: Any,
) -> IFIMStudy:
    """The iFIM spectrum of inputs 0 .. n - 1 and the components and perturbations of inputs 0 .. m - 1, from one
    input Jacobian per batch.

    The inputs are taken in batches [i b, (i + 1) b) of the first max(n, m) (b = ``batch_size``). Each batch's
    Jacobian and spectrum (eigenvalues and the C x C eigenvectors U; the D-sized eigenvectors of F are never
    formed) serve its rows below n (spectrum) and below m (perturbations, whose directions carry x_high and the
    components). The result is that of :func:`drift.fisher.ifim` over batches [i b, (i + 1) b) of the first n,
    :func:`run_perturbations` over the first m and :func:`drift.fisher.decompose` over batches of the first m,
    with one Jacobian per image instead of up to three: bit for bit when n = m or min(n, m) is a multiple of b.
    Otherwise those three differentiated the images of the batch straddling min(n, m) in two batches of different
    sizes, which can change a Jacobian's last bits; here the smaller set's rows come from the larger set's batch.

    Args:
        model: classifier in eval mode, (B, *S) -> (B, C) logits.
        load: ``load(idx)`` returns the inputs of the int64 indices ``idx`` as a (len(idx), *S) tensor on the
            model's device.
        labels: (m,) int class indices of inputs 0 .. m - 1.
        n_spectrum: n >= 1, inputs with a spectrum.
        n_components: m >= 1, inputs with components and perturbations.
        schedule: the batches this process computes, given the start index of every batch (default: all).
        gather: every batch's result in schedule order, given this process's (default: its own). With
            ``drift.distributed.my_batches`` and ``gather_batches`` the processes of a run share the batches;
            each batch is computed as one process computes it, so the result does not change.
        region_of: ``region_of(idx)`` returns the (len(idx), *S) bool regions of the ``cam`` control of the
            inputs ``idx`` (:func:`run_perturbations`' ``region``); None: that control is NaN.
        settings: keyword arguments of :func:`run_perturbations` (eps_grid, alphas, k, energy, head, n_draws,
            seed, batch_size, rtol), with its defaults.

    Returns:
        :class:`IFIMStudy`.
    """
    for name, v in (("n_spectrum", n_spectrum), ("n_components", n_components)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    n, m = int(n_spectrum), int(n_components)
    defaults = [p for p in list(inspect.signature(run_perturbations).parameters.values())[3:] if p.name != "region"]
    unknown = set(settings) - {p.name for p in defaults}
    if unknown:
        raise TypeError(f"ifim_study got unknown settings {sorted(unknown)}; see run_perturbations")
    st = {p.name: settings.get(p.name, p.default) for p in defaults}
    head, batch_size, rtol = st["head"], st["batch_size"], st["rtol"]
    exp = _Perturbations(model, labels, m, **st)
    total = max(n, m)
    parts = []
    for start in schedule(list(range(0, total, batch_size))):
        xb = load(np.arange(start, min(total, start + batch_size)))
        J, z = input_jacobian(model, xb)
        spec = ifim_from_jacobian(J, head_probs(z, head), xb, head, rtol, eigenvectors=False, logits=z)
        ns, nc = max(0, min(n - start, len(xb))), max(0, min(m - start, len(xb)))
        dirs, outcomes = None, None
        region = None if region_of is None or nc == 0 else region_of(np.arange(start, start + nc)).to(xb.device)
        if nc == len(xb):
            dirs, outcomes = exp.batch(xb, J, z, start, spec, region)
        elif nc > 0:
            dirs, outcomes = exp.batch(xb[:nc], J[:nc], z[:nc], start, _rows(spec, nc), region)
        parts.append(
            _StudyBatch(
                eigenvalues=spec.eigenvalues[:ns].double().cpu(),
                rank=spec.rank[:ns].cpu(),
                probs=spec.probs[:ns].double().cpu(),
                x=xb[:nc].cpu(),
                x_high=xb[:0].cpu() if dirs is None else dirs.x_high.cpu(),
                components=None
                if dirs is None
                else Components(**{f.name: getattr(dirs.components, f.name).cpu() for f in fields(Components)}),
                outcomes=outcomes,
            )
        )
    parts = gather(parts)
    with_components = [p for p in parts if p.components is not None]
    return IFIMStudy(
        eigenvalues=torch.cat([p.eigenvalues for p in parts]),
        rank=torch.cat([p.rank for p in parts]),
        probs=torch.cat([p.probs for p in parts]),
        x=torch.cat([p.x for p in parts]),
        x_high=torch.cat([p.x_high for p in parts]),
        components=Components(
            **{f.name: torch.cat([getattr(p.components, f.name) for p in with_components]) for f in fields(Components)}
        ),
        perturbation=exp.result([p.outcomes for p in with_components]),
    )


# ---------------------------------------------------------------------------------------------- the pipeline's controls
def untrained_model(pipe, arch: str) -> nn.Module:
    """The untrained control of ``arch``: the classifier built under the run's seed with the architecture's own
    initialiser, its BatchNorm statistics estimated on the training images (as ``model.weights = "none"``)."""
    from .models import build
    from .train import BN_CALIBRATION_IMAGES, calibrate_bn

    cfg = pipe.cfg
    side = pipe.input_size(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.run.seed)
        model = build(arch, len(pipe.class_names), cfg.model.dropout, 0 if side == cfg.data.image_size else side)
    model = model.to(pipe.device)
    calibrate_bn(model, pipe.splits.train, pipe.device, max_images=BN_CALIBRATION_IMAGES)
    return model.eval()


def cam_regions(maps: np.ndarray, shape: Sequence[int], fraction: float) -> torch.Tensor:
    """The top-``fraction`` region of each map: maps (N, h, w) upsampled to the inputs' (H, W) (bilinear), the
    ceil(fraction H W) highest pixels of each (ties broken by position), as a bool mask broadcast to the inputs'
    shape (N, *shape) with shape = (channels, H, W)."""
    from .maps import upsample

    H, W = shape[-2:]
    u = upsample(torch.as_tensor(maps, dtype=torch.float64), (H, W)).flatten(1)
    n_top = max(1, int(np.ceil(fraction * H * W)))
    top = torch.zeros_like(u, dtype=torch.bool)
    top.scatter_(1, u.argsort(dim=1, descending=True, stable=True)[:, :n_top], True)
    return top.view(-1, 1, H, W).expand(-1, *shape).contiguous()
