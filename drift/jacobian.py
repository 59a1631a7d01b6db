"""The exact input Jacobian J = d z / d x (B, C, *S) of a classifier's logits z (B, C) at a batch x, by four
routes (:data:`JACOBIAN_ROUTES`) that agree to float rounding; :mod:`drift.fisher` builds the iFIM on it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _check_model_and_input(model: nn.Module, x: torch.Tensor) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        # BatchNorm in training mode mixes the samples of a batch (and dropout makes z random), so a per-example
        # Jacobian would be wrong: refuse rather than return it.
        shown = ", ".join(training[:3]) + (", ..." if len(training) > 3 else "")
        raise ValueError(
            f"model must be in eval mode (call model.eval()): {len(training)} module(s) in training mode: {shown}"
        )
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(
            f"x must have shape (B, ...) with B >= 1 and at least one input dimension, got {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise ValueError("x contains non-finite values (NaN or inf)")
    if torch.is_inference_mode_enabled():
        raise RuntimeError("input_jacobian needs autograd: call it outside torch.inference_mode() (no_grad is fine)")


def _check_logits(z: object, batch: int) -> torch.Tensor:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"model must return a logits tensor (B, C), got {type(z).__name__}")
    if z.dim() != 2 or z.shape[0] != batch:
        raise ValueError(f"model must return logits of shape (B, C) = ({batch}, C), got {tuple(z.shape)}")
    return z


def _jacobian_loop(model: nn.Module, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass, then one backward pass per class over the retained graph.

    In eval mode the samples of a batch do not interact, so d(sum_b z_bc)/dx_b = dz_bc/dx_b: one backward pass
    yields row c of every sample's Jacobian.
    """
    B, D = x.shape[0], x[0].numel()
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = _check_logits(model(xg), B)
        C = z.shape[1]
        J = torch.empty(B, C, D, dtype=x.dtype, device=x.device)
        for c in range(C):
            (g,) = torch.autograd.grad(z[:, c].sum(), xg, retain_graph=c < C - 1, materialize_grads=True)
            J[:, c] = g.detach().reshape(B, D)
    return J, z.detach()


def _onehot_cotangents(z: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """(stop - start, B, C) cotangents: slice i selects logit start + i of every sample."""
    B, C = z.shape
    eye = torch.eye(C, dtype=z.dtype, device=z.device)[start:stop]
    return eye.unsqueeze(1).expand(stop - start, B, C)


def _jacobian_by_chunks(
    x: torch.Tensor, z: torch.Tensor, chunk: int, rows: Callable[[int, int], torch.Tensor]
) -> torch.Tensor:
    """J (B, C, D) assembled from ``rows(start, stop)``, the (stop - start, B, *S) gradients of logits start ..
    stop - 1 of every sample, over chunks of ``chunk`` classes."""
    (B, C), D = z.shape, x[0].numel()
    J = torch.empty(B, C, D, dtype=x.dtype, device=x.device)
    for start in range(0, C, chunk):
        stop = min(C, start + chunk)
        J[:, start:stop] = rows(start, stop).detach().reshape(stop - start, B, D).transpose(0, 1)
    return J


def _jacobian_vmap(model: nn.Module, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.func: one vjp closure, vmapped over ``chunk`` one-hot cotangents at a time (jacrev with chunks)."""
    from torch.func import vjp, vmap

    with torch.enable_grad():
        z, vjp_fn = vjp(model, x.detach())
        z = _check_logits(z, x.shape[0])
        J = _jacobian_by_chunks(x, z, chunk, lambda start, stop: vmap(vjp_fn)(_onehot_cotangents(z, start, stop))[0])
    return J, z.detach()


def _jacobian_batched_grad(model: nn.Module, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass, ``autograd.grad(..., is_grads_batched=True)`` over ``chunk`` classes at a time."""
    xg = x.detach().requires_grad_(True)
    with torch.enable_grad():
        z = _check_logits(model(xg), x.shape[0])
        C = z.shape[1]

        def rows(start: int, stop: int) -> torch.Tensor:
            cotangents = _onehot_cotangents(z, start, stop)
            return torch.autograd.grad(z, xg, cotangents, retain_graph=stop < C, is_grads_batched=True)[0]

        J = _jacobian_by_chunks(x, z, chunk, rows)
    return J, z.detach()


def _jacobian_replicate(model: nn.Module, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch repeated ``chunk`` times, copy i back-propagating logit start + i: one forward + one backward
    pass of chunk * B inputs per chunk (more arithmetic than ``loop``, fewer and larger launches)."""
    B, D = x.shape[0], x[0].numel()
    x0 = x.detach()
    z0 = None
    start, C = 0, None
    with torch.enable_grad():
        while C is None or start < C:
            n = chunk if C is None else min(chunk, C - start)
            xr = x0.repeat(n, *([1] * (x.dim() - 1))).requires_grad_(True)
            z = _check_logits(model(xr), n * B)
            if C is None:
                C = z.shape[1]
                z0 = z[:B].detach()
                if n > C:  # first chunk guessed too many copies: the gradient simply skips the extra ones
                    n = C
                J = torch.empty(B, C, D, dtype=x.dtype, device=x.device)
            stop = start + n
            go = torch.zeros_like(z).view(-1, B, C)
            go[torch.arange(n, device=z.device), :, torch.arange(start, stop, device=z.device)] = 1
            (g,) = torch.autograd.grad(z, xr, go.view_as(z), materialize_grads=True)
            J[:, start:stop] = g.detach().reshape(-1, B, D)[:n].transpose(0, 1)
            start = stop
    return J, z0


JACOBIAN_ROUTES: dict[str, Callable[[nn.Module, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]] = {
    "loop": _jacobian_loop,
    "vmap": _jacobian_vmap,
    "batched_grad": _jacobian_batched_grad,
    "replicate": _jacobian_replicate,
}


def input_jacobian(
    model: nn.Module, x: torch.Tensor, chunk: int | None = None, route: str = "loop"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact per-example input Jacobian of the logits, J_bcd = d z_bc / d x_bd.

    Differentiates with respect to the input only (frozen parameters are fine) and never touches any
    parameter's ``.grad``. The model must be in eval mode: in training mode BatchNorm couples the samples of a
    batch and the per-example Jacobian is not defined by one forward pass.

    Args:
        model: classifier in eval mode mapping (B, *S) inputs to (B, C) logits.
        x: (B, *S) inputs; J comes out in x's dtype (run model and x in float64 for float64 Jacobians).
        chunk: classes differentiated per backward call by the ``vmap``, ``batched_grad`` and ``replicate``
            routes (default min(C, 8)); the memory those routes add scales with it. ``loop`` handles one class
            per backward pass and ignores it.
        route: one of ``JACOBIAN_ROUTES`` (module docstring); ``loop`` by default.

    Returns:
        J (B, C, D) with D = prod(S), and the logits (B, C), both detached.

    Raises:
        ValueError: model not in eval mode, bad shapes, non-finite x, unknown route or bad chunk.
        TypeError: model, x or the model's output of the wrong type.
        RuntimeError: called inside ``torch.inference_mode()``, where autograd cannot run.
    """
    _check_model_and_input(model, x)
    if route not in JACOBIAN_ROUTES:
        raise ValueError(f"route must be one of {sorted(JACOBIAN_ROUTES)}, got {route!r}")
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    # A tensor made under inference_mode cannot join a graph; a copy can.
    x = x.clone() if x.is_inference() else x
    return JACOBIAN_ROUTES[route](model, x, chunk or 8)
