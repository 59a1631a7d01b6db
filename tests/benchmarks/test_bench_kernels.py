"""Timed kernels, each checked against a float64 NumPy evaluation of its formula.

``impl="kernel"`` calls the public entry (``drift_kernels.fisher_gram`` ...), which runs the Triton kernel: compiled
on a GPU, through Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1). ``impl="reference"``
times the torch reference. Error rule for the kernel: at most twice the torch reference's error in the same dtype,
both measured against float64 (or a few float32 ulps, whichever is larger).
"""

import math

import drift_kernels as dk
import numpy as np
import pytest
import torch
from drift_kernels._common import interpreting

FRACTIONS = (0.05, 0.1, 0.2, 0.3)
# Floor of the 2x rule: when the reference happens to round almost exactly, a different (split-D) summation order
# still carries a few float32 ulps of the largest entry; measured kernel errors reach 4e-7 at ratios up to 2.7.
ULPS = 8 * torch.finfo(torch.float32).eps


def compiled_gpu(device: torch.device) -> bool:
    return device.type == "cuda" and not interpreting()


def fisher_shape(device: torch.device, rng: torch.Generator) -> tuple[int, int, int]:
    """GPU: a study-sized batch (64 px, 5 classes, or 224 px, 14 classes); CPU (interpreter): odd, small."""
    if compiled_gpu(device):
        return (16, 5, 64 * 64 + 1) if int(torch.randint(0, 2, (1,), generator=rng)) else (8, 14, 224 * 224)
    return 3, 5, int(torch.randint(100, 700, (1,), generator=rng)) | 1


def fisher_inputs(device, dtype, rng):
    B, C, D = fisher_shape(device, rng)
    J = torch.randn(B, C, D, generator=rng).to(dtype)
    p = torch.softmax(3 * torch.randn(B, C, generator=rng, dtype=torch.float64), 1).float()
    x = torch.rand(B, D, generator=rng).to(dtype)
    return J.to(device), p.to(device), x.to(device)


def numpy_factor(J: torch.Tensor, p: torch.Tensor) -> np.ndarray:
    """G (B, C, D) in float64: G_c = sqrt(p_c) (J_c - sum_j p_j J_j), from the rounded inputs."""
    Jn = J.double().cpu().numpy()
    pn = p.double().cpu().numpy()
    mean = np.einsum("bc,bcd->bd", pn, Jn)
    return np.sqrt(pn)[:, :, None] * (Jn - mean[:, None, :])


def rel_err(got: torch.Tensor, exact: np.ndarray) -> float:
    return float(np.abs(got.double().cpu().numpy() - exact).max() / np.abs(exact).max())


def check_kernel_runs(impl: str, t: torch.Tensor) -> None:
    if impl == "kernel":
        assert dk.backend(t) == "triton", "the kernel must run here (TRITON_INTERPRET=1 on the CPU, or CUDA)"


# bf16 tl.dot is wrong under Triton's interpreter: bf16 is covered by the GPU run only.
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_fisher_gram(timed, benchmark, bench_device, rng, impl, dtype):
    J, p, x = fisher_inputs(bench_device, dtype, rng)
    check_kernel_runs(impl, J)
    fn = dk.fisher_gram if impl == "kernel" else dk.fisher_gram_reference
    K, Gx = timed(fn, J, p, x, "softmax")

    G = numpy_factor(J, p)
    K_exact = G @ G.transpose(0, 2, 1)
    Gx_exact = np.einsum("bcd,bd->bc", G, x.double().cpu().numpy())
    K_ref, Gx_ref = dk.fisher_gram_reference(J, p, x, "softmax")
    err = max(rel_err(K, K_exact), rel_err(Gx, Gx_exact))
    ref_err = max(rel_err(K_ref, K_exact), rel_err(Gx_ref, Gx_exact))
    benchmark.extra_info.update(max_rel_error=err, reference_max_rel_error=ref_err)
    assert K.shape == (J.shape[0], J.shape[1], J.shape[1]) and Gx.shape == J.shape[:2]
    # An fp32 accumulation over D terms: a few ulps of float32 at most, whatever the input dtype.
    assert ref_err <= 1e-5
    assert err <= max(2 * ref_err, ULPS), (err, ref_err)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_fisher_project(timed, benchmark, bench_device, rng, impl, dtype):
    J, p, _ = fisher_inputs(bench_device, dtype, rng)
    m = int(torch.randint(1, 6, (1,), generator=rng))
    W = torch.randn(J.shape[0], J.shape[1], m, generator=rng).to(bench_device)
    check_kernel_runs(impl, J)
    fn = dk.fisher_project if impl == "kernel" else dk.fisher_project_reference
    V = timed(fn, J, p, W, "softmax")

    exact = numpy_factor(J, p).transpose(0, 2, 1) @ W.double().cpu().numpy()
    err = rel_err(V, exact)
    ref_err = rel_err(dk.fisher_project_reference(J, p, W, "softmax"), exact)
    benchmark.extra_info.update(max_rel_error=err, reference_max_rel_error=ref_err)
    assert V.shape == (J.shape[0], J.shape[2], m)
    assert ref_err <= 1e-5
    assert err <= max(2 * ref_err, ULPS), (err, ref_err)


def numpy_topk_sets(maps: np.ndarray, k: int) -> np.ndarray:
    """(N, P) boolean top-k sets: value descending, ties to the lower flat index (stable sort of -value)."""
    order = np.argsort(-maps, axis=1, kind="stable")[:, :k]
    out = np.zeros(maps.shape, dtype=bool)
    np.put_along_axis(out, order, True, axis=1)
    return out


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_topk_iou(timed, benchmark, bench_device, rng, impl):
    if compiled_gpu(bench_device):
        N, H, W = 64, 224, 224
    else:
        N, H, W = 13, 17, int(torch.randint(11, 30, (1,), generator=rng))
    # Eight levels: many ties, so the tie rule decides most of each set.
    a = (torch.randint(0, 8, (N, H, W), generator=rng).float() / 7).to(bench_device)
    b = (torch.randint(0, 8, (N, H, W), generator=rng).float() / 7).to(bench_device)
    check_kernel_runs(impl, a)
    fn = dk.topk_iou if impl == "kernel" else dk.topk_iou_reference
    inter, union, iou = timed(fn, a, b, FRACTIONS, ties="index")

    fa, fb = a.reshape(N, -1).cpu().numpy(), b.reshape(N, -1).cpu().numpy()
    for t, f in enumerate(FRACTIONS):
        k = math.ceil(round(f * H * W, 9))
        sa, sb = numpy_topk_sets(fa, k), numpy_topk_sets(fb, k)
        np.testing.assert_array_equal(inter[:, t].cpu().numpy(), (sa & sb).sum(1), err_msg=f"fraction {f}")
        np.testing.assert_array_equal(union[:, t].cpu().numpy(), (sa | sb).sum(1), err_msg=f"fraction {f}")
        np.testing.assert_allclose(iou[:, t].cpu().numpy(), (sa & sb).sum(1) / (sa | sb).sum(1), rtol=1e-6)
