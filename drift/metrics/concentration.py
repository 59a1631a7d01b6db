"""Single-map quantities (concentration, mass inside masks, pointing) and degenerate-map codes."""

from __future__ import annotations

import math

import torch
from drift_kernels import topk_count

from .pairwise import (
    DEGENERATE_NAMES,
    _check_fractions,
    _check_maps,
    _check_mask,
    _check_nonnegative,
    _f64,
    _finite,
    _nan_where,
)

# ------------------------------------------------------------------------------------------ concentration


def entropy(a: torch.Tensor) -> torch.Tensor:
    """Normalised Shannon entropy of a map as a distribution: -sum_i p_i log p_i / log(H W), p = m / sum m.

    1 for a uniform map, 0 for a single-pixel map (0 log 0 = 0).

    Args:
        a: non-negative maps (B, H, W) with H W > 1.

    Returns:
        (B,) float64; NaN for a massless or non-finite map.
    """
    _check_maps(a)
    _check_nonnegative(a, "a")
    n = a.shape[1] * a.shape[2]
    if n < 2:
        raise ValueError(f"entropy needs maps of more than one pixel, got {tuple(a.shape[1:])}")
    m = _f64(a)
    mass = m.sum(1)
    p = m / mass[:, None]
    plogp = torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))
    return _nan_where((mass > 0) & _finite(a), -plogp.sum(1) / math.log(n))


def gini(a: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of the pixel values: sum_i (2 i - n - 1) x_(i) / (n sum_i x_i), x sorted ascending.

    Equal to the mean absolute difference sum_ij |x_i - x_j| / (2 n^2 mean x): 0 for a uniform map,
    1 - 1/n for a single-pixel map. The same value as the Gini index of Hurley & Rickard, "Comparing Measures of
    Sparsity", IEEE Transactions on Information Theory 55(10), 4723-4741, 2009 (their measure G, Sec. II).

    Args:
        a: non-negative maps (B, H, W).

    Returns:
        (B,) float64; NaN for a massless or non-finite map.
    """
    _check_maps(a)
    _check_nonnegative(a, "a")
    x = torch.sort(_f64(a), dim=1).values
    n = x.shape[1]
    i = torch.arange(1, n + 1, dtype=torch.float64, device=a.device)
    mass = x.sum(1)
    g = ((2 * i - n - 1) * x).sum(1) / (n * mass)
    return _nan_where((mass > 0) & _finite(a), g)


def top_mass(a: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Share of the map's mass in its top ceil(fraction H W) pixels (same count rule as :func:`topk_iou`).

    Which of several tied pixels is taken does not change the share, so no tie rule is needed here.

    Args:
        a: non-negative maps (B, H, W).
        fraction: in (0, 1].

    Returns:
        (B,) float64 in (0, 1]; NaN for a massless or non-finite map.
    """
    _check_maps(a)
    _check_nonnegative(a, "a")
    (f,) = _check_fractions((fraction,))
    m = _f64(a)
    k = topk_count(m.shape[1], f)
    mass = m.sum(1)
    share = torch.topk(m, k, dim=1).values.sum(1) / mass
    return _nan_where((mass > 0) & _finite(a), share)


# --------------------------------------------------------------------------------------------------- masks


def mass_fraction(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of the map's mass inside a mask: sum_ij m_ij mask_ij / sum_ij m_ij (lung-mass fraction).

    Args:
        a: non-negative maps (B, H, W).
        mask: (B, H, W) or (H, W) boolean, or weights in [0, 1]; same size as the maps.

    Returns:
        (B,) float64 in [0, 1]; NaN for a massless or non-finite map, or an empty mask.
    """
    _check_maps(a)
    _check_nonnegative(a, "a")
    mk = _check_mask(mask, a, "mask").flatten(1)
    m = _f64(a)
    mass = m.sum(1)
    share = (m * mk).sum(1) / mass
    return _nan_where((mass > 0) & _finite(a) & (mk.sum(1) > 0), share)


def energy_in(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Energy-based pointing: share of the map's energy inside the mask (the literature's name for
    :func:`mass_fraction`; same formula, shapes and NaN rules).

    Reference: Wang et al., "Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural Networks",
    CVPR Workshops 2020, https://arxiv.org/abs/1910.01279 (energy-based pointing game, with a bounding box as the
    mask there).
    """
    return mass_fraction(a, mask)


def pointing_game(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pointing game: 1 if the map's first maximum (row-major order) lies inside the mask, else 0.

    Reference: Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016 (no tolerance margin
    around the mask here; the paper's 15-pixel margin would depend on the image size).

    Args:
        a: maps (B, H, W).
        mask: (B, H, W) or (H, W) boolean (or weights: a pixel counts as inside when its weight > 0.5).

    Returns:
        (B,) float64 in {0, 1}; NaN for a non-finite map or an empty mask.
    """
    _check_maps(a)
    mk = _check_mask(mask, a, "mask").flatten(1) > 0.5
    idx = a.flatten(1).argmax(dim=1)
    hit = mk.gather(1, idx[:, None])[:, 0].to(torch.float64)
    return _nan_where(_finite(a) & mk.any(1), hit)


# ---------------------------------------------------------------------------------------------- degenerate


def degenerate(a: torch.Tensor) -> torch.Tensor:
    """Degeneracy code per map: 0 ok, 1 non-finite (any NaN/inf), 2 all zero, 3 constant non-zero.

    The first matching code wins in that order; :data:`DEGENERATE_NAMES` names them.

    Args:
        a: maps (B, H, W).

    Returns:
        (B,) int64 codes.
    """
    _check_maps(a)
    flat = a.flatten(1)
    finite = _finite(a)
    zero = (flat == 0).all(1)
    const = flat.amax(1) == flat.amin(1) if flat.shape[1] else torch.ones_like(zero)
    codes = torch.zeros(a.shape[0], dtype=torch.int64, device=a.device)
    codes = torch.where(const, torch.full_like(codes, 3), codes)
    codes = torch.where(zero, torch.full_like(codes, 2), codes)
    return torch.where(~finite, torch.full_like(codes, 1), codes)


def degenerate_name(code: int) -> str:
    """The name of a :func:`degenerate` code ("ok", "non-finite", "all zero", "constant")."""
    code = int(code)
    if not 0 <= code < len(DEGENERATE_NAMES):
        raise ValueError(f"unknown degeneracy code {code}; codes are 0..{len(DEGENERATE_NAMES) - 1}")
    return DEGENERATE_NAMES[code]


def count_degenerate(codes: torch.Tensor) -> dict[str, int]:
    """Number of maps per degeneracy name, e.g. {"ok": 97, "non-finite": 0, "all zero": 3, "constant": 0}."""
    counts = torch.bincount(codes.flatten().cpu(), minlength=len(DEGENERATE_NAMES))
    if counts.numel() > len(DEGENERATE_NAMES):
        raise ValueError(f"codes hold values outside 0..{len(DEGENERATE_NAMES) - 1}")
    return {name: int(c) for name, c in zip(DEGENERATE_NAMES, counts)}


