"""Unit perturbation directions relative to the top-k iFIM subspace (:mod:`drift.fisher` states the maths).

For each image x, with V_k the top-k eigenvectors of the iFIM F = G^T G at x, three kinds of unit direction u:

* ``high``: u = V_k a / |V_k a|, a ~ N(0, I_k): a random direction inside the top-k iFIM subspace, built as
  G^T U_k diag(lambda_k)^-1/2 a with one ``fisher_project`` call;
* ``complement``: u = (g - V_k V_k^T g) / |.|, g ~ N(0, I_D): a random direction orthogonal to that subspace,
  V_k V_k^T g = G^T U_k diag(1/lambda_k) U_k^T (G g) (applied twice, so rounding leaves no component inside);
* ``random``: u = g / |g|.

Controls of equal norm (:func:`control_directions`, :data:`CONTROL_KINDS`), the informative alternatives a
claim about the top-k subspace has to beat (any direction outside span(G) is a first-order null direction, so
``high`` beating ``complement`` holds for every differentiable classifier):

* ``jacobian``: a random direction in the span of the top-k right singular vectors of the logit Jacobian J (not
  weighted by p): J^T W_k diag(s_k)^-1 a, with J J^T W = W diag(s^2), a ~ N(0, I_k);
* ``gradient``: +-grad_x log p_pred / |.| (the sign drawn per draw): the steepest direction of the confidence;
* ``cam``: g restricted to a region (the top CAM region of the image), g ~ N(0, I_D) there, zero elsewhere;
* ``span_rest``: a random direction inside span(G) orthogonal to the top-k eigenvectors: G^T U_r' diag(lambda)^-1/2
  a over the eigenvalues k+1 .. rank (NaN where rank <= k).

Removal / attenuation inputs (:func:`removal_inputs`): x - alpha x_high against x - alpha |x_high| u_complement
(an equal-norm random piece of the complement), for alpha in [0, 1].

Every random draw of sample i comes from its own generator seeded by (seed, i) (:func:`sample_generator`), so
directions depend on the seed alone: not on the batch size, the device or the order samples are processed in.
The experiment that uses them is :mod:`drift.perturb`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .fisher import (
    IFIM,
    Components,
    _check_jp,
    _flat_batch,
    _project,
    decompose_from_jacobian,
    fisher_apply,
    ifim_from_jacobian,
)

__all__ = ["CONTROL_KINDS", "Directions", "control_directions", "perturbation_directions", "removal_inputs",
           "sample_generator"]

CONTROL_KINDS = ("jacobian", "gradient", "cam", "span_rest")
"""The informative alternatives to the top-k iFIM subspace (:func:`control_directions`)."""


def sample_generator(seed: int, index: int, stream: int = 0) -> torch.Generator:
    """CPU generator of sample ``index`` under ``seed``: independent streams from numpy's SeedSequence([seed, i])
    (stream 0; stream s > 0 from SeedSequence([seed, i, s]))."""
    key = [int(seed), int(index)] + ([int(stream)] if stream else [])
    state = np.random.SeedSequence(key).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


@dataclass
class Directions:
    """Unit perturbation directions of a batch and its high-sensitivity component.

    Attributes:
        high: (B, m, *S) unit directions inside span(v_1..v_k); NaN where k = 0 (the subspace is empty).
        complement: (B, m, *S) unit directions orthogonal to span(v_1..v_k).
        random: (B, m, *S) unit directions, uniform on the sphere.
        x_high: (B, *S) V_k V_k^T x.
        components: :class:`drift.fisher.Components` of x (k, coefficients, eigenvalues, shares).
    """

    high: torch.Tensor
    complement: torch.Tensor
    random: torch.Tensor
    x_high: torch.Tensor
    components: Components


def _unit_columns(V: torch.Tensor) -> torch.Tensor:
    """(B, D, m) columns scaled to unit norm; all-zero columns become NaN (no direction exists)."""
    n = V.norm(dim=1, keepdim=True)
    return torch.where(n > 0, V / n.clamp_min(torch.finfo(V.dtype).tiny), torch.full_like(V, math.nan))


def perturbation_directions(
    J: torch.Tensor,
    p: torch.Tensor,
    x: torch.Tensor,
    head: str = "softmax",
    k: int | None = None,
    energy: float = 0.9,
    n_draws: int = 1,
    seed: int = 0,
    first_index: int = 0,
    spectrum: IFIM | None = None,
    rtol: float | None = None,
) -> Directions:
    """Seeded random unit directions inside the top-k iFIM subspace, in its complement, and in the whole space.

    high = G^T U_k diag(lambda_k)^-1/2 a (a ~ N(0, I_k)), complement = g - V_k V_k^T g (g ~ N(0, I_D)), random = g',
    each normalised; D x D matrices are never formed.

    Args:
        J: (B, C, D) input Jacobian at x.
        p: (B, C) probabilities at x.
        x: (B, *S) inputs.
        head: ``"softmax"`` or ``"sigmoid"``.
        k: subspace size (capped at each sample's rank); None: from ``energy`` (see :func:`decompose_from_jacobian`).
        energy: share of the trace the subspace holds when k is None.
        n_draws: m directions of each kind per sample.
        seed: experiment seed; sample b draws from ``sample_generator(seed, first_index + b)``.
        first_index: index of the batch's first sample within the whole set.
        spectrum: precomputed :func:`ifim_from_jacobian` of J, p, x.
        rtol: eigenvalue tolerance when ``spectrum`` is None.

    Returns:
        :class:`Directions` in x's dtype and device.
    """
    B, C, D = _check_jp(J, p, head)
    xf = _flat_batch(x, B, D, "x")
    if not isinstance(n_draws, int) or isinstance(n_draws, bool) or n_draws < 1:
        raise ValueError(f"n_draws must be a positive int, got {n_draws!r}")
    if spectrum is None:
        spectrum = ifim_from_jacobian(J, p, xf, head, rtol, eigenvectors=False)
    x_high, _, comp = decompose_from_jacobian(J, p, x, head, k, energy, spectrum=spectrum)
    lam, U = spectrum.eigenvalues, spectrum.U
    r, m = lam.shape[1], n_draws
    in_k = (torch.arange(r, device=lam.device).unsqueeze(0) < comp.k.unsqueeze(1)) & (lam > 0)  # (B, r)

    # Draw on the CPU in float64 per sample, so values do not depend on batch size, device or dtype.
    a = torch.empty(B, r, m, dtype=torch.float64)
    g_comp = torch.empty(B, D, m, dtype=torch.float64)
    g_rand = torch.empty(B, D, m, dtype=torch.float64)
    for b in range(B):
        gen = sample_generator(seed, first_index + b)
        a[b] = torch.randn(m, r, generator=gen, dtype=torch.float64).T
        g_comp[b] = torch.randn(m, D, generator=gen, dtype=torch.float64).T
        g_rand[b] = torch.randn(m, D, generator=gen, dtype=torch.float64).T
    dev, dt = x.device, x.dtype
    a, g_comp, g_rand = a.to(dev), g_comp.to(device=dev, dtype=dt), g_rand.to(device=dev, dtype=dt)

    inv_sqrt = torch.where(in_k, lam.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(lam))
    high = _project(J, p, U @ (inv_sqrt.unsqueeze(-1) * a), head).to(dt)  # (B, D, m)

    inv = torch.where(in_k, 1 / lam.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(lam))

    def project_out(V: torch.Tensor) -> torch.Tensor:
        coef = inv.unsqueeze(-1) * (U.transpose(1, 2) @ fisher_apply(J, p, V, head).double())  # (B, r, m)
        return V - _project(J, p, U @ coef, head).to(dt)

    # Twice: one pass leaves a component inside the subspace of relative size ~ rounding * lambda_1 / lambda_k;
    # a second pass brings it down to rounding level (classical Gram-Schmidt, "twice is enough").
    complement = project_out(project_out(g_comp))

    shape = tuple(x.shape[1:])

    def out(V: torch.Tensor) -> torch.Tensor:
        return _unit_columns(V).transpose(1, 2).reshape(B, m, *shape)

    return Directions(out(high), out(complement), out(g_rand), x_high, comp)


def removal_inputs(
    x: torch.Tensor, x_high: torch.Tensor, complement: torch.Tensor, alphas: Sequence[float] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Removal / attenuation inputs: x - alpha x_high, and x - alpha |x_high| u (u a unit complement direction).

    Args:
        x: (B, *S) inputs.
        x_high: (B, *S) their high-sensitivity components.
        complement: (B, m, *S) unit directions orthogonal to the high-sensitivity subspace.
        alphas: (A,) attenuation factors in [0, 1] (alpha = 1 removes x_high: x - x_high = x_low).

    Returns:
        (A, B, *S) high removals and (A, B, m, *S) equal-norm complement removals.
    """
    al = torch.as_tensor(alphas, dtype=x.dtype, device=x.device).reshape(-1)
    if x_high.shape != x.shape or complement.shape[0] != x.shape[0] or complement.shape[2:] != x.shape[1:]:
        raise ValueError(
            f"x {tuple(x.shape)}, x_high {tuple(x_high.shape)} and complement {tuple(complement.shape)} "
            "must be (B, *S), (B, *S) and (B, m, *S)"
        )
    nd = x.dim() - 1
    a = al.view(-1, 1, *([1] * nd))
    hn = x_high.flatten(1).norm(dim=1).view(1, -1, 1, *([1] * nd))
    high = x.unsqueeze(0) - a * x_high.unsqueeze(0)
    comp = x.unsqueeze(0).unsqueeze(2) - a.unsqueeze(2) * hn * complement.unsqueeze(0)
    return high, comp


def control_directions(
    J: torch.Tensor,
    p: torch.Tensor,
    x: torch.Tensor,
    spectrum: IFIM,
    k: torch.Tensor,
    head: str = "softmax",
    n_draws: int = 1,
    seed: int = 0,
    first_index: int = 0,
    region: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The control directions of :data:`CONTROL_KINDS` (module docstring), unit norm, (B, m, *S) each.

    Args:
        J: (B, C, D) input Jacobian at x; p: (B, C) probabilities; x: (B, *S) inputs.
        spectrum: :func:`drift.fisher.ifim_from_jacobian` of (J, p, x).
        k: (B,) the top-k subspace sizes of the ``high`` kind (the ``jacobian`` kind takes the same k).
        head, n_draws, seed, first_index: as :func:`perturbation_directions`; draws come from stream 1 of
            :func:`sample_generator`, so the other kinds' draws do not change.
        region: (B, *S) bool, the pixels the ``cam`` kind perturbs; None: that kind is NaN.

    Returns:
        ``{kind: (B, m, *S)}`` in x's dtype; NaN where no such direction exists (empty span or region, zero
        gradient).
    """
    B, C, D = _check_jp(J, p, head)
    m, dev, dt = n_draws, x.device, x.dtype
    lam, U = spectrum.eigenvalues, spectrum.U
    r = lam.shape[1]
    Jd = J.double()
    # Right singular vectors of J from the C x C matrix J J^T (float64), descending.
    s2, W = torch.linalg.eigh(Jd @ Jd.transpose(1, 2))
    s2, W = s2.flip(-1), W.flip(-1)
    tol = s2[:, :1].clamp_min(0) * 1e-12
    a_jac = torch.empty(B, C, m, dtype=torch.float64)
    a_rest = torch.empty(B, r, m, dtype=torch.float64)
    signs = torch.empty(B, m, dtype=torch.float64)
    g_cam = torch.empty(B, D, m, dtype=torch.float64)
    for b in range(B):
        gen = sample_generator(seed, first_index + b, stream=1)
        a_jac[b] = torch.randn(m, C, generator=gen, dtype=torch.float64).T
        a_rest[b] = torch.randn(m, r, generator=gen, dtype=torch.float64).T
        signs[b] = torch.randint(0, 2, (m,), generator=gen).double() * 2 - 1
        g_cam[b] = torch.randn(m, D, generator=gen, dtype=torch.float64).T
    a_jac, a_rest, signs, g_cam = a_jac.to(dev), a_rest.to(dev), signs.to(dev), g_cam.to(dev)
    kk = k.to(dev).unsqueeze(1)
    in_jac = (torch.arange(C, device=dev).unsqueeze(0) < kk) & (s2 > tol)
    coef = torch.where(in_jac, s2.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(s2))
    jac = Jd.transpose(1, 2) @ (W @ (coef.unsqueeze(-1) * a_jac))  # (B, D, m)

    p64 = p.double()
    pred = p64.argmax(1)
    if head == "softmax":  # grad log p_pred = J^T (e_pred - p)
        w = torch.nn.functional.one_hot(pred, C).double() - p64
    else:  # grad log sigmoid(z_pred) = (1 - p_pred) J_pred
        w = torch.nn.functional.one_hot(pred, C).double() * (1 - p64)
    grad = (Jd.transpose(1, 2) @ w.unsqueeze(-1)) * signs.unsqueeze(1)  # (B, D, m)

    rest = (torch.arange(r, device=dev).unsqueeze(0) >= kk) & (lam > 0)
    inv_sqrt = torch.where(rest, lam.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(lam))
    span_rest = _project(J, p, U @ (inv_sqrt.unsqueeze(-1) * a_rest), head).double()

    if region is None:
        cam = torch.full_like(g_cam, math.nan)
    else:
        mask = _flat_batch(region.to(dev), B, D, "region").double()
        cam = g_cam * mask.unsqueeze(-1)

    shape = tuple(x.shape[1:])

    def out(V: torch.Tensor) -> torch.Tensor:
        return _unit_columns(V).to(dt).transpose(1, 2).reshape(B, m, *shape)

    return {"jacobian": out(jac), "gradient": out(grad), "cam": out(cam), "span_rest": out(span_rest)}
