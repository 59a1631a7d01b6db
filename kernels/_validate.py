"""Argument checks shared by the dispatch layer and the kernel launchers.

Each check raises TypeError (wrong kind or dtype) or ValueError (wrong shape, device or value) with a message that
names the argument, and the shape, dtype, index or value at fault. Structural checks never synchronise with the
device; the value checks (probabilities in [0, 1], finite maps) do, once per call.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

HEADS = ("softmax", "sigmoid")


def _need_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _need_float(name: str, t: torch.Tensor) -> None:
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _need_rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if t.dim() != rank:
        raise ValueError(f"{name} must have shape {layout}, got a {t.dim()}-d tensor of shape {tuple(t.shape)}")


def _need_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; put them on one device")


def check_head(head: object) -> str:
    """The head name, validated: 'softmax' or 'sigmoid'."""
    if head not in HEADS:
        raise ValueError(f"head must be 'softmax' or 'sigmoid', got {head!r}")
    return head  # type: ignore[return-value]


def check_fisher_inputs(
    J: object, p: object, head: object, *, x: object = None, W: object = None, check_values: bool = True
) -> None:
    """Validate the arguments of ``fisher_gram`` / ``fisher_project``.

    Shapes: J (B, C, D) floating, p (B, C) floating with entries in [0, 1], x (B, D) floating or None,
    W (B, C, m) floating or None; B, C, D, m >= 1; every tensor on J's device.
    """
    check_head(head)
    J = _need_tensor("J", J)
    p = _need_tensor("p", p)
    _need_float("J", J)
    _need_float("p", p)
    _need_rank("J", J, 3, "(B, C, D)")
    B, C, D = J.shape
    if min(B, C, D) < 1:
        raise ValueError(f"J must have B, C, D >= 1, got shape {tuple(J.shape)}")
    if tuple(p.shape) != (B, C):
        raise ValueError(f"p must have shape (B, C) = {(B, C)} to match J {tuple(J.shape)}, got {tuple(p.shape)}")
    _need_same_device("p", p, "J", J)
    if x is not None:
        x = _need_tensor("x", x)
        _need_float("x", x)
        if tuple(x.shape) != (B, D):
            raise ValueError(f"x must have shape (B, D) = {(B, D)} to match J {tuple(J.shape)}, got {tuple(x.shape)}")
        _need_same_device("x", x, "J", J)
    if W is not None:
        W = _need_tensor("W", W)
        _need_float("W", W)
        if W.dim() != 3 or tuple(W.shape[:2]) != (B, C) or W.shape[2] < 1:
            raise ValueError(f"W must have shape (B, C, m) = ({B}, {C}, m >= 1) to match J, got {tuple(W.shape)}")
        _need_same_device("W", W, "J", J)
    if check_values:
        bad = ~(torch.isfinite(p) & (p >= 0) & (p <= 1))
        if bool(bad.any()):
            b, c = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"p must hold probabilities in [0, 1]; p[{b}, {c}] = {float(p[b, c])}")


def check_kernel_fisher(J: torch.Tensor, max_classes: int) -> None:
    """Limits of the Triton Fisher kernels beyond :func:`check_fisher_inputs`: dtype and number of classes."""
    if J.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"the Triton kernel reads J as float32, float16 or bfloat16, got dtype {J.dtype}")
    if J.shape[1] > max_classes:
        raise ValueError(f"the Triton kernel takes at most C = {max_classes} classes, got J with C = {J.shape[1]}")


def check_fractions(fractions: object) -> tuple[float, ...]:
    """The top-k fractions as a tuple of floats, each in (0, 1]; at least one."""
    if isinstance(fractions, torch.Tensor):
        if fractions.dtype != torch.float64:
            # float32(0.2) = 0.2000000030 and ceil(0.2000000030 * 25) = 6, not 5: refuse rather than miscount.
            raise TypeError(
                f"fractions given as a tensor must be float64 (got {fractions.dtype}, whose rounding changes "
                "ceil(f * H * W)); pass Python floats or a float64 tensor"
            )
        fractions = fractions.detach().reshape(-1).tolist()
    if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Iterable):
        raise TypeError(f"fractions must be a sequence of floats in (0, 1], got {type(fractions).__name__}")
    out = []
    for i, f in enumerate(fractions):
        if isinstance(f, bool) or not isinstance(f, (int, float)):
            raise TypeError(f"fractions[{i}] must be a real number, got {type(f).__name__} {f!r}")
        f = float(f)
        if not (math.isfinite(f) and 0.0 < f <= 1.0):
            raise ValueError(f"fractions[{i}] must lie in (0, 1], got {f!r}")
        out.append(f)
    if not out:
        raise ValueError("fractions must hold at least one fraction in (0, 1], got an empty sequence")
    return tuple(out)


def check_maps(a: object, b: object, *, check_values: bool = True) -> None:
    """Validate two stacks of maps a, b (N, H, W): same shape, same device, floating, finite.

    A non-finite value raises ValueError naming the tensor and the index of the first map that holds one.
    """
    a = _need_tensor("a", a)
    b = _need_tensor("b", b)
    _need_float("a", a)
    _need_float("b", b)
    _need_rank("a", a, 3, "(N, H, W)")
    if tuple(b.shape) != tuple(a.shape):
        raise ValueError(f"b must have the shape of a {tuple(a.shape)}, got {tuple(b.shape)}")
    _need_same_device("b", b, "a", a)
    if a.shape[1] * a.shape[2] < 1:
        raise ValueError(f"maps must have at least one pixel, got a of shape {tuple(a.shape)}")
    if check_values and a.shape[0] > 0:
        for name, t in (("a", a), ("b", b)):
            bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
            if bool(bad.any()):
                n = int(bad.nonzero()[0, 0])
                raise ValueError(f"{name}[{n}] (map index {n}) holds non-finite values (NaN or inf)")
