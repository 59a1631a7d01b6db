"""Scores of a classification head from float64 logits, for the perturbation experiments (:mod:`drift.perturb`).

A float32 softmax saturates (p_pred rounds to 1 at a margin of about 17, and changes below ~6e-8 vanish), so every
outcome is computed from the model's logits cast to float64: the KL divergence between two heads' distributions
(non-negative by construction), and the predicted class's log-odds and margin, which do not saturate.
"""

from __future__ import annotations

import math

import torch

__all__ = ["kl_categorical", "kl_from_logits", "logodds_and_margin"]


def _expm1_minus_x(y: torch.Tensor) -> torch.Tensor:
    """exp(y) - 1 - y without cancellation: its Taylor series y^2 (1/2 + y/6 + y^2/24 + y^3/120 + y^4/720) for
    |y| < 1e-2 (truncation below 1e-16 relative), expm1(y) - y elsewhere."""
    series = y * y * (0.5 + y * (1 / 6 + y * (1 / 24 + y * (1 / 120 + y / 720))))
    return torch.where(y.abs() < 1e-2, series, torch.expm1(y) - y)


def kl_categorical(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """KL(softmax(z0) || softmax(z1)) over the last axis, float64, >= 0 by construction.

    With delta = z1 - z0, p = softmax(z0) and y = delta - sum_c p_c delta_c: KL = log sum_c p_c exp(y_c)
    = log1p(sum_c p_c (expm1(y_c) - y_c)) (sum_c p_c y_c = 0), a sum of non-negative terms; where some |y_c| >= 1
    (exp could overflow) as logsumexp_c(log p_c + y_c), clamped at 0."""
    z0, z1 = z0.double(), z1.double()
    logp = torch.log_softmax(z0, -1)
    p = logp.exp()
    delta = z1 - z0
    y = delta - torch.where(p > 0, p * delta, 0).sum(-1, keepdim=True)
    small = torch.where(p > 0, y.abs(), 0).amax(-1) < 1
    ys = torch.where(small.unsqueeze(-1), y, 0)
    near = torch.log1p(torch.where(p > 0, p * _expm1_minus_x(ys).clamp_min(0), 0).sum(-1))
    far = torch.logsumexp(logp + y, -1).clamp_min(0)
    return torch.where(small, near, far)


def kl_from_logits(z0: torch.Tensor, z1: torch.Tensor, head: str) -> torch.Tensor:
    """KL(p(z0) || p(z1)) (..., C) -> (...) in float64: categorical (softmax) or summed Bernoulli KLs (sigmoid,
    each the categorical KL of the logits (z_c, 0))."""
    if head == "softmax":
        return kl_categorical(z0, z1)
    z0, z1 = z0.double(), z1.double()
    pair = lambda z: torch.stack([z, torch.zeros_like(z)], -1)  # noqa: E731
    return kl_categorical(pair(z0), pair(z1)).sum(-1)


def logodds_and_margin(z: torch.Tensor, pred: torch.Tensor, head: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-odds L and margin M of class ``pred`` from logits z (..., C) (float64): softmax L = z_pred -
    logsumexp_{c != pred} z_c, sigmoid L = z_pred; M = z_pred - max_{c != pred} z_c. ``pred`` broadcasts as (...)."""
    z = z.double()
    idx = pred.unsqueeze(-1).expand(*z.shape[:-1], 1)
    zp = z.gather(-1, idx).squeeze(-1)
    others = z.scatter(-1, idx, -math.inf)
    margin = zp - others.amax(-1)
    return (zp - torch.logsumexp(others, -1) if head == "softmax" else zp), margin
