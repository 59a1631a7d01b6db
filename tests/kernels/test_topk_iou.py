"""topk_iou kernel: counts must equal the reference's exactly (interpreter on CPU; compiled for tests marked gpu)."""

from __future__ import annotations

import math
from fractions import Fraction

import drift_kernels
import numpy as np
import pytest
import torch
from drift_kernels.reference import topk_count, topk_iou_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import gpu, kernels_module, topk_counts_bruteforce

tk = kernels_module("topk_iou_kernel")

# 13 x 17 = 221 pixels: 0.05 -> 11.05 -> 12, 0.1 -> 22.1 -> 23, 0.3 -> 66.3 -> 67, 20/221 -> exactly 20
# (ceil must not round 20.000000000000004 up), 1e-4 -> at least 1, 1.0 -> every pixel.
FRACTIONS = (0.05, 0.1, 0.3, 20 / 221, 1e-4, 1.0)


def _maps(kind: str, N: int, H: int, W: int, rng: torch.Generator) -> torch.Tensor:
    if kind == "continuous":
        return torch.randn(N, H, W, generator=rng)
    if kind == "quantised":  # a handful of levels: ties everywhere, cut inside a tie group
        return torch.randint(0, 4, (N, H, W), generator=rng).float()
    if kind == "zeros":
        return torch.zeros(N, H, W)
    if kind == "signed_zeros":  # -0.0 and +0.0 are the same value for the tie rule
        return torch.where(torch.rand(N, H, W, generator=rng) < 0.5, -0.0, 0.0)
    raise ValueError(kind)


def _check(a, b, fractions, got):
    inter, union, iou = got
    want = topk_iou_reference(a, b, fractions)
    brute_inter, brute_union = topk_counts_bruteforce(a, b, tuple(fractions))
    assert inter.dtype == torch.int64 and union.dtype == torch.int64 and iou.dtype == torch.float32
    assert torch.equal(inter, want[0]) and torch.equal(union, want[1])
    assert np.array_equal(inter.numpy(), brute_inter) and np.array_equal(union.numpy(), brute_union)
    assert torch.equal(iou, want[2])


@pytest.mark.parametrize("kind_a, kind_b", [
    ("continuous", "continuous"), ("quantised", "quantised"), ("zeros", "quantised"),
    ("signed_zeros", "zeros"), ("continuous", "quantised"),
])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_counts_equal_reference_exactly(kind_a, kind_b, dtype, rng, poison):
    N, H, W = 5, 13, 17
    a = _maps(kind_a, N, H, W, rng).to(dtype)
    b = _maps(kind_b, N, H, W, rng).to(dtype)
    out = (torch.full((N, len(FRACTIONS)), -1), torch.full((N, len(FRACTIONS)), -1), torch.full((N, 6), torch.nan))
    got = tk.topk_iou_triton(a, b, FRACTIONS, out=out)
    assert all(g is o for g, o in zip(got, out))
    _check(a, b, FRACTIONS, got)


@pytest.mark.parametrize("rows", [1, 2, 8])
def test_ties_cut_across_tiles(rows, rng, poison):
    # 16-pixel tiles: tie groups straddle tiles, so the carried tie counts decide the cut.
    N, H, W = 7, 9, 11
    a = _maps("quantised", N, H, W, rng)
    b = (torch.rand(N, H, W, generator=rng) * 3).floor()
    fractions = (0.07, 0.25, 0.5, 0.9, 1.0)
    _check(a, b, fractions, tk.topk_iou_triton(a, b, fractions, block=16, rows_per_program=rows))


def test_identical_and_disjoint_maps(rng):
    N, H, W = 4, 8, 8
    a = torch.randn(N, H, W, generator=rng)
    inter, union, iou = tk.topk_iou_triton(a, a.clone(), (0.25, 1.0))
    k = torch.tensor([topk_count(64, 0.25), 64])
    assert torch.equal(inter, k.expand(N, 2)) and torch.equal(union, k.expand(N, 2))
    assert torch.equal(iou, torch.ones(N, 2))
    # b ranks pixels in the opposite order: its top quarter is a's bottom quarter.
    inter, union, iou = tk.topk_iou_triton(a, -a, (0.25,))
    assert torch.equal(inter, torch.zeros(N, 1, dtype=torch.int64))
    assert torch.equal(union, torch.full((N, 1), 2 * 16))


def test_dispatch_and_empty_stack(rng):
    a, b = torch.rand(3, 5, 7, generator=rng), torch.rand(3, 5, 7, generator=rng)
    assert drift_kernels.backend(a) == "triton"
    _check(a, b, [0.2, 0.6], drift_kernels.topk_iou(a, b, [0.2, 0.6]))
    inter, union, iou = drift_kernels.topk_iou(torch.empty(0, 4, 4), torch.empty(0, 4, 4), (0.5,))
    assert inter.shape == union.shape == iou.shape == (0, 1)


def test_topk_count_is_the_exact_ceiling():
    for n in (1, 7, 221, 224 * 224):
        for f in ("0.05", "0.1", "0.2", "0.3", "0.333", "1"):
            assert topk_count(n, float(f)) == max(1, math.ceil(Fraction(f) * n))
        for k in range(1, min(n, 300) + 1):
            assert topk_count(n, k / n) == k


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_fraction_outside_unit_interval_is_refused(bad):
    a = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match=r"fractions\[1\]"):
        tk.topk_iou_triton(a, a, (0.5, bad))


def test_non_finite_map_is_named(rng):
    a, b = torch.rand(6, 4, 5, generator=rng), torch.rand(6, 4, 5, generator=rng)
    b[4, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"b\[4\] \(map index 4\)"):
        tk.topk_iou_triton(a, b, (0.5,))
    a[2, 0, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"a\[2\] \(map index 2\)"):
        drift_kernels.topk_iou(a, b, (0.5,))


@settings(max_examples=15, deadline=None)
@given(
    N=st.integers(1, 4),
    H=st.integers(1, 12),
    W=st.integers(1, 12),
    levels=st.sampled_from([1, 2, 3, 1000]),
    fractions=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=5),
    block=st.sampled_from([16, 32, 256]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_any_shape_and_ties(N, H, W, levels, fractions, block, seed):
    rng = torch.Generator().manual_seed(seed)
    a = torch.randint(0, levels, (N, H, W), generator=rng).float() - levels // 2
    b = torch.randint(0, levels, (N, H, W), generator=rng).float()
    _check(a, b, fractions, tk.topk_iou_triton(a, b, fractions, block=block))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_counts_equal_reference(dtype, rng, poison):
    N, H, W = 257, 61, 67
    a = (torch.randint(0, 9, (N, H, W), generator=rng).float() - 4).to(dtype)
    a[a == 0] = -0.0
    b = torch.randn(N, H, W, generator=rng).to(dtype)
    b[:7] = 0
    fractions = (0.05, 0.1, 0.2, 0.3, 1.0)
    got = drift_kernels.topk_iou(a.cuda(), b.cuda(), fractions)
    want = topk_iou_reference(a, b, fractions)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
