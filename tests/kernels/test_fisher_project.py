"""fisher_project kernel (through Triton's interpreter on CPU; compiled on a GPU for tests marked gpu)."""

from __future__ import annotations

import drift_kernels
import pytest
import torch
from drift_kernels.reference import fisher_factor, fisher_gram_reference, fisher_project_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_checks import assert_error_rule, gpu, jacobian, kernels_module, probabilities

# Interpreter session only: with TRITON_INTERPRET=0 these are skipped, the gpu-marked ones run compiled.
pytestmark = pytest.mark.interpreter

fp = kernels_module("fisher_project_kernel")


def _check(J, p, W, head, Y, what):
    Y64 = fisher_project_reference(J, p, W, head, compute_dtype=torch.float64)
    Yr = fisher_project_reference(J, p, W, head)
    assert Y.dtype == torch.float32
    assert_error_rule(Y, Yr, Y64, what)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("C, B, m", [(3, 1, 1), (5, 3, 4), (14, 1, 17), (17, 3, 20), (6, 2, 65)])
def test_matches_float64_reference(C, B, m, dtype, head, rng, poison):
    D = int(torch.randint(100, 300, (1,), generator=rng))
    J = jacobian(B, C, D, dtype, rng)
    p = probabilities(B, C, head, rng)
    W = torch.randn(B, C, m, generator=rng)
    out = torch.full((B, D, m), float("nan"))
    Y = fp.fisher_project_triton(J, p, W, head, out=out, block_d=64)
    assert Y is out
    _check(J, p, W, head, Y, f"C={C} B={B} m={m} D={D} {dtype} {head}")


@pytest.mark.parametrize("m", [2, 33])
def test_near_one_hot_probabilities(m, rng, poison):
    B, C, D = 2, 5, 157
    J = jacobian(B, C, D, torch.float32, rng)
    p = probabilities(B, C, "softmax", rng, one_hot=True)
    W = torch.randn(B, C, m, generator=rng)
    _check(J, p, W, "softmax", fp.fisher_project_triton(J, p, W, block_d=32), f"one-hot m={m}")


@pytest.mark.parametrize("head, one_hot", [("softmax", False), ("softmax", True), ("sigmoid", False)])
@pytest.mark.parametrize("C, m", [(100, 40), (200, 70)])
def test_gpu_tiling_of_the_dot_path(C, m, head, one_hot, rng, poison, monkeypatch):
    # The GPU's launch for m > 16 (classes in blocks of 16, columns of W in blocks of 64), through the interpreter:
    # several class blocks, the last one cut short, one or two column blocks, centring on the argmax class.
    cfg = fp._config(C, 4096, m, on_gpu=True)
    assert cfg.use_dot and cfg.block_c < C and C % cfg.block_c and m % cfg.m_pad
    monkeypatch.setattr(fp, "_config", lambda *args: cfg)
    B, D = 2, 3 * 29
    J = jacobian(B, C, D, torch.bfloat16, rng)
    p = probabilities(B, C, head, rng, one_hot=one_hot)
    W = torch.randn(B, C, m, generator=rng)
    Y = fp.fisher_project_triton(J, p, W, head)
    _check(J, p, W, head, Y, f"GPU tiling C={C} m={m} {head}{' one-hot' if one_hot else ''}")


def test_eigenvectors_of_the_fisher_matrix_are_orthonormal(rng):
    # W = U diag(lambda)^-1/2 from K = G G^T turns G^T W into orthonormal eigenvectors of F = G^T G.
    B, C, D = 2, 5, 400
    J = jacobian(B, C, D, torch.float64, rng).float()
    p = probabilities(B, C, "softmax", rng)
    K64, _ = fisher_gram_reference(J, p, compute_dtype=torch.float64)
    lam, U = torch.linalg.eigh(K64)
    keep = lam[:, 1:]  # the smallest is the null direction sqrt(p) of the softmax factor
    W = (U[:, :, 1:] / keep.sqrt().unsqueeze(1)).float()
    V = drift_kernels.fisher_project(J, p, W).double()
    eye = torch.eye(C - 1, dtype=torch.float64).expand(B, -1, -1)
    torch.testing.assert_close(V.transpose(1, 2) @ V, eye, atol=1e-4, rtol=0)
    G64 = fisher_factor(J.double(), p.double())
    FV = G64.transpose(1, 2) @ (G64 @ V)
    torch.testing.assert_close(FV, V * keep.unsqueeze(1), atol=1e-4 * float(keep.max()), rtol=0)


def test_bitwise_deterministic_and_strided(rng):
    B, C, D, m = 2, 14, 201, 3
    J = torch.randn(B, D, C, generator=rng).transpose(1, 2)
    p = probabilities(B, C, "sigmoid", rng)
    W = torch.randn(B, m, C, generator=rng).transpose(1, 2)
    first = fp.fisher_project_triton(J, p, W, "sigmoid", block_d=32)
    assert torch.equal(first, fp.fisher_project_triton(J, p, W, "sigmoid", block_d=32))
    _check(J, p, W, "sigmoid", first, "strided")


def test_out_and_block_arguments_are_checked(rng):
    J = torch.randn(2, 5, 40, generator=rng)
    p = probabilities(2, 5, "softmax", rng)
    W = torch.randn(2, 5, 3, generator=rng)
    with pytest.raises(ValueError, match="out must be a contiguous float32 tensor of shape"):
        fp.fisher_project_triton(J, p, W, out=torch.empty(2, 40, 2))
    with pytest.raises(ValueError, match="block_d"):
        fp.fisher_project_triton(J, p, W, block_d=20)
    with pytest.raises(ValueError, match="W must have shape"):
        fp.fisher_project_triton(J, p, torch.randn(2, 4, 3))
    with pytest.raises(TypeError, match="float64"):
        fp.fisher_project_triton(J.double(), p, W)


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 3),
    C=st.integers(1, 20),
    D=st.integers(1, 150),
    m=st.integers(1, 24),
    block_d=st.sampled_from([16, 32, 128]),
    head=st.sampled_from(["softmax", "sigmoid"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_any_shape(B, C, D, m, block_d, head, seed):
    rng = torch.Generator().manual_seed(seed)
    J = jacobian(B, C, D, torch.float32, rng)
    p = probabilities(B, C, head, rng)
    W = torch.randn(B, C, m, generator=rng)
    Y = fp.fisher_project_triton(J, p, W, head, block_d=block_d)
    _check(J, p, W, head, Y, f"B={B} C={C} D={D} m={m} block={block_d} {head}")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("C, m", [(5, 1), (14, 4), (100, 4), (100, 40), (200, 3)])
def test_gpu_matches_reference_and_is_deterministic(C, m, dtype, rng, poison):
    B, D = 3, 3 * 61 * 67
    J = jacobian(B, C, D, dtype, rng).cuda()
    p = probabilities(B, C, "softmax", rng).cuda()
    W = torch.randn(B, C, m, generator=rng).cuda()
    Y = drift_kernels.fisher_project(J, p, W)
    _check(J, p, W, "softmax", Y, f"gpu C={C} m={m} {dtype}")
    assert torch.equal(Y, drift_kernels.fisher_project(J, p, W))
