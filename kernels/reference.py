"""Readable torch references for the kernels in this package.

Every function here states the maths the Triton kernels implement; the kernels are tested against
these (and against float64 evaluations of them). They run on any device and in any floating dtype;
``compute_dtype`` lets a caller evaluate them in float64 for validation.
"""

from __future__ import annotations

import math

import torch


def fisher_factor(J: torch.Tensor, p: torch.Tensor, head: str = "softmax") -> torch.Tensor:
    """The Fisher factor G (B, C, D) of the predictive distribution with respect to the input.

    softmax: G_c = sqrt(p_c) * (J_c - sum_j p_j J_j)   (row c is sqrt(p_c) grad_x log p_c)
    sigmoid: G_c = sqrt(p_c (1 - p_c)) * J_c           (independent Bernoulli outputs)

    so that F = G^T G is the input Fisher matrix J^T (diag(p) - p p^T) J (softmax).
    """
    if head == "softmax":
        mean = torch.einsum("bc,bcd->bd", p, J)
        return p.sqrt().unsqueeze(-1) * (J - mean.unsqueeze(1))
    if head == "sigmoid":
        return (p * (1 - p)).clamp_min(0).sqrt().unsqueeze(-1) * J
    raise ValueError(f"head must be 'softmax' or 'sigmoid', got {head!r}")


def fisher_gram_reference(
    J: torch.Tensor,
    p: torch.Tensor,
    x: torch.Tensor | None = None,
    head: str = "softmax",
    compute_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """K = G G^T (B, C, C) and G x (B, C) of the Fisher factor G (see :func:`fisher_factor`).

    Args:
        J: (B, C, D) input Jacobian of the logits.
        p: (B, C) probabilities (softmax or per-class sigmoid).
        x: optional (B, D) vector to project onto the rows of G.
        compute_dtype: dtype of the arithmetic (default: J's dtype promoted to at least float32).
    Returns:
        K (B, C, C) and G x (B, C) (None when x is None), in float32 unless compute_dtype is float64.
    """
    dt = compute_dtype or torch.promote_types(J.dtype, torch.float32)
    G = fisher_factor(J.to(dt), p.to(dt), head)
    K = G @ G.transpose(1, 2)
    out_dt = torch.float64 if dt == torch.float64 else torch.float32
    Gx = None if x is None else torch.einsum("bcd,bd->bc", G, x.to(dt)).to(out_dt)
    return K.to(out_dt), Gx


def fisher_project_reference(
    J: torch.Tensor,
    p: torch.Tensor,
    W: torch.Tensor,
    head: str = "softmax",
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """G^T W (B, D, m) for a small W (B, C, m): eigenvectors (W = U diag(lambda)^-1/2) and projections."""
    dt = compute_dtype or torch.promote_types(J.dtype, torch.float32)
    G = fisher_factor(J.to(dt), p.to(dt), head)
    out_dt = torch.float64 if dt == torch.float64 else torch.float32
    return (G.transpose(1, 2) @ W.to(dt)).to(out_dt)


def topk_count(n_pixels: int, fraction: float) -> int:
    """Exactly ceil(fraction * n_pixels) pixels (at least 1), guarding against float round-up."""
    k = math.ceil(round(fraction * n_pixels, 9))
    return max(1, min(n_pixels, k))


def topk_masks_reference(a: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean (N, H*W) masks of the top ``fraction`` of pixels of each map in a (N, H, W).

    Exactly ``topk_count(H*W, fraction)`` pixels are selected. Order: value descending; among equal
    values the lower flat (row-major) index comes first. This is the tie rule of every top-k metric.
    """
    flat = a.reshape(a.shape[0], -1)
    n = flat.shape[1]
    k = topk_count(n, fraction)
    # A stable sort of -value keeps equal values in index order: lower flat index first.
    order = torch.sort(-flat.to(torch.float64) if flat.dtype != torch.float64 else -flat, dim=1, stable=True).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask


def topk_iou_reference(
    a: torch.Tensor, b: torch.Tensor, fractions: tuple[float, ...] | list[float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intersections, unions (N, T) int64 and IoU (N, T) float32 of the top-k pixel sets of a and b."""
    inters, unions = [], []
    for f in fractions:
        ma, mb = topk_masks_reference(a, f), topk_masks_reference(b, f)
        inters.append((ma & mb).sum(1))
        unions.append((ma | mb).sum(1))
    inter = torch.stack(inters, 1).to(torch.int64)
    union = torch.stack(unions, 1).to(torch.int64)
    return inter, union, inter.to(torch.float32) / union.to(torch.float32)
