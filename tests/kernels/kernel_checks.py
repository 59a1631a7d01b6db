"""Checks shared by the kernel tests: the error rule, input makers and a brute-force top-k reference."""

from __future__ import annotations

import os

import drift_kernels
import numpy as np
import pytest
import torch
from drift_kernels.reference import topk_count

EPS32 = torch.finfo(torch.float32).eps


def gpu(fn):
    """Mark a test that needs compiled kernels on a CUDA device (skipped without CUDA or under the interpreter)."""
    fn = pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels needed: run with TRITON_INTERPRET=0"
    )(fn)
    return pytest.mark.gpu(fn)


def assert_error_rule(out: torch.Tensor, ref: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    """Kernel error against the float64 reference <= 2x the torch reference's error + 4 float32 ulps of the scale.

    The floor matters for small problems only, where both errors sit at the rounding level of the output and
    their ratio says nothing about the kernel (e.g. numpy's and MKL's float32 matmuls round differently).
    """
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite entries (an output element was not written?)"
    err = float((out.double() - ref64).abs().max())
    err_ref = float((ref.double() - ref64).abs().max())
    atol = 4 * EPS32 * float(ref64.abs().max())
    assert err <= 2 * err_ref + atol, f"{what}: kernel error {err:.3e} > 2 x reference error {err_ref:.3e} + {atol:.1e}"


def probabilities(B: int, C: int, head: str, rng: torch.Generator, one_hot: bool = False) -> torch.Tensor:
    """(B, C) softmax probabilities or per-class sigmoid probabilities; near one-hot (p_max = 1 - 1e-6) on request."""
    if one_hot:
        p = torch.full((B, C), 1e-6 / max(1, C - 1))
        p[torch.arange(B), torch.randint(0, C, (B,), generator=rng)] = 1 - 1e-6
        return p
    z = 2 * torch.randn(B, C, generator=rng)
    return torch.softmax(z, dim=-1) if head == "softmax" else torch.sigmoid(z)


def jacobian(B: int, C: int, D: int, dtype: torch.dtype, rng: torch.Generator) -> torch.Tensor:
    """(B, C, D) Jacobian-like input with a shared component across classes (what centring removes)."""
    shared = torch.randn(B, 1, D, generator=rng)
    return (shared + 0.5 * torch.randn(B, C, D, generator=rng)).to(dtype)


def topk_counts_bruteforce(
    a: torch.Tensor, b: torch.Tensor, fractions: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Intersections and unions (N, T) by numpy lexsort: value descending, then flat index ascending."""
    A = a.reshape(a.shape[0], -1).double().numpy()
    Bm = b.reshape(b.shape[0], -1).double().numpy()
    N, P = A.shape
    idx = np.arange(P)
    inter = np.zeros((N, len(fractions)), dtype=np.int64)
    union = np.zeros_like(inter)
    for n in range(N):
        # lexsort sorts by the last key first: -value ascending, ties by index ascending.
        order_a = np.lexsort((idx, -A[n]))
        order_b = np.lexsort((idx, -Bm[n]))
        for t, f in enumerate(fractions):
            k = topk_count(P, f)
            ma = np.zeros(P, dtype=bool)
            mb = np.zeros(P, dtype=bool)
            ma[order_a[:k]] = True
            mb[order_b[:k]] = True
            inter[n, t] = (ma & mb).sum()
            union[n, t] = (ma | mb).sum()
    return inter, union


def kernels_module(name: str):
    """A kernel module of drift_kernels (imported here, after the interpreter has been switched on)."""
    import importlib

    return importlib.import_module(f"{drift_kernels.__name__}.{name}")
