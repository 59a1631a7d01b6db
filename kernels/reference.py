"""Readable torch references for the kernels in this package.

Every function here states the maths the Triton kernels implement; the kernels are tested against
these (and against float64 evaluations of them). They run on any device and in any floating dtype;
``compute_dtype`` lets a caller evaluate them in float64 for validation.
"""

from __future__ import annotations

import math
from typing import Literal

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


#: Tie rules of the top-k overlap: "fractional" (the default here), "jaccard" (weighted Jaccard of the same
#: fractional memberships: reflexive) and "index" (lower flat index first).
TOPK_TIES = ("fractional", "jaccard", "index")

TopkTies = Literal["fractional", "jaccard", "index"]

#: The rules that share the fractional memberships and the kernel's six class-pair counts.
MEMBERSHIP_TIES = ("fractional", "jaccard")


def check_ties(ties: object) -> str:
    """The tie rule, validated: 'fractional', 'jaccard' or 'index' (see :func:`topk_iou_reference`)."""
    if not isinstance(ties, str) or ties not in TOPK_TIES:
        raise ValueError(f"ties must be 'fractional', 'jaccard' or 'index', got {ties!r}")
    return ties


def topk_count(n_pixels: int, fraction: float) -> int:
    """Exactly ceil(fraction * n_pixels) pixels (at least 1), guarding against float round-up."""
    k = math.ceil(round(fraction * n_pixels, 9))
    return max(1, min(n_pixels, k))


def _flat64(a: torch.Tensor) -> torch.Tensor:
    """(N, H*W) float64 view of maps (N, H, W); exact for every floating input dtype."""
    flat = a.reshape(a.shape[0], -1)
    return flat if flat.dtype == torch.float64 else flat.to(torch.float64)


def topk_masks_reference(a: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean (N, H*W) masks of the top ``fraction`` of pixels of each map in a (N, H, W), index tie rule.

    Exactly ``topk_count(H*W, fraction)`` pixels are selected. Order: value descending; among equal
    values the lower flat (row-major) index comes first (the ``ties="index"`` rule).
    """
    flat = a.reshape(a.shape[0], -1)
    n = flat.shape[1]
    k = topk_count(n, fraction)
    # A stable sort of -value keeps equal values in index order: lower flat index first.
    order = torch.sort(-_flat64(a), dim=1, stable=True).indices
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask


def topk_classes_reference(a: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixel classes of the top-k cut of each map in a (N, H, W): above the threshold or tied with it.

    With k = topk_count(H*W, fraction) and t the k-th largest value of a map (IEEE comparisons: -0.0 == +0.0):

    Returns:
        above (N, H*W) bool, v > t; tied (N, H*W) bool, v == t; need (N,) int64 = k - #{v > t}, the number of
        tied pixels the top set takes (1 <= need <= #{v == t}).
    """
    flat = _flat64(a)
    return _classes(flat, torch.sort(flat, dim=1, descending=True).values, topk_count(flat.shape[1], fraction))


def _classes(flat: torch.Tensor, desc: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Above / tied masks and the tied pixels taken, for maps ``flat`` (N, P) whose rows sorted descending are
    ``desc``: one sort serves every fraction."""
    t = desc[:, k - 1 : k]
    above, tied = flat > t, flat == t
    return above, tied, k - above.sum(1)


def topk_weights_reference(a: torch.Tensor, fraction: float, ties: TopkTies = "fractional") -> torch.Tensor:
    """Top-k membership weights (N, H*W) float64 of each map in a (N, H, W); every row sums to k (to rounding).

    fractional: w_i = 1 if v_i > t, (k - n_above) / n_tied if v_i == t, else 0, with t the k-th largest value,
    n_above = #{v > t} and n_tied = #{v == t}: the probability that pixel i is in the top set when the tied
    pixels are taken in a uniformly random order (the memberships of both "fractional" and "jaccard"). index: the
    0/1 mask of :func:`topk_masks_reference`.
    """
    if check_ties(ties) == "index":
        return topk_masks_reference(a, fraction).to(torch.float64)
    above, tied, need = topk_classes_reference(a, fraction)
    share = need.to(torch.float64) / tied.sum(1).to(torch.float64)
    return above.to(torch.float64) + tied.to(torch.float64) * share[:, None]


def topk_overlap_from_counts(
    counts: torch.Tensor, need_a: torch.Tensor, need_b: torch.Tensor, ks: torch.Tensor, ties: str = "fractional"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fractional-tie intersection, union and IoU (N, T) float64 from integer class counts.

    With ">" meaning above the map's threshold and "=" tied with it, counts (N, T, 6) holds the pixel counts
    #{a>, b>}, #{a>, b=}, #{a=, b>}, #{a=, b=}, n_a = #{a=} and n_b = #{b=}; need_a, need_b (N, T) are the tied
    pixels each top set takes (r = k - #{v > t}) and ks (T,) the set sizes. Summing w_a w_b over the nine
    class pairs (only four have both weights non-zero):

        inter = #{a>, b>} + #{a>, b=} r_b / n_b + #{a=, b>} r_a / n_a + #{a=, b=} r_a r_b / (n_a n_b),

    union = 2k - inter and IoU = inter / union. ``ties="jaccard"`` takes the weighted Jaccard index of the same
    memberships, inter = sum_i min(w_a,i, w_b,i) and union = sum_i max(w_a,i, w_b,i) = 2k - inter:

        inter = #{a>, b>} + #{a>, b=} r_b / n_b + #{a=, b>} r_a / n_a + #{a=, b=} min(r_a / n_a, r_b / n_b),

    so IoU(x, x) = k / k = 1 exactly, and 1 - IoU is a metric (the weighted Jaccard distance). Integer products
    are formed exactly, then each term takes one float64 rounding, so integer intersections (no cut inside a tie
    group) come out exact (and a map with itself gives inter = union = k exactly). The kernel and the reference
    both finish here, on the same integers, and so agree bit for bit.
    """
    aa, at, ta, tt, n_a, n_b = counts.to(torch.int64).unbind(-1)
    r_a, r_b = need_a.to(torch.int64), need_b.to(torch.int64)
    f64 = torch.float64
    if ties == "jaccard":
        # min(r_a / n_a, r_b / n_b) chosen on exact integers (r_a n_b <= r_b n_a), then one rounding.
        a_less = r_a * n_b <= r_b * n_a
        both = torch.where(a_less, (tt * r_a).to(f64) / n_a.to(f64), (tt * r_b).to(f64) / n_b.to(f64))
    else:
        both = (tt * r_a).to(f64) * r_b.to(f64) / (n_a * n_b).to(f64)
    # The two one-sided terms are added to each other first: swapping a and b swaps them, and IEEE addition is
    # commutative, so IoU(a, b) == IoU(b, a) bit for bit.
    inter = aa.to(f64) + ((at * r_b).to(f64) / n_b.to(f64) + (ta * r_a).to(f64) / n_a.to(f64)) + both
    union = 2 * ks.to(device=inter.device, dtype=f64) - inter
    return inter, union, inter / union


def topk_iou_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    fractions: tuple[float, ...] | list[float],
    ties: TopkTies = "fractional",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intersections, unions and IoU (N, T) of the top-k pixel sets of maps a and b (N, H, W), T fractions.

    Each set holds k = topk_count(H*W, f) pixels by value descending; ``ties`` decides how a cut through a group
    of equal values (t = the k-th largest value) is made:

    * ``"fractional"`` (default): every tied pixel gets membership weight w = (k - #{v > t}) / #{v == t}
      (pixels above t weigh 1; see :func:`topk_weights_reference`) and inter = sum_i w_a,i w_b,i, the expected
      intersection when both maps break their ties uniformly at random and independently; union = 2k - inter.
      Returns inter, union, iou as float64 (computed by :func:`topk_overlap_from_counts`). Without a cut inside a
      tie group this equals the index rule's counts exactly.
    * ``"jaccard"``: the same memberships, weighted Jaccard: inter = sum_i min(w_a,i, w_b,i), union =
      sum_i max(w_a,i, w_b,i) = 2k - inter (float64). Equal to the set IoU when no cut passes through a tie group,
      exactly 1 for identical maps, independent of pixel order; 1 - IoU is a metric. (The fractional rule's
      IoU(x, x) falls below 1 whenever x's cut passes through a tie group.)
    * ``"index"``: the tied pixels of lower flat (row-major) index are taken first; exact counts. Returns inter,
      union as int64 and iou float32. On sparse maps (many exact zeros) it makes equal low-index zeros agree.
    """
    if check_ties(ties) == "index":
        inters, unions = [], []
        for f in fractions:
            ma, mb = topk_masks_reference(a, f), topk_masks_reference(b, f)
            inters.append((ma & mb).sum(1))
            unions.append((ma | mb).sum(1))
        inter = torch.stack(inters, 1).to(torch.int64)
        union = torch.stack(unions, 1).to(torch.int64)
        return inter, union, inter.to(torch.float32) / union.to(torch.float32)
    counts, need_a, need_b = [], [], []
    # float32 holds every float16 / bfloat16 / float32 value exactly, so order and ties are those of the input.
    fa, fb = (_flat64(m) if m.dtype == torch.float64 else m.reshape(m.shape[0], -1).to(torch.float32) for m in (a, b))
    da, db = (torch.sort(m, dim=1, descending=True).values for m in (fa, fb))
    for f in fractions:
        k = topk_count(fa.shape[1], f)
        above_a, tied_a, r_a = _classes(fa, da, k)
        above_b, tied_b, r_b = _classes(fb, db, k)
        # Class codes 0 below, 1 tied, 2 above; one bincount of the nine (a, b) code pairs per row counts them all.
        code = (2 * above_a + tied_a).to(torch.int64) * 3 + (2 * above_b + tied_b).to(torch.int64)
        rows = torch.arange(code.shape[0], device=code.device)[:, None] * 9
        c = torch.bincount((code + rows).reshape(-1), minlength=code.shape[0] * 9).reshape(-1, 3, 3)
        counts.append(torch.stack([c[:, 2, 2], c[:, 2, 1], c[:, 1, 2], c[:, 1, 1], c[:, 1].sum(1), c[:, :, 1].sum(1)],
                                  1))
        need_a.append(r_a)
        need_b.append(r_b)
    n_pix = a.shape[1] * a.shape[2]
    ks = torch.tensor([topk_count(n_pix, f) for f in fractions], dtype=torch.int64, device=a.device)
    return topk_overlap_from_counts(torch.stack(counts, 1), torch.stack(need_a, 1), torch.stack(need_b, 1), ks,
                                    ties)
