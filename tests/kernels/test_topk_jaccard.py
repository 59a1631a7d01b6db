"""The reflexive top-k overlap (``ties="jaccard"``): weighted Jaccard of the fractional memberships, in the kernel
(under Triton's interpreter) and the torch reference, against a float64 brute force of sum min / sum max."""

from __future__ import annotations

import drift_kernels
import pytest
import torch
from drift_kernels.reference import topk_count, topk_iou_reference, topk_weights_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import kernels_module

pytestmark = pytest.mark.interpreter

tk = kernels_module("topk_iou_kernel")

FRACTIONS = (0.05, 0.1, 0.3, 20 / 221, 1e-4, 1.0)


def _brute(a: torch.Tensor, b: torch.Tensor, fractions) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i min(w_a, w_b) and sum_i max(w_a, w_b) of the membership weights, float64, pixel by pixel."""
    inter, union = [], []
    for f in fractions:
        wa, wb = topk_weights_reference(a.double(), f), topk_weights_reference(b.double(), f)
        inter.append(torch.minimum(wa, wb).sum(1))
        union.append(torch.maximum(wa, wb).sum(1))
    return torch.stack(inter, 1), torch.stack(union, 1)


def _maps(kind: str, N: int, H: int, W: int, rng: torch.Generator) -> torch.Tensor:
    if kind == "continuous":
        return torch.rand(N, H, W, generator=rng)
    if kind == "quantised":
        return torch.randint(0, 4, (N, H, W), generator=rng).float()
    if kind == "sparse":  # ReLU'd: zero plateaus, a few tied positive levels
        vals = torch.randint(1, 4, (N, H, W), generator=rng).float()
        return torch.where(torch.rand(N, H, W, generator=rng) < 0.15, vals, 0.0)
    if kind == "zeros":
        return torch.zeros(N, H, W)
    raise ValueError(kind)


def _check(a, b, fractions, got):
    inter, union, iou = got
    want = topk_iou_reference(a, b, fractions, ties="jaccard")
    for g, w in zip(got, want):
        assert g.dtype == torch.float64 and torch.equal(g, w)  # kernel and reference: bit for bit
    bi, bu = _brute(a, b, fractions)
    torch.testing.assert_close(inter, bi, rtol=0, atol=1e-12)
    torch.testing.assert_close(union, bu, rtol=0, atol=1e-12)
    assert torch.equal(iou, inter / union)


PAIRS = [("continuous", "continuous"), ("quantised", "quantised"), ("sparse", "sparse"), ("zeros", "sparse"),
         ("continuous", "sparse")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_jaccard_kernel_equals_reference_and_brute_force(dtype, rng, poison):
    """One stack holding two map pairs of every kind pair (one launch: the interpreter is slow per launch)."""
    H, W = 13, 17
    a = torch.cat([_maps(ka, 2, H, W, rng) for ka, _ in PAIRS]).to(dtype)
    b = torch.cat([_maps(kb, 2, H, W, rng) for _, kb in PAIRS]).to(dtype)
    _check(a, b, FRACTIONS, tk.topk_iou_triton(a, b, FRACTIONS, ties="jaccard"))
    if dtype == torch.float32:  # 64-pixel tiles (4 per map), two maps a program: tie groups straddle tiles
        _check(a, b, FRACTIONS, tk.topk_iou_triton(a, b, FRACTIONS, ties="jaccard", block=64, rows_per_program=2))


def test_jaccard_is_exactly_one_for_identical_maps(rng):
    """IoU(x, x) = 1 exactly with ties and zero plateaus; the fractional rule's product is below 1 there."""
    H, W = 11, 13
    a = torch.cat([_maps(kind, 3, H, W, rng) for kind in ("continuous", "quantised", "sparse", "zeros")])
    N = a.shape[0]
    for got in (tk.topk_iou_triton(a, a.clone(), FRACTIONS, ties="jaccard"),
                topk_iou_reference(a, a.clone(), FRACTIONS, ties="jaccard"),
                drift_kernels.topk_iou(a, a.clone(), FRACTIONS, ties="jaccard")):
        assert torch.equal(got[2], torch.ones_like(got[2]))
        ks = torch.tensor([topk_count(H * W, f) for f in FRACTIONS], dtype=torch.float64)
        assert torch.equal(got[0], ks.expand(N, -1)) and torch.equal(got[1], ks.expand(N, -1))
    frac = tk.topk_iou_triton(a[3:9], a[3:9].clone(), FRACTIONS, ties="fractional")[2]  # quantised, sparse
    assert bool((frac < 1).any()), "these maps cut a tie group: the product rule is not reflexive on them"


def test_jaccard_equals_set_iou_without_cut_ties(rng):
    N, H, W = 5, 13, 11
    a, b = torch.randn(N, H, W, generator=rng), torch.randn(N, H, W, generator=rng)
    fr = (0.05, 0.1, 0.2, 0.3)
    jac = tk.topk_iou_triton(a, b, fr, ties="jaccard")
    index = tk.topk_iou_triton(a, b, fr, ties="index")
    assert torch.equal(jac[0], index[0].double()) and torch.equal(jac[1], index[1].double())


@settings(max_examples=8, deadline=None)
@given(N=st.integers(1, 3), H=st.integers(1, 9), W=st.integers(1, 9), levels=st.sampled_from([1, 2, 3, 1000]),
       fractions=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=4), seed=st.integers(0, 2**31 - 1))
def test_jaccard_properties(N, H, W, levels, fractions, seed):
    """Symmetry, pixel-order independence, IoU in [0, 1], and the triangle inequality of 1 - IoU."""
    rng = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randint(0, levels, (N, H, W), generator=rng).float() for _ in range(3))
    ab = tk.topk_iou_triton(a, b, fractions, ties="jaccard")
    _check(a, b, fractions, ab)
    ba = tk.topk_iou_triton(b, a, fractions, ties="jaccard")
    assert torch.equal(ab[2], ba[2])
    perm = torch.randperm(H * W, generator=rng)
    pa, pb = (m.reshape(N, -1)[:, perm].reshape(N, H, W) for m in (a, b))
    assert torch.equal(tk.topk_iou_triton(pa, pb, fractions, ties="jaccard")[2], ab[2])
    assert bool(((ab[2] >= 0) & (ab[2] <= 1)).all())
    d = lambda x, y: 1 - topk_iou_reference(x, y, fractions, ties="jaccard")[2]  # noqa: E731
    assert bool((d(a, c) <= d(a, b) + d(b, c) + 1e-12).all())
