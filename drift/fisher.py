"""Input-dependent Fisher information (iFIM) of a classifier: Jacobian engine, spectrum and components.

For one input x with D elements, logits z(x) (C,), p = softmax(z) and the input Jacobian J = dz/dx (C x D), the
Fisher factor G (C x D) has rows

    softmax head:  G_c = sqrt(p_c) (J_c - p^T J)      (= sqrt(p_c) grad_x log p_c)
    sigmoid head:  G_c = sqrt(p_c (1 - p_c)) J_c      (independent Bernoulli outputs)

so that the iFIM is F = G^T G (D x D, never formed here) and KL(p(x) || p(x + d)) = 1/2 d^T F d + O(|d|^3).
The Gram matrix K = G G^T (C x C) has the same nonzero eigenvalues as F; if K u_i = lambda_i u_i then
v_i = G^T u_i / sqrt(lambda_i) are orthonormal eigenvectors of F. rank F <= C - 1 for the softmax head
(sum_c sqrt(p_c) G_c = 0) and <= C for the sigmoid head. The top-k eigenvectors split an input into
x_high = V_k V_k^T x and x_low = x - x_high, with projection coefficients v_i^T x = u_i^T (G x) / sqrt(lambda_i)
read off G x, so no second pass over G is needed for them.

References for the formulas above: F(x) = E_{y ~ p(y|x)}[grad_x log p(y|x) grad_x log p(y|x)^T], the Fisher
information of the predictive distribution taken with respect to the input instead of the parameters; for a
categorical p it equals J^T (diag(p) - p p^T) J = G^T G (Martens, "New Insights and Perspectives on the Natural
Gradient Method", JMLR 21(146), 2020, the Fisher of a softmax output as a generalised Gauss-Newton matrix, with the
input in place of the parameters). The KL expansion is the classical one (Amari, "Natural Gradient Works Efficiently
in Learning", Neural Computation 10(2), 1998). The Gram route rests on AB and BA sharing their nonzero eigenvalues
(Horn & Johnson, "Matrix Analysis", 2nd ed., Theorem 1.3.22); v_i = G^T u_i / sqrt(lambda_i) is the singular-vector
pairing of the SVD of G.

K and G x come from ``drift_kernels.fisher_gram`` (one pass over J, G never materialised) and G^T W from
``drift_kernels.fisher_project``; the C x C eigendecomposition runs in float64. Every function here is
dtype-agnostic: a model run in float64 gives float64 Jacobians and the whole computation stays in float64
(the torch references evaluate the kernels' maths in float64 then), which is how the tests compare against a
brute-force D x D Fisher matrix to 1e-6.

Jacobian routes (:data:`JACOBIAN_ROUTES`, all exact, agreeing to float rounding): ``loop`` (one forward pass, C
backward passes over the retained graph; the default), ``vmap``, ``batched_grad`` and ``replicate``.
``bench/jacobian_routes.py`` times them side by side; docs/benchmarks.md holds the measurements.

Memory bound of :func:`input_jacobian` (bytes, s = bytes per element of x):

    J itself:        B * C * D * s                  (C = 1000, D = 3*224*224, B = 8, fp32: 4.8 GB)
    route ``loop``:  + one forward graph of B inputs + one backward pass's workspace (independent of C)
    other routes:    + about ``chunk`` times the graph / backward workspace of B inputs

so ``loop`` keeps the transient memory of a plain training step whatever C is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import drift_kernels
import torch
from drift_kernels.reference import fisher_gram_reference, fisher_project_reference
from torch import nn

from .jacobian import JACOBIAN_ROUTES, _check_logits, _check_model_and_input, input_jacobian  # noqa: F401

__all__ = [
    "IFIM",
    "Components",
    "JACOBIAN_ROUTES",
    "decompose",
    "decompose_from_jacobian",
    "default_rtol",
    "fisher_apply",
    "fisher_quadratic",
    "head_probs",
    "ifim",
    "ifim_from_jacobian",
    "input_jacobian",
]

HEADS = ("softmax", "sigmoid")

# Relative eigenvalue tolerance by Jacobian dtype: an eigenvalue of K counts as zero at or below rtol * lambda_max.
# The rounding floor of K behind each value is measured in docs/design.md ("The iFIM step").
_DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def default_rtol(dtype: torch.dtype) -> float:
    """Relative eigenvalue tolerance used when ``rtol`` is None, for a Jacobian of this dtype.

    float64: 1e-10, float32: 1e-5, float16: 1e-3, bfloat16: 1e-2 (the measurements behind them: docs/design.md).
    """
    if dtype not in _DEFAULT_RTOL:
        raise TypeError(f"no default eigenvalue tolerance for Jacobian dtype {dtype}; pass rtol explicitly")
    return _DEFAULT_RTOL[dtype]


# --------------------------------------------------------------------------------------------------------------
# Fisher factor helpers
# --------------------------------------------------------------------------------------------------------------


def head_probs(logits: torch.Tensor, head: str = "softmax") -> torch.Tensor:
    """Probabilities of a classification head: softmax(z) over classes, or sigmoid(z_c) per class.

    Args:
        logits: (B, C).
        head: ``"softmax"`` or ``"sigmoid"``.

    Returns:
        (B, C) probabilities in the logits' dtype.
    """
    _check_head(head)
    return torch.softmax(logits, dim=-1) if head == "softmax" else torch.sigmoid(logits)


def _check_head(head: str) -> None:
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")


def _check_jp(J: torch.Tensor, p: torch.Tensor, head: str) -> tuple[int, int, int]:
    _check_head(head)
    if not isinstance(J, torch.Tensor) or not isinstance(p, torch.Tensor):
        raise TypeError(f"J and p must be tensors, got {type(J).__name__} and {type(p).__name__}")
    if J.dim() != 3:
        raise ValueError(f"J must have shape (B, C, D), got {tuple(J.shape)}")
    B, C, D = J.shape
    if p.shape != (B, C):
        raise ValueError(f"p must have shape (B, C) = ({B}, {C}) to match J {tuple(J.shape)}, got {tuple(p.shape)}")
    if not J.is_floating_point() or not p.is_floating_point():
        raise TypeError(f"J and p must be floating point, got {J.dtype} and {p.dtype}")
    if J.device != p.device:
        raise ValueError(f"J and p must be on one device, got {J.device} and {p.device}")
    if head == "softmax" and C < 2:
        raise ValueError(f"the softmax head needs C >= 2 classes, got C = {C}")
    if not torch.isfinite(p).all():
        raise ValueError("p contains non-finite values (NaN or inf)")
    if (p < 0).any() or (p > 1).any():
        raise ValueError(
            f"p must hold probabilities in [0, 1], got values in [{float(p.min()):.4g}, {float(p.max()):.4g}]; "
            "pass probabilities, not logits"
        )
    if head == "softmax":
        sums = p.sum(1, dtype=torch.float64)
        bad = (sums - 1).abs() > 1e-3
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(
                f"p rows must sum to 1 for the softmax head (row {i} sums to {float(sums[i]):.6g}); "
                "pass probabilities, not logits"
            )
    return B, C, D


def _flat_batch(t: torch.Tensor, B: int, D: int, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.shape[0] != B or t[0].numel() != D:
        raise ValueError(
            f"{name} must have shape (B, ...) with B = {B} and {D} elements per sample, got {tuple(t.shape)}"
        )
    return t.reshape(B, D)


def _gram(J: torch.Tensor, p: torch.Tensor, x: torch.Tensor | None, head: str):
    # The kernels take fp32/fp16/bf16; float64 (validation runs) goes to the reference evaluated in float64.
    if J.dtype == torch.float64:
        return fisher_gram_reference(J, p, x, head, compute_dtype=torch.float64)
    return drift_kernels.fisher_gram(J, p.float(), None if x is None else x.float(), head)


def _project(J: torch.Tensor, p: torch.Tensor, W: torch.Tensor, head: str) -> torch.Tensor:
    if J.dtype == torch.float64:
        return fisher_project_reference(J, p, W, head, compute_dtype=torch.float64)
    return drift_kernels.fisher_project(J, p.float(), W.float(), head)


def _factor_scale(p: torch.Tensor, head: str) -> torch.Tensor:
    return p.sqrt() if head == "softmax" else (p * (1 - p)).clamp_min(0).sqrt()


def fisher_apply(J: torch.Tensor, p: torch.Tensor, X: torch.Tensor, head: str = "softmax") -> torch.Tensor:
    """G X for the Fisher factor G, without forming G: one batched product with J plus C-sized arithmetic.

    softmax: (G X)_c = sqrt(p_c) ((J X)_c - sum_j p_j (J X)_j);  sigmoid: (G X)_c = sqrt(p_c (1 - p_c)) (J X)_c.

    Args:
        J: (B, C, D) input Jacobian of the logits.
        p: (B, C) probabilities.
        X: (B, D) or (B, D, m) vectors (a (B, *S) tensor with prod(S) = D is read as (B, D)).
        head: ``"softmax"`` or ``"sigmoid"``.

    Returns:
        (B, C) or (B, C, m) in J's dtype promoted to at least float32.
    """
    B, C, D = _check_jp(J, p, head)
    single = not (X.dim() == 3 and X.shape[1] == D and X.shape[0] == B)
    Xm = _flat_batch(X, B, D, "X").unsqueeze(-1) if single else X
    dt = torch.promote_types(J.dtype, torch.float32)
    JX = torch.bmm(J.to(dt), Xm.to(dt))  # (B, C, m)
    pp = p.to(dt)
    if head == "softmax":
        JX = JX - torch.einsum("bc,bcm->bm", pp, JX).unsqueeze(1)
    GX = _factor_scale(pp, head).unsqueeze(-1) * JX
    return GX.squeeze(-1) if single else GX


def fisher_quadratic(J: torch.Tensor, p: torch.Tensor, d: torch.Tensor, head: str = "softmax") -> torch.Tensor:
    """The second-order KL prediction 1/2 d^T F d = 1/2 |G d|^2, F never formed.

    KL(p(x) || p(x + d)) = 1/2 d^T F d + O(|d|^3) (softmax: categorical KL; sigmoid: sum of Bernoulli KLs).

    Args:
        J: (B, C, D) input Jacobian.
        p: (B, C) probabilities at x.
        d: (B, D) or (B, *S) perturbations.
        head: ``"softmax"`` or ``"sigmoid"``.

    Returns:
        (B,) float64.
    """
    Gd = fisher_apply(J, p, d, head)
    return 0.5 * Gd.double().pow(2).sum(-1)


# --------------------------------------------------------------------------------------------------------------
# Spectrum
# --------------------------------------------------------------------------------------------------------------


@dataclass
class IFIM:
    """Nonzero spectrum of the input Fisher matrix F = G^T G of each sample, from K = G G^T.

    Attributes:
        eigenvalues: (B, r) float64, descending; zero beyond each sample's numerical rank. r = C - 1 (softmax)
            or C (sigmoid).
        eigenvectors: (B, r, *S) unit-norm eigenvectors v_i = G^T u_i / sqrt(lambda_i) of F in the Jacobian's
            dtype (zero vectors beyond the rank), or None when not requested.
        probs: (B, C) probabilities at x.
        logits: (B, C) logits, or None when built from a Jacobian alone.
        rank: (B,) int64 number of eigenvalues above rtol * lambda_max.
        K: (B, C, C) float64 Gram matrix G G^T (symmetrised; softmax: with the exact null vector sqrt(p)
            projected out, which only removes rounding since K sqrt(p) = 0).
        U: (B, C, r) float64 eigenvectors of K matching ``eigenvalues`` (zero columns beyond the rank).
        Gx: (B, C) G x, or None when no x was given.
        head: ``"softmax"`` or ``"sigmoid"``.
        rtol: relative tolerance that set the rank.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    probs: torch.Tensor
    logits: torch.Tensor | None
    rank: torch.Tensor
    K: torch.Tensor
    U: torch.Tensor
    Gx: torch.Tensor | None
    head: str
    rtol: float


def ifim_from_jacobian(
    J: torch.Tensor,
    p: torch.Tensor,
    x: torch.Tensor | None = None,
    head: str = "softmax",
    rtol: float | None = None,
    eigenvectors: bool = True,
    logits: torch.Tensor | None = None,
) -> IFIM:
    """iFIM spectrum of each sample from its input Jacobian (reuse one J for spectrum, components, perturbations).

    K = G G^T and G x come from ``drift_kernels.fisher_gram`` in one pass over J; K's eigendecomposition runs in
    float64. Eigenvalues at or below rtol * lambda_max count as zero. Eigenvectors of F: V = G^T U diag(lambda)^-1/2
    via one ``drift_kernels.fisher_project`` call, renormalised to unit length (rounding in K otherwise shows in
    the norms of the smallest ones).

    Args:
        J: (B, C, D) input Jacobian of the logits.
        p: (B, C) probabilities (softmax rows summing to 1, or per-class sigmoid).
        x: optional (B, *S) or (B, D) inputs: G x is computed alongside K, and eigenvectors take shape S.
        head: ``"softmax"`` or ``"sigmoid"``.
        rtol: relative eigenvalue tolerance; None means ``default_rtol(J.dtype)``.
        eigenvectors: compute the (B, r, *S) eigenvectors (skip them when only components are needed: they are
            r times the size of x).
        logits: optional (B, C) logits stored alongside.

    Returns:
        :class:`IFIM`.
    """
    B, C, D = _check_jp(J, p, head)
    xf = None if x is None else _flat_batch(x, B, D, "x")
    shape = (D,) if x is None else tuple(x.shape[1:])
    if rtol is None:
        rtol = default_rtol(J.dtype)
    if not (isinstance(rtol, (int, float)) and 0 <= rtol < 1):
        raise ValueError(f"rtol must be a float in [0, 1), got {rtol!r}")

    K, Gx = _gram(J, p, xf, head)
    K64 = K.double()
    K64 = 0.5 * (K64 + K64.transpose(1, 2))
    if head == "softmax":
        s = p.double().sqrt()
        s = s / s.norm(dim=1, keepdim=True)
        P = torch.eye(C, dtype=torch.float64, device=K64.device) - s.unsqueeze(2) * s.unsqueeze(1)
        K64 = P @ K64 @ P
        K64 = 0.5 * (K64 + K64.transpose(1, 2))
    r = C - 1 if head == "softmax" else C
    evals, evecs = torch.linalg.eigh(K64)  # ascending
    evals = evals.flip(-1)[:, :r]
    U = evecs.flip(-1)[:, :, :r]
    lam_max = evals[:, :1].clamp_min(0)
    keep = evals > rtol * lam_max
    if rtol == 0:
        keep = evals > 0
    rank = keep.sum(1)
    evals = torch.where(keep, evals, torch.zeros_like(evals))
    U = U * keep.unsqueeze(1)

    V = None
    if eigenvectors:
        inv_sqrt = torch.where(keep, evals.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(evals))
        Vt = _project(J, p, U * inv_sqrt.unsqueeze(1), head)  # (B, D, r)
        norms = Vt.norm(dim=1, keepdim=True)
        Vt = torch.where(norms > 0, Vt / norms.clamp_min(torch.finfo(Vt.dtype).tiny), Vt)
        V = Vt.transpose(1, 2).reshape(B, r, *shape)
    return IFIM(
        eigenvalues=evals,
        eigenvectors=V,
        probs=p,
        logits=logits,
        rank=rank,
        K=K64,
        U=U,
        Gx=Gx,
        head=head,
        rtol=float(rtol),
    )


def ifim(
    model: nn.Module,
    x: torch.Tensor,
    head: str = "softmax",
    rtol: float | None = None,
    chunk: int | None = None,
    eigenvectors: bool = True,
) -> IFIM:
    """iFIM spectrum and eigenvectors of a classifier at each input: :func:`input_jacobian` then
    :func:`ifim_from_jacobian` with p = softmax(z) or sigmoid(z).

    Args:
        model: classifier in eval mode, (B, *S) -> (B, C) logits.
        x: (B, *S) inputs.
        head: ``"softmax"`` or ``"sigmoid"``.
        rtol: relative eigenvalue tolerance (None: ``default_rtol`` of x's dtype).
        chunk: passed to :func:`input_jacobian`.
        eigenvectors: compute the (B, r, *S) eigenvectors.

    Returns:
        :class:`IFIM` with logits set.
    """
    _check_head(head)
    J, z = input_jacobian(model, x, chunk=chunk)
    return ifim_from_jacobian(J, head_probs(z, head), x, head, rtol, eigenvectors=eigenvectors, logits=z)


# --------------------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Components:
    """How x splits into x_high = V_k V_k^T x and x_low = x - x_high.

    Attributes:
        k: (B,) int64 number of leading eigenvectors spanning the high-sensitivity subspace (<= rank).
        coefficients: (B, r) float64 c_i = v_i^T x = u_i^T (G x) / sqrt(lambda_i), zero beyond the rank.
        eigenvalues: (B, r) float64, as in :class:`IFIM`.
        energy_share: (B,) float64 sum_{i<k} lambda_i / sum_i lambda_i (NaN where F = 0).
        norm_share: (B,) float64 |x_high|^2 / |x|^2 = sum_{i<k} c_i^2 / |x|^2 (NaN where x = 0).
    """

    k: torch.Tensor
    coefficients: torch.Tensor
    eigenvalues: torch.Tensor
    energy_share: torch.Tensor
    norm_share: torch.Tensor


def _select_k(eigenvalues: torch.Tensor, rank: torch.Tensor, k: int | None, energy: float) -> torch.Tensor:
    """Per-sample subspace size: min(k, rank), or the smallest k with sum_{i<k} lambda_i >= energy * trace."""
    if k is not None:
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"k must be a non-negative int or None, got {k!r}")
        return rank.clamp(max=k)
    if not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    total = eigenvalues.sum(1, keepdim=True)
    frac = eigenvalues.cumsum(1) / total.clamp_min(torch.finfo(torch.float64).tiny)
    # Count the leading eigenvalues whose cumulative share is still short of the target, then take one more;
    # the small slack keeps energy = 1 from demanding more than the rank through rounding of the cumsum.
    short = (frac < energy - 1e-12).sum(1)
    return torch.minimum(short + 1, rank).where(total.squeeze(1) > 0, torch.zeros_like(rank))


def decompose_from_jacobian(
    J: torch.Tensor,
    p: torch.Tensor,
    x: torch.Tensor,
    head: str = "softmax",
    k: int | None = None,
    energy: float = 0.9,
    rtol: float | None = None,
    spectrum: IFIM | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Components]:
    """Split x into x_high = V_k V_k^T x and x_low = x - x_high from its Jacobian, F never formed.

    c = diag(lambda)^-1/2 U^T (G x) gives the coefficients; x_high = G^T (U_k diag(1/lambda_k) U_k^T G x) is one
    ``fisher_project`` call with m = 1.

    Args:
        J: (B, C, D) input Jacobian.
        p: (B, C) probabilities at x.
        x: (B, *S) inputs, prod(S) = D.
        head: ``"softmax"`` or ``"sigmoid"``.
        k: subspace size (capped per sample at the rank); None: chosen per sample from ``energy``.
        energy: with k None, the smallest k whose eigenvalues hold at least this share of the trace.
        rtol: eigenvalue tolerance when ``spectrum`` is not given.
        spectrum: a precomputed :func:`ifim_from_jacobian` of the same J, p (and x, else G x is recomputed).

    Returns:
        x_high (B, *S), x_low (B, *S) in x's dtype, and :class:`Components`.
    """
    B, C, D = _check_jp(J, p, head)
    xf = _flat_batch(x, B, D, "x")
    if spectrum is None:
        spectrum = ifim_from_jacobian(J, p, xf, head, rtol, eigenvectors=False)
    elif spectrum.head != head or spectrum.U.shape[:2] != (B, C):
        raise ValueError(f"spectrum (head {spectrum.head!r}, U {tuple(spectrum.U.shape)}) does not match J, head")
    Gx = spectrum.Gx if spectrum.Gx is not None else fisher_apply(J, p, xf, head)
    lam, U, rank = spectrum.eigenvalues, spectrum.U, spectrum.rank
    r = lam.shape[1]
    kk = _select_k(lam, rank, k, energy)
    nonzero = lam > 0
    ut_gx = torch.einsum("bcr,bc->br", U, Gx.double())
    coef = torch.where(nonzero, ut_gx / lam.clamp_min(torch.finfo(torch.float64).tiny).sqrt(), torch.zeros_like(lam))
    in_k = torch.arange(r, device=lam.device).unsqueeze(0) < kk.unsqueeze(1)
    w = torch.where(in_k & nonzero, ut_gx / lam.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(lam))
    x_high = _project(J, p, (U @ w.unsqueeze(-1)), head).squeeze(-1)  # (B, D)
    x_high = x_high.to(x.dtype).reshape(x.shape)
    x_low = x - x_high

    total = lam.sum(1)
    energy_share = torch.where(
        total > 0, (lam * in_k).sum(1) / total.clamp_min(1e-300), torch.full_like(total, math.nan)
    )
    xx = xf.double().pow(2).sum(1)
    norm_share = torch.where(xx > 0, (coef.pow(2) * in_k).sum(1) / xx.clamp_min(1e-300), torch.full_like(xx, math.nan))
    info = Components(k=kk, coefficients=coef, eigenvalues=lam, energy_share=energy_share, norm_share=norm_share)
    return x_high, x_low, info


def decompose(
    model: nn.Module,
    x: torch.Tensor,
    k: int | None = None,
    energy: float = 0.9,
    head: str = "softmax",
    rtol: float | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Components]:
    """High-sensitivity component x_high = V_k V_k^T x of each input and its complement x_low = x - x_high.

    Args:
        model: classifier in eval mode, (B, *S) -> (B, C) logits.
        x: (B, *S) inputs.
        k: subspace size (capped at each sample's rank); None: from ``energy``.
        energy: with k None, the smallest k whose eigenvalues hold at least this share of the trace.
        head: ``"softmax"`` or ``"sigmoid"``.
        rtol: relative eigenvalue tolerance (None: ``default_rtol``).
        chunk: passed to :func:`input_jacobian`.

    Returns:
        x_high (B, *S), x_low (B, *S) and :class:`Components`.
    """
    _check_head(head)
    J, z = input_jacobian(model, x, chunk=chunk)
    return decompose_from_jacobian(J, head_probs(z, head), x, head, k, energy, rtol)
