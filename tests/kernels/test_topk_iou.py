"""topk_iou kernel: results must equal the reference's bit for bit (interpreter on CPU; compiled for tests marked gpu).

Both tie rules: "fractional" (default; checked against an enumeration of every tie break) and "index".
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import drift_kernels
import numpy as np
import pytest
import torch
from drift_kernels.reference import topk_count, topk_iou_reference, topk_weights_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import gpu, kernels_module, topk_counts_bruteforce

# Interpreter session only: with TRITON_INTERPRET=0 these are skipped, the gpu-marked ones run compiled.
pytestmark = pytest.mark.interpreter

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
    if kind == "sparse":  # a ReLU'd map: exact zeros except about one pixel in ten, some of them tied too
        vals = torch.randint(1, 4, (N, H, W), generator=rng).float()
        return torch.where(torch.rand(N, H, W, generator=rng) < 0.1, vals, 0.0)
    raise ValueError(kind)


def _check(a, b, fractions, got):
    """Index rule: exact int64 counts, equal to the reference's and to a numpy lexsort brute force."""
    inter, union, iou = got
    want = topk_iou_reference(a, b, fractions, ties="index")
    brute_inter, brute_union = topk_counts_bruteforce(a, b, tuple(fractions))
    assert inter.dtype == torch.int64 and union.dtype == torch.int64 and iou.dtype == torch.float32
    assert torch.equal(inter, want[0]) and torch.equal(union, want[1])
    assert np.array_equal(inter.numpy(), brute_inter) and np.array_equal(union.numpy(), brute_union)
    assert torch.equal(iou, want[2])


def _check_fractional(a, b, fractions, got):
    """Fractional rule: float64 results equal to the reference's bit for bit and to sum_i w_a,i w_b,i of the
    membership weights to 1e-12; union = 2k - inter, iou = inter / union."""
    inter, union, iou = got
    want = topk_iou_reference(a, b, fractions)
    assert inter.dtype == union.dtype == iou.dtype == torch.float64
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    dot = [(topk_weights_reference(a, f) * topk_weights_reference(b, f)).sum(1) for f in fractions]
    torch.testing.assert_close(inter, torch.stack(dot, 1), rtol=0, atol=1e-12)
    ks = torch.tensor([topk_count(a.shape[1] * a.shape[2], f) for f in fractions], dtype=torch.float64)
    assert torch.equal(union, 2 * ks - inter) and torch.equal(iou, inter / union)
    assert bool(((inter >= 0) & (inter <= ks)).all())


def _mean_intersection_over_all_tie_breaks(va: np.ndarray, vb: np.ndarray, k: int) -> Fraction:
    """Average |S_a & S_b| over every pair of top-k sets (S_a, S_b) that some tie break of a and of b gives.

    A top-k set holds every pixel above the k-th largest value t and any (k - #above) of the pixels equal to t:
    all such subsets are listed for a and for b, and every pair is intersected (the uniform average over the
    pairs is the expectation under independent, uniformly random tie breaks).
    """

    def all_top_sets(v: np.ndarray) -> np.ndarray:
        t = np.sort(v)[::-1][k - 1]
        above, tied = np.flatnonzero(v > t), np.flatnonzero(v == t)
        sets = []
        for chosen in itertools.combinations(tied.tolist(), k - above.size):
            m = np.zeros(v.size, dtype=np.float64)
            m[above] = 1
            m[list(chosen)] = 1
            sets.append(m)
        return np.stack(sets)

    sa, sb = all_top_sets(va), all_top_sets(vb)
    assert (sa.sum(1) == k).all() and (sb.sum(1) == k).all()
    total = 0
    for chunk in np.array_split(sa, max(1, sa.shape[0] * sb.shape[0] // 500_000)):
        total += int((chunk @ sb.T).sum())  # |S_a & S_b| for every pair: integers, exact in float64
    return Fraction(total, sa.shape[0] * sb.shape[0])


@pytest.mark.parametrize("kind_a, kind_b", [
    ("continuous", "continuous"), ("quantised", "quantised"), ("zeros", "quantised"),
    ("signed_zeros", "zeros"), ("continuous", "quantised"),
])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_index_counts_equal_reference_exactly(kind_a, kind_b, dtype, rng, poison):
    N, H, W = 5, 13, 17
    a = _maps(kind_a, N, H, W, rng).to(dtype)
    b = _maps(kind_b, N, H, W, rng).to(dtype)
    out = (torch.full((N, len(FRACTIONS)), -1), torch.full((N, len(FRACTIONS)), -1), torch.full((N, 6), torch.nan))
    got = tk.topk_iou_triton(a, b, FRACTIONS, ties="index", out=out)
    assert all(g is o for g, o in zip(got, out))
    _check(a, b, FRACTIONS, got)


@pytest.mark.parametrize("H, W, levels", [(3, 4, 3), (5, 5, 3), (3, 4, "sparse"), (5, 5, "sparse")])
def test_fractional_is_the_mean_over_every_tie_break(H, W, levels, rng, poison):
    # Maps with many ties (values in {0, 1, 2}, or all zero but a few pixels): the fractional intersection must
    # be the average intersection over every combination of tie breaks of a and b, enumerated.
    N, P = 6, H * W
    if levels == "sparse":
        maps, n_on = torch.zeros(2 * N, P), P // 5
        for m in maps:
            m[torch.randperm(P, generator=rng)[:n_on]] = torch.randint(1, 3, (n_on,), generator=rng).float()
        a, b = maps[:N].reshape(N, H, W), maps[N:].reshape(N, H, W)
    else:
        a, b = (torch.randint(0, levels, (N, H, W), generator=rng).float() for _ in range(2))
    b[0] = a[0]  # identical maps with ties: the expectation is below k unless no tie group is cut
    fractions = (0.05, 0.1, 0.2, 0.3)
    ref = topk_iou_reference(a, b, fractions)
    out = tuple(torch.full((N, len(fractions)), torch.nan, dtype=torch.float64) for _ in range(3))
    got = tk.topk_iou_triton(a, b, fractions, out=out)
    assert all(g is o for g, o in zip(got, out))
    _check_fractional(a, b, fractions, got)
    assert bool((ref[0] != ref[0].round()).any()), "no tie group was cut: the enumeration would test nothing"
    for n in range(N):
        for t, f in enumerate(fractions):
            k = topk_count(P, f)
            mean = _mean_intersection_over_all_tie_breaks(a[n].numpy().ravel(), b[n].numpy().ravel(), k)
            assert abs(ref[0][n, t].item() - float(mean)) <= 1e-12, (n, f, mean)
            assert abs(got[0][n, t].item() - float(mean)) <= 1e-6, (n, f, mean)
            assert abs(got[2][n, t].item() - float(mean / (2 * k - mean))) <= 1e-12, (n, f)


@pytest.mark.parametrize("kind", ["continuous", "continuous_zero_tail"])
def test_fractional_without_cut_ties_gives_the_index_counts(kind, rng):
    N, H, W = 5, 13, 11
    a, b = torch.randn(N, H, W, generator=rng), torch.randn(N, H, W, generator=rng)
    if kind == "continuous_zero_tail":
        # Ties below every cut: half of each map is exactly zero; the top 30 % holds only distinct values.
        a, b = a.abs(), b.abs()
        a[a < a.flatten(1).median(1).values[:, None, None]] = 0
        b[b < b.flatten(1).median(1).values[:, None, None]] = 0
    fractions = (0.05, 0.1, 0.2, 0.3)
    frac = tk.topk_iou_triton(a, b, fractions)
    index = tk.topk_iou_triton(a, b, fractions, ties="index")
    assert torch.equal(frac[0], index[0].double()) and torch.equal(frac[1], index[1].double())
    assert torch.equal(frac[2], index[0].double() / index[1].double())
    assert torch.equal(frac[0], frac[0].round())


def test_fractional_iou_ignores_pixel_order_on_sparse_maps(rng):
    # Maps zero everywhere but a few pixels: the cut runs through the zeros, which both maps share. The fractional
    # IoU is the same after permuting the pixels of both maps alike; the index rule's moves with the order.
    N, H, W = 5, 13, 11
    a, b = _maps("sparse", N, H, W, rng), _maps("sparse", N, H, W, rng)
    fractions = (0.05, 0.1, 0.2, 0.3)
    base = tk.topk_iou_triton(a, b, fractions)
    base_index = tk.topk_iou_triton(a, b, fractions, ties="index")
    index_moved = False
    for _ in range(4):
        perm = torch.randperm(H * W, generator=rng)
        pa, pb = (m.reshape(N, -1)[:, perm].reshape(N, H, W) for m in (a, b))
        got = tk.topk_iou_triton(pa, pb, fractions)
        for g, w in zip(got, base):
            assert torch.equal(g, w)
        index_moved |= not torch.equal(tk.topk_iou_triton(pa, pb, fractions, ties="index")[2], base_index[2])
    assert index_moved, "the index rule should depend on the pixel order of these maps"


@pytest.mark.parametrize("kind_a, kind_b", [
    ("continuous", "continuous"), ("quantised", "quantised"), ("sparse", "sparse"), ("zeros", "quantised"),
    ("signed_zeros", "zeros"), ("continuous", "sparse"),
])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fractional_equals_reference_at_odd_shapes(kind_a, kind_b, dtype, rng, poison):
    N, H, W = 5, 13, 11
    a = _maps(kind_a, N, H, W, rng).to(dtype)
    b = _maps(kind_b, N, H, W, rng).to(dtype)
    out = tuple(torch.full((N, len(FRACTIONS)), torch.nan, dtype=torch.float64) for _ in range(3))
    got = tk.topk_iou_triton(a, b, FRACTIONS, out=out)
    assert all(g is o for g, o in zip(got, out))
    _check_fractional(a, b, FRACTIONS, got)
    # Launch geometry changes nothing: one map pair per program, and 16-pixel tiles.
    for g, w in zip(tk.topk_iou_triton(a, b, FRACTIONS, block=16, rows_per_program=1), got):
        assert torch.equal(g, w)


def test_tie_rule_and_out_dtypes_are_checked(rng):
    a = torch.rand(2, 4, 4, generator=rng)
    for call in (
        lambda: tk.topk_iou_triton(a, a, (0.5,), ties="random"),
        lambda: drift_kernels.topk_iou(a, a, (0.5,), ties="lower"),
        lambda: topk_iou_reference(a, a, (0.5,), ties=None),
    ):
        with pytest.raises(ValueError, match="ties must be 'fractional', 'jaccard' or 'index'"):
            call()
    index_out = (torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1, dtype=torch.int64), torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"out \(inter\) must be a contiguous torch.float64 .* ties='fractional'"):
        tk.topk_iou_triton(a, a, (0.5,), out=index_out)
    frac_out = tuple(torch.zeros(2, 1, dtype=torch.float64) for _ in range(3))
    with pytest.raises(ValueError, match=r"out \(inter\) must be a contiguous torch.int64 .* ties='index'"):
        tk.topk_iou_triton(a, a, (0.5,), ties="index", out=frac_out)


@pytest.mark.parametrize("rows", [1, 2, 8])
def test_ties_cut_across_tiles(rows, rng, poison):
    # 16-pixel tiles: tie groups straddle tiles, so the carried tie counts decide the cut (index rule) and the
    # tie counts sum over tiles (fractional rule).
    N, H, W = 7, 9, 11
    a = _maps("quantised", N, H, W, rng)
    b = (torch.rand(N, H, W, generator=rng) * 3).floor()
    fractions = (0.07, 0.25, 0.5, 0.9, 1.0)
    _check(a, b, fractions, tk.topk_iou_triton(a, b, fractions, ties="index", block=16, rows_per_program=rows))
    _check_fractional(a, b, fractions, tk.topk_iou_triton(a, b, fractions, block=16, rows_per_program=rows))


def test_identical_and_disjoint_maps(rng):
    N, H, W = 4, 8, 8
    a = torch.randn(N, H, W, generator=rng)
    k = torch.tensor([topk_count(64, 0.25), 64])
    for ties in ("index", "fractional"):
        inter, union, iou = tk.topk_iou_triton(a, a.clone(), (0.25, 1.0), ties=ties)
        assert torch.equal(inter, k.to(inter.dtype).expand(N, 2)) and torch.equal(union, k.to(union.dtype).expand(N, 2))
        assert torch.equal(iou, torch.ones(N, 2, dtype=iou.dtype))
        # b ranks pixels in the opposite order: its top quarter is a's bottom quarter.
        inter, union, iou = tk.topk_iou_triton(a, -a, (0.25,), ties=ties)
        assert torch.equal(inter, torch.zeros(N, 1, dtype=inter.dtype))
        assert torch.equal(union, torch.full((N, 1), 2 * 16, dtype=union.dtype))


def test_dispatch_and_empty_stack(rng):
    a, b = torch.rand(3, 5, 7, generator=rng), torch.rand(3, 5, 7, generator=rng)
    assert drift_kernels.backend(a) == "triton"
    _check(a, b, [0.2, 0.6], drift_kernels.topk_iou(a, b, [0.2, 0.6], ties="index"))
    _check_fractional(a, b, [0.2, 0.6], drift_kernels.topk_iou(a, b, [0.2, 0.6]))
    for ties, dtypes in (("index", (torch.int64, torch.int64, torch.float32)), ("fractional", (torch.float64,) * 3)):
        got = drift_kernels.topk_iou(torch.empty(0, 4, 4), torch.empty(0, 4, 4), (0.5,), ties=ties)
        assert [g.shape for g in got] == [(0, 1)] * 3 and tuple(g.dtype for g in got) == dtypes


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
    ties=st.sampled_from(["fractional", "index"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_any_shape_and_ties(N, H, W, levels, fractions, block, ties, seed):
    rng = torch.Generator().manual_seed(seed)
    a = torch.randint(0, levels, (N, H, W), generator=rng).float() - levels // 2
    b = torch.randint(0, levels, (N, H, W), generator=rng).float()
    check = _check if ties == "index" else _check_fractional
    check(a, b, fractions, tk.topk_iou_triton(a, b, fractions, ties=ties, block=block))


@gpu
@pytest.mark.parametrize("ties", ["fractional", "jaccard", "index"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_counts_equal_reference(dtype, ties, rng, poison):
    N, H, W = 257, 61, 67
    a = (torch.randint(0, 9, (N, H, W), generator=rng).float() - 4).to(dtype)
    a[a == 0] = -0.0
    b = torch.randn(N, H, W, generator=rng).to(dtype)
    b[:7] = 0
    b[7:20] = torch.relu(b[7:20])  # sparse maps: the cut runs through the zeros
    fractions = (0.05, 0.1, 0.2, 0.3, 1.0)
    got = drift_kernels.topk_iou(a.cuda(), b.cuda(), fractions, ties=ties)
    want = topk_iou_reference(a, b, fractions, ties=ties)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)
