"""fisher_gram kernel (through Triton's interpreter on CPU; compiled on a GPU for tests marked gpu)."""

from __future__ import annotations

import drift_kernels
import pytest
import torch
from drift_kernels.reference import fisher_factor, fisher_gram_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import assert_error_rule, gpu, jacobian, kernels_module, probabilities

# Interpreter session only: with TRITON_INTERPRET=0 these are skipped, the gpu-marked ones run compiled.
pytestmark = pytest.mark.interpreter

fg = kernels_module("fisher_gram_kernel")


def _check(J, p, x, head, K, Gx, what):
    K64, Gx64 = fisher_gram_reference(J, p, x, head, compute_dtype=torch.float64)
    Kr, Gxr = fisher_gram_reference(J, p, x, head)
    assert K.dtype == torch.float32
    assert_error_rule(K, Kr, K64, f"K {what}")
    if x is None:
        assert Gx is None
    else:
        assert Gx.dtype == torch.float32
        assert_error_rule(Gx, Gxr, Gx64, f"Gx {what}")


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("C, B", [(3, 1), (5, 3), (14, 1), (17, 3)])
def test_matches_float64_reference_with_splits_and_tails(C, B, dtype, head, rng, poison):
    D = int(torch.randint(150, 400, (1,), generator=rng))  # rarely a multiple of the 32-long tiles
    J = jacobian(B, C, D, dtype, rng)
    p = probabilities(B, C, head, rng)
    x = torch.randn(B, D, generator=rng)
    out = (torch.full((B, C, C), float("nan")), torch.full((B, C), float("nan")))
    K, Gx = fg.fisher_gram_triton(J, p, x, head, out=out, block_d=32, tiles_per_split=3)
    assert K is out[0] and Gx is out[1]
    _check(J, p, x, head, K, Gx, f"C={C} B={B} D={D} {dtype} {head}")


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
@pytest.mark.parametrize("C", [5, 17])
def test_near_one_hot_probabilities(C, head, rng, poison):
    B, D = 3, 211
    J = jacobian(B, C, D, torch.float32, rng)
    p = probabilities(B, C, head, rng, one_hot=True)
    x = torch.randn(B, D, generator=rng)
    K, Gx = fg.fisher_gram_triton(J, p, x, head, block_d=64, tiles_per_split=2)
    _check(J, p, x, head, K, Gx, f"one-hot C={C} {head}")


@pytest.mark.parametrize("C", [130, 256])
def test_more_than_128_classes_uses_row_blocks(C, rng, poison):
    B, D = 2, 45
    J = jacobian(B, C, D, torch.float32, rng)
    p = probabilities(B, C, "softmax", rng)
    x = torch.randn(B, D, generator=rng)
    K, Gx = fg.fisher_gram_triton(J, p, x, "softmax", block_d=16)
    _check(J, p, x, "softmax", K, Gx, f"C={C}")


@pytest.mark.parametrize("C", [6, 20])
def test_fresh_accumulator_every_inner_tiles(C, rng, poison, monkeypatch):
    # tiles_per_split = 7 with INNER_TILES = 3: chunks of 3, 3 and 1 tiles (a partial last chunk), on both paths.
    monkeypatch.setattr(fg, "INNER_TILES", 3)
    B, D = 2, 7 * 2 * 16 - 5
    J = jacobian(B, C, D, torch.float32, rng)
    p = probabilities(B, C, "softmax", rng)
    x = torch.randn(B, D, generator=rng)
    K, Gx = fg.fisher_gram_triton(J, p, x, block_d=16, tiles_per_split=7)
    _check(J, p, x, "softmax", K, Gx, f"INNER_TILES=3 C={C}")


@pytest.mark.parametrize("C", [5, 20])
def test_centring_on_the_most_probable_class_with_unnormalised_p(C, rng, poison):
    # p need not sum to 1 (float32 softmax rounds; callers pass their own p): delta = 1 - sum p enters the centre.
    B, D = 3, 97
    J = jacobian(B, C, D, torch.float32, rng)
    p = probabilities(B, C, "softmax", rng, one_hot=True)
    p[0] *= 0.999  # sum 0.999
    p[1, (int(p[1].argmax()) + 1) % C] += 1e-3  # sum 1.001, the argmax not where jacobian() put its largest row
    x = torch.randn(B, D, generator=rng)
    K, Gx = fg.fisher_gram_triton(J, p, x, block_d=32)
    _check(J, p, x, "softmax", K, Gx, f"unnormalised p C={C}")


def test_default_launch_through_the_dispatch(rng, poison):
    B, C, D = 3, 5, 3 * 17 * 19
    J = jacobian(B, C, D, torch.float32, rng)
    p = probabilities(B, C, "softmax", rng)
    x = torch.randn(B, D, generator=rng)
    assert drift_kernels.backend(J) == "triton"
    K, Gx = drift_kernels.fisher_gram(J, p, x)
    _check(J, p, x, "softmax", K, Gx, "dispatch")
    K2, none = drift_kernels.fisher_gram(J, p)
    assert none is None
    torch.testing.assert_close(K2, K, rtol=1e-6, atol=1e-6 * float(K.abs().max()))


def test_K_is_exactly_symmetric_and_matches_the_explicit_factor(rng):
    B, C, D = 2, 14, 333
    J = jacobian(B, C, D, torch.float32, rng)
    p = probabilities(B, C, "softmax", rng)
    K, _ = fg.fisher_gram_triton(J, p, block_d=64, tiles_per_split=2)
    assert torch.equal(K, K.transpose(1, 2))
    # The softmax factor has sum_c sqrt(p_c) G_c = 0, so K sqrt(p) = 0: a property independent of the reference.
    G64 = fisher_factor(J.double(), p.double())
    null = torch.einsum("bij,bj->bi", K.double(), p.double().sqrt())
    assert float(null.abs().max()) <= 1e-5 * float(G64.square().sum(-1).max())


def test_bitwise_deterministic(rng):
    B, C, D = 3, 5, 500
    J = jacobian(B, C, D, torch.float32, rng)
    p = probabilities(B, C, "softmax", rng)
    x = torch.randn(B, D, generator=rng)
    first = fg.fisher_gram_triton(J, p, x, block_d=32, tiles_per_split=4)
    second = fg.fisher_gram_triton(J, p, x, block_d=32, tiles_per_split=4)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_strided_inputs(rng):
    B, C, D = 2, 5, 97
    base = torch.randn(B, C + 3, D + 4, generator=rng)
    J = base[:, 1 : C + 1, 2 : D + 2]  # stride 1 along D, padded rows: the kernel reads it in place
    Jt = torch.randn(B, D, C, generator=rng).transpose(1, 2)  # D stride != 1: copied first
    p = probabilities(B, C, "sigmoid", rng)
    x = torch.randn(D, B, generator=rng).t()
    for JJ in (J, Jt):
        K, Gx = fg.fisher_gram_triton(JJ, p, x, "sigmoid", block_d=32)
        _check(JJ, p, x, "sigmoid", K, Gx, f"strides {JJ.stride()}")


def test_out_and_block_arguments_are_checked(rng):
    J = torch.randn(2, 5, 40, generator=rng)
    p = probabilities(2, 5, "softmax", rng)
    with pytest.raises(ValueError, match=r"out\[0\] \(K\)"):
        fg.fisher_gram_triton(J, p, out=(torch.empty(2, 5, 4), None))
    with pytest.raises(ValueError, match=r"out\[1\] \(Gx\)"):
        fg.fisher_gram_triton(J, p, torch.randn(2, 40), out=(torch.empty(2, 5, 5), torch.empty(2, 5).double()))
    with pytest.raises(ValueError, match="block_d"):
        fg.fisher_gram_triton(J, p, block_d=48)
    with pytest.raises(ValueError, match="tiles_per_split"):
        fg.fisher_gram_triton(J, p, tiles_per_split=0)
    with pytest.raises(TypeError, match="float64"):
        fg.fisher_gram_triton(J.double(), p)
    with pytest.raises(ValueError, match="at most C = 256"):
        fg.fisher_gram_triton(torch.randn(1, 257, 16), torch.full((1, 257), 1 / 257))


def test_autotune_path_with_one_config_when_interpreted(rng):
    B, C, D = 2, 5, 123
    J = jacobian(B, C, D, torch.float32, rng)
    p = probabilities(B, C, "softmax", rng)
    K, _ = fg.fisher_gram_triton(J, p, autotune=True)
    _check(J, p, None, "softmax", K, None, "autotune")


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 3),
    C=st.integers(1, 20),
    D=st.integers(1, 150),
    block_d=st.sampled_from([16, 32, 64]),
    tiles=st.integers(1, 4),
    head=st.sampled_from(["softmax", "sigmoid"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_any_shape(B, C, D, block_d, tiles, head, seed):
    rng = torch.Generator().manual_seed(seed)
    J = jacobian(B, C, D, torch.float32, rng)
    p = probabilities(B, C, head, rng)
    x = torch.randn(B, D, generator=rng)
    K, Gx = fg.fisher_gram_triton(J, p, x, head, block_d=block_d, tiles_per_split=tiles)
    _check(J, p, x, head, K, Gx, f"B={B} C={C} D={D} block={block_d} tiles={tiles} {head}")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C", [5, 14, 100, 200])
def test_gpu_matches_reference_and_is_deterministic(C, dtype, rng, poison):
    B, D = 4, 3 * 61 * 67
    J = jacobian(B, C, D, dtype, rng).cuda()
    p = probabilities(B, C, "softmax", rng).cuda()
    x = torch.randn(B, D, generator=rng).cuda()
    K, Gx = drift_kernels.fisher_gram(J, p, x)
    K64, Gx64 = fisher_gram_reference(J, p, x, compute_dtype=torch.float64)
    Kr, Gxr = fisher_gram_reference(J, p, x)
    assert_error_rule(K, Kr, K64, f"gpu K C={C} {dtype}")
    assert_error_rule(Gx, Gxr, Gx64, f"gpu Gx C={C} {dtype}")
    again = drift_kernels.fisher_gram(J, p, x)
    assert torch.equal(K, again[0]) and torch.equal(Gx, again[1])


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_autotune_over_several_configs(dtype, rng):
    B, C, D = 3, 14, 20_000
    J = jacobian(B, C, D, dtype, rng).cuda()
    p = probabilities(B, C, "sigmoid", rng).cuda()
    K, _ = fg.fisher_gram_triton(J, p, head="sigmoid", autotune=True)
    K64, _ = fisher_gram_reference(J, p, head="sigmoid", compute_dtype=torch.float64)
    Kr, _ = fisher_gram_reference(J, p, head="sigmoid")
    assert_error_rule(K, Kr, K64, f"gpu autotune {dtype}")
    assert torch.equal(K, fg.fisher_gram_triton(J, p, head="sigmoid", autotune=True)[0])
