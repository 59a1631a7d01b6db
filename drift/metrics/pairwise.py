"""Pairwise drift metrics of a TL map and an FT map: displacement, top-k overlap, pattern correlation, SSIM;
with the input checks every metric shares."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from drift_kernels import topk_iou as _topk_iou_kernel
from drift_kernels.reference import TopkTies, check_ties

DEFAULT_FRACTIONS = (0.05, 0.1, 0.2, 0.3)

DEGENERATE_NAMES = ("ok", "non-finite", "all zero", "constant")
"""Meaning of the codes returned by :func:`degenerate`, indexed by code."""

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5


# --------------------------------------------------------------------------------------------------- checks


def _check_maps(a: torch.Tensor, name: str = "a") -> None:
    if not isinstance(a, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, H, W), got {type(a).__name__}")
    if a.ndim != 3:
        raise ValueError(f"{name} must have shape (B, H, W), got {tuple(a.shape)}")
    if not a.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {a.dtype}")


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    _check_maps(a, "a")
    _check_maps(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (B, H, W), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")


def _check_nonnegative(a: torch.Tensor, name: str) -> None:
    neg = a < 0  # NaN compares False: non-finite maps pass here and yield NaN downstream
    if neg.any():
        i = int(neg.flatten(1).any(1).nonzero()[0, 0])
        raise ValueError(
            f"{name}[{i}] has negative values (min {float(a[i].min()):.4g}); mass-based metrics need non-negative "
            "maps (CAMs after ReLU)"
        )


def _check_mask(mask: torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """A mask (B, H, W) or (H, W), bool or weights in [0, 1], as float64 (B, H, W) on ``like``'s device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (B, H, W) or (H, W), got {type(mask).__name__}")
    if mask.shape != like.shape and mask.shape != like.shape[1:]:
        raise ValueError(
            f"{name} must have shape {tuple(like.shape)} or {tuple(like.shape[1:])} (the maps' size), "
            f"got {tuple(mask.shape)}"
        )
    m = mask.to(device=like.device, dtype=torch.float64)
    if mask.dtype != torch.bool and ((m < 0) | (m > 1) | m.isnan()).any():
        raise ValueError(f"{name} must be boolean or hold weights in [0, 1]")
    return m.expand(like.shape)


def _f64(a: torch.Tensor) -> torch.Tensor:
    return a.to(torch.float64).flatten(1)


def _finite(a: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(a).flatten(1).all(1)


def _nan_where(ok: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.where(ok, v, torch.full_like(v, math.nan))


def _diagonal(h: int, w: int) -> float:
    return math.sqrt(h * h + w * w)


# -------------------------------------------------------------------------------------------- displacement


def _centroids(a: torch.Tensor) -> torch.Tensor:
    """(B, 2) mass-weighted (row, column) centroid in pixel units; NaN for a massless map."""
    m = a.to(torch.float64)
    _, h, w = m.shape
    mass = m.sum(dim=(1, 2))
    rows = torch.arange(h, dtype=torch.float64, device=m.device)
    cols = torch.arange(w, dtype=torch.float64, device=m.device)
    cy = (m.sum(2) * rows).sum(1) / mass
    cx = (m.sum(1) * cols).sum(1) / mass
    return _nan_where((mass > 0)[:, None], torch.stack([cy, cx], 1))


def centroid_shift(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance between the mass-weighted centroids of a and b, over the image diagonal.

    c(m) = (sum_ij m_ij i, sum_ij m_ij j) / sum_ij m_ij with pixel indices (i, j);
    shift = ||c(a) - c(b)||_2 / sqrt(H^2 + W^2), in [0, 1).

    Args:
        a, b: non-negative maps (B, H, W).

    Returns:
        (B,) float64; NaN where either map has no mass or is non-finite.
    """
    _check_pair(a, b)
    _check_nonnegative(a, "a")
    _check_nonnegative(b, "b")
    d = torch.linalg.vector_norm(_centroids(a) - _centroids(b), dim=1)
    return d / _diagonal(*a.shape[1:])


def _peaks(a: torch.Tensor) -> torch.Tensor:
    """(B, 2) (row, column) of the first maximum in row-major order, float64; NaN for non-finite maps."""
    w = a.shape[2]
    idx = a.flatten(1).argmax(dim=1)  # torch returns the first occurrence of the maximum
    rc = torch.stack([idx // w, idx % w], 1).to(torch.float64)
    return _nan_where(_finite(a)[:, None], rc)


def peak_shift(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance between the peaks of a and b, over the image diagonal.

    peak(m) = (i, j) of the first maximum of m in row-major order; shift = ||peak(a) - peak(b)|| / sqrt(H^2 + W^2).

    Args:
        a, b: maps (B, H, W).

    Returns:
        (B,) float64; NaN where either map is non-finite. (A constant map peaks at (0, 0): screen such maps with
        :func:`degenerate`.)
    """
    _check_pair(a, b)
    d = torch.linalg.vector_norm(_peaks(a) - _peaks(b), dim=1)
    return d / _diagonal(*a.shape[1:])


# ----------------------------------------------------------------------------------------------- overlap


def topk_iou(
    a: torch.Tensor,
    b: torch.Tensor,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    ties: TopkTies = "fractional",
) -> torch.Tensor:
    """IoU of the top-k pixel sets of a and b, for every fraction f: |S_a ∩ S_b| / |S_a ∪ S_b|.

    S_m holds k = ceil(f H W) pixels of m (at least 1), in order of value descending. With t the k-th largest
    value of m, n_above = #{m > t} and n_tied = #{m == t}, ``ties`` decides the cut through the tied pixels:

    * ``"fractional"`` (default): pixel i belongs to S_m with weight w_i = 1 if m_i > t, (k - n_above) / n_tied
      if m_i == t, else 0 (its probability of selection under a uniformly random tie break; sum w = k).
      |S_a ∩ S_b| = sum_i w_a,i w_b,i, the expected intersection under independent random tie breaks of a and b,
      and |S_a ∪ S_b| = 2k - |S_a ∩ S_b|. The IoU does not depend on pixel order: two maps that are both zero over
      a region no longer agree on its low-index zeros (sparse, ReLU'd maps). Maps without a cut inside a tie
      group give the same IoU as the index rule.
    * ``"index"``: ties broken by the lower flat (row-major) index first (exact set counts).

    Computed by ``drift_kernels.topk_iou`` on float32 maps.

    Args:
        a, b: maps (B, H, W).
        fractions: T fractions in (0, 1].
        ties: ``"fractional"`` or ``"index"``.

    Returns:
        (B, T) float64; rows of pairs with a non-finite map are NaN (those maps never reach the kernel).
    """
    _check_pair(a, b)
    fr = _check_fractions(fractions)
    ties = check_ties(ties)
    bsz = a.shape[0]
    out = torch.full((bsz, len(fr)), math.nan, dtype=torch.float64, device=a.device)
    ok = _finite(a) & _finite(b)
    if ok.any():
        sel = ok.nonzero()[:, 0]
        fa = a[sel].to(torch.float32).contiguous()
        fb = b[sel].to(torch.float32).contiguous()
        inter, union, _ = _topk_iou_kernel(fa, fb, fr, ties)
        out[sel] = inter.to(torch.float64) / union.to(torch.float64)
    return out


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    fr = tuple(float(f) for f in fractions)
    if not fr or any(not (0 < f <= 1) for f in fr):
        raise ValueError(f"fractions must be a non-empty sequence of values in (0, 1], got {fractions!r}")
    return fr


# ----------------------------------------------------------------------------------------------- pattern


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of the pixel values of a and b: cov(a, b) / (std(a) std(b)).

    Args:
        a, b: maps (B, H, W).

    Returns:
        (B,) float64; NaN where a map is constant (zero variance) or non-finite, as scipy.stats.pearsonr.
    """
    _check_pair(a, b)
    return _pearson_rows(_f64(a), _f64(b))


def _pearson_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    sxx, syy = (x * x).sum(1), (y * y).sum(1)
    r = (x * y).sum(1) / torch.sqrt(sxx * syy)
    # Rounding can push |r| a hair above 1 for near-identical maps.
    return r.clamp(-1, 1)


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n along dim 1, ties receiving the mean of their positions (scipy.stats.rankdata 'average')."""
    n = x.shape[1]
    v, order = torch.sort(x, dim=1, stable=True)
    pos = torch.arange(n, device=x.device).expand_as(v)
    starts = torch.ones_like(v, dtype=torch.bool)
    starts[:, 1:] = v[:, 1:] != v[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
    last = torch.where(ends, pos, torch.full_like(pos, n)).flip(1).cummin(dim=1).values.flip(1)
    avg = (first + last).to(torch.float64) / 2 + 1
    return torch.empty_like(avg).scatter_(1, order, avg)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation: Pearson correlation of the average ranks (ties share their mean rank).

    Args:
        a, b: maps (B, H, W).

    Returns:
        (B,) float64; NaN where a map is constant or non-finite, as scipy.stats.spearmanr.
    """
    _check_pair(a, b)
    x, y = _f64(a), _f64(b)
    r = _pearson_rows(_average_ranks(x), _average_ranks(y))
    return _nan_where(_finite(a) & _finite(b), r)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    r = (SSIM_WINDOW - 1) // 2
    x = torch.arange(-r, r + 1, dtype=torch.float64, device=device)
    k = torch.exp(-0.5 * (x / SSIM_SIGMA) ** 2)
    return k / k.sum()


def _band(n: int, device: torch.device) -> torch.Tensor:
    """(n - SSIM_WINDOW + 1, n) float64 matrix; row i holds the Gaussian window at columns i .. i + SSIM_WINDOW - 1."""
    k = _gaussian_window(device)
    rows = torch.arange(n - SSIM_WINDOW + 1, device=device)
    band = torch.zeros(n - SSIM_WINDOW + 1, n, dtype=torch.float64, device=device)
    band[rows[:, None], rows[:, None] + torch.arange(SSIM_WINDOW, device=device)] = k
    return band


def _minmax(m: torch.Tensor) -> torch.Tensor:
    lo = m.amin(dim=(1, 2), keepdim=True)
    span = m.amax(dim=(1, 2), keepdim=True) - lo
    out = (m - lo) / span
    return torch.where(span == 0, torch.zeros_like(out), out)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean structural similarity of the min-max normalised maps.

    Reference: Wang, Bovik, Sheikh & Simoncelli, "Image Quality Assessment: From Error Visibility to Structural
    Similarity", IEEE Transactions on Image Processing 13(4), 600-612, 2004: S below is Eq. 13, the mean over
    windows (MSSIM) Eq. 17, with the paper's constants K1 = 0.01, K2 = 0.03 and its 11 x 11 Gaussian window.

    Both maps are rescaled to [0, 1] per map (a constant map becomes zeros), then with Gaussian-weighted local
    statistics (window 11, sigma 1.5, population covariance), C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = 1:

        S = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)),

    averaged over the positions whose window lies inside the image (a 5-pixel border is excluded), which equals
    ``skimage.metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1)``.

    Args:
        a, b: maps (B, H, W) with H, W >= 11.

    Returns:
        (B,) float64; NaN where either map is non-finite.
    """
    _check_pair(a, b)
    h, w = a.shape[1:]
    if h < SSIM_WINDOW or w < SSIM_WINDOW:
        raise ValueError(
            f"ssim needs maps of at least {SSIM_WINDOW} x {SSIM_WINDOW} pixels, got {h} x {w}: upsample the maps "
            "to the input size first"
        )
    x, y = _minmax(a.to(torch.float64)), _minmax(b.to(torch.float64))
    stack = torch.stack([x, y, x * x, y * y, x * y], dim=1)  # (B, 5, H, W)
    # Separable filter without padding (exactly the positions skimage keeps after cropping its border), as two
    # banded matrix products K_h X K_w^T: far faster than a float64 grouped convolution on the CPU.
    mu_x, mu_y, xx, yy, xy = (_band(h, a.device) @ stack @ _band(w, a.device).T).unbind(1)
    vx, vy, vxy = xx - mu_x * mu_x, yy - mu_y * mu_y, xy - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = (2 * mu_x * mu_y + c1) * (2 * vxy + c2) / ((mu_x**2 + mu_y**2 + c1) * (vx + vy + c2))
    return _nan_where(_finite(a) & _finite(b), s.mean(dim=(1, 2)))


