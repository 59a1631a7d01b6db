"""Projection through the input-Fisher factor: Y = G^T W (B, D, m) for a small W (B, C, m), G formed on the fly.

Maths (reference: :func:`drift_kernels.reference.fisher_project_reference`). With G the Fisher factor of
:mod:`drift_kernels.fisher_gram_kernel` (softmax: G_c = sqrt(p_c) (J_c - sum_j p_j J_j); sigmoid:
G_c = sqrt(p_c (1 - p_c)) J_c), the kernel returns

    Y[b, d, k] = sum_c G[b, c, d] W[b, c, k].

With K = G G^T = U diag(lambda) U^T, W = U diag(lambda)^-1/2 gives the orthonormal eigenvectors
V = G^T U diag(lambda)^-1/2 of the Fisher matrix F = G^T G; a W of one column gives one projection.

Work split: one program per (tile of BLOCK_D columns, sample). It reads its tile of J, centres it, and writes
its rows of Y; nothing is shared between programs, so the result is reproducible without any reduction.

* m <= 16 (the study's m = 4): the sum over c is a broadcast multiply and a reduction per output column (no
  padding of C to tl.dot's 16), G centred in float64 and rounded once to float32.
* m > 16: ``tl.dot`` over blocks of BLOCK_C classes, per block of 32 or 64 columns of W, with the treatment of
  :mod:`drift_kernels.fisher_gram_kernel`: G centred in float32 on the most probable class a,

      J_c - mu = (J_c - J_a) - r,   mu = sum_j p_j J_j,   r = sum_j p_j (J_j - J_a) - delta J_a,

  with delta = 1 - sum_j p_j; the row scales, a and delta are computed by the launcher in float64 and rounded
  once (no float64 tile). A program reads its J tile block by block, once for r (softmax) and once per block of
  W's columns (from cache). The (BLOCK_D, M_PAD) accumulator and a (BLOCK_C, BLOCK_D) block of G are all a
  program holds, whatever C, so no launch spills or needs more than the 99 KB of shared memory of sm_86 / sm_89
  (docs/kernels-compile.md).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _common
from ._common import MAX_CLASSES, cdiv, interpreting, launch_device, next_pow2
from ._validate import check_fisher_inputs, check_kernel_fisher
from .fisher_gram_kernel import _row_constants

#: Precision of the fp32 ``tl.dot`` on a GPU (the m > 16 path); as in ``fisher_gram_kernel.GPU_PRECISION``.
GPU_PRECISION = "tf32x3"

#: Largest m served by the broadcast-and-reduce path; beyond it, tl.dot.
SMALL_M = 16

#: ``tl.dot`` path on a GPU: classes a block, columns of J a tile, warps a program.
DOT_BLOCK_C = 16
DOT_BLOCK_D = 32
DOT_WARPS = 4


@triton.jit
def _fisher_project_kernel(
    J,
    P,
    W,
    Y,
    C,
    D,
    M,
    stride_jb,
    stride_jc,
    SOFTMAX: tl.constexpr,
    C_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    M_PAD: tl.constexpr,
):
    """Y[b, Dt, :] = G[b, :, Dt]^T W[b] for the column tile Dt of this program (m <= 16).

    J (B, C, D) with stride 1 along D; P (B, C), W (B, C, M) and Y (B, D, M) float32 contiguous; M_PAD >= M.
    G[c, d] = sqrt(p_c) (J[c, d] - sum_j p_j J[j, d]) (softmax) or sqrt(p_c (1 - p_c)) J[c, d] (sigmoid), in
    float64, rounded once to float32; Y[d, k] = sum_c G[c, d] W[c, k] by a broadcast product and a sum over c.
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)

    rows = tl.arange(0, C_PAD)
    row_ok = rows < C
    # G in float64, rounded once to float32 (see fisher_gram_kernel: the centre cancels when p is nearly one-hot).
    p = tl.load(P + b * C + rows, mask=row_ok, other=0.0).to(tl.float64)
    if SOFTMAX:
        scale = tl.sqrt(p)
    else:
        scale = tl.sqrt(tl.maximum(p * (1.0 - p), 0.0))

    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    j = tl.load(
        J + b * stride_jb + rows[:, None] * stride_jc + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
    ).to(tl.float64)
    if SOFTMAX:
        centre = tl.sum(p[:, None] * j, axis=0)
    else:
        centre = tl.zeros((BLOCK_D,), dtype=tl.float64)
    g = (scale[:, None] * (j - centre[None, :])).to(tl.float32)

    ks = tl.arange(0, M_PAD)
    w_base = W + b * C * M
    y_base = Y + b * D * M
    y = tl.zeros((BLOCK_D, M_PAD), dtype=tl.float32)
    for k in tl.static_range(M_PAD):
        w_k = tl.load(w_base + rows * M + k, mask=row_ok & (k < M), other=0.0)
        y_k = tl.sum(g * w_k[:, None], axis=0)
        y = tl.where(ks[None, :] == k, y_k[:, None], y)
    tl.store(y_base + cols[:, None] * M + ks[None, :], y, mask=col_ok[:, None] & (ks < M)[None, :])


@triton.jit
def _fisher_project_dot_kernel(
    J,
    P,
    S,
    CENTRE,
    DELTA,
    W,
    Y,
    C,
    D,
    M,
    stride_jb,
    stride_jc,
    SOFTMAX: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
    M_PAD: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Y[b, Dt, :] = G[b, :, Dt]^T W[b] for the column tile Dt of this program (m > 16), by ``tl.dot``.

    G[c, d] = scale_c ((J[c, d] - J[a, d]) - r[d]), r = sum_j p_j (J[j, d] - J[a, d]) - delta J[a, d] (softmax)
    or scale_c J[c, d] (sigmoid), in float32; Y[d, k0:k0 + M_PAD] = sum over class blocks c0 of
    G[c0:c0 + BLOCK_C, d]^T W[c0:c0 + BLOCK_C, k0:k0 + M_PAD], accumulated by ``tl.dot``.

    J (B, C, D) with stride 1 along D; P and the scales S (B, C) float32; CENTRE (B,) int32 the class a and
    DELTA (B,) float32 (softmax only); W (B, C, M) and Y (B, D, M) float32 contiguous.
    """
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    cols = pid_d.to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    j_base = J + b * stride_jb
    cr = tl.arange(0, BLOCK_C)
    if SOFTMAX:
        a = tl.load(CENTRE + b)
        delta = tl.load(DELTA + b)
        j_a = tl.load(j_base + a * stride_jc + cols, mask=col_ok, other=0.0).to(tl.float32)
        r = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            rows = c0 + cr
            row_ok = rows < C
            p = tl.load(P + b * C + rows, mask=row_ok, other=0.0)
            j = tl.load(
                j_base + rows[:, None] * stride_jc + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
            ).to(tl.float32)
            r += tl.sum(p[:, None] * (j - j_a[None, :]), axis=0)
        r = r - delta * j_a

    ks = tl.arange(0, M_PAD)
    for m0 in range(0, M, M_PAD):
        k_ok = (m0 + ks) < M
        y = tl.zeros((BLOCK_D, M_PAD), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            rows = c0 + cr
            row_ok = rows < C
            scale = tl.load(S + b * C + rows, mask=row_ok, other=0.0)
            j = tl.load(
                j_base + rows[:, None] * stride_jc + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
            ).to(tl.float32)
            if SOFTMAX:
                g = scale[:, None] * ((j - j_a[None, :]) - r[None, :])
            else:
                g = scale[:, None] * j
            w = tl.load(
                W + b * C * M + rows[:, None] * M + (m0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
            )
            y = tl.dot(tl.trans(g), w, y, input_precision=PRECISION)
        tl.store(Y + b * D * M + cols[:, None] * M + (m0 + ks)[None, :], y, mask=col_ok[:, None] & k_ok[None, :])


class _Config(NamedTuple):
    """Launch meta-parameters: classes padded (broadcast path) or a block of classes (``tl.dot`` path)."""

    c_pad: int
    block_c: int
    block_d: int
    m_pad: int
    use_dot: bool
    num_warps: int


def _config(C: int, D: int, m: int, on_gpu: bool) -> _Config:
    """Meta-parameters for C classes, D columns and m columns of W.

    m <= 16, GPU: a J tile (float64) of at most 4096 values and an output tile (BLOCK_D, M_PAD) of at most 2048,
    8 warps from a J tile of 2048 values, so registers stay below ~100 a thread. Larger tiles (8192 J values,
    4096 outputs, the earlier rule) spilled up to 100 B a thread at odd D (rows of J not 16-byte aligned, so no
    vector loads: InceptionV3's D = 3 x 299 x 299) for C = 14 with m = 13 and m = 4 on sm_80 / sm_89 / sm_90a
    under triton 3.6 or 3.8; the compile check covers those shapes. m > 16, GPU: classes in blocks of
    BLOCK_C <= 32, columns of W in blocks of 32 or 64, a (BLOCK_D, M_PAD) accumulator of at most 32 values a
    thread. Interpreter: large tiles and all classes in one
    block, because every tile costs a round of numpy calls.
    """
    if m <= SMALL_M:
        c_pad = max(2, next_pow2(C))
        m_pad = max(2, next_pow2(m))
        if not on_gpu:
            block_d = max(16, min(next_pow2(D), (1 << 18) // c_pad, (1 << 18) // m_pad))
            return _Config(c_pad, c_pad, block_d, m_pad, False, 4)
        block_d = max(16, min(1024, 4096 // c_pad, 2048 // m_pad))
        return _Config(c_pad, c_pad, block_d, m_pad, False, 8 if c_pad * block_d >= 2048 else 4)
    c_pad = max(16, next_pow2(C))
    m_pad = min(64, next_pow2(m))
    if not on_gpu:
        block_d = max(16, min(next_pow2(D), (1 << 18) // c_pad, (1 << 18) // m_pad))
        return _Config(c_pad, c_pad, block_d, m_pad, True, 4)
    return _Config(c_pad, min(c_pad, DOT_BLOCK_C), DOT_BLOCK_D, m_pad, True, DOT_WARPS)


def _launch(
    J: torch.Tensor,
    p: torch.Tensor,
    W: torch.Tensor,
    head: str,
    out: torch.Tensor | None = None,
    block_d: int | None = None,
    precision: str | None = None,
) -> torch.Tensor:
    """Launch on validated inputs (see :func:`fisher_project_triton`)."""
    if J.stride(2) != 1:
        J = J.contiguous()
    B, C, D = J.shape
    m = W.shape[2]
    device = J.device
    on_gpu = device.type == "cuda" and not interpreting()
    cfg = _config(C, D, m, on_gpu)
    block_d = cfg.block_d if block_d is None else block_d
    if block_d < 16 or block_d & (block_d - 1):
        raise ValueError(f"block_d must be a power of two >= 16, got {block_d}")
    if precision is None:
        precision = GPU_PRECISION if on_gpu else "ieee"
    p32 = p.to(torch.float32).contiguous()
    w32 = W.to(torch.float32).contiguous()
    if out is None:
        out = _common.alloc((B, D, m), torch.float32, device)
    elif not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a float32 tensor of shape {(B, D, m)}, got {type(out).__name__}")
    elif tuple(out.shape) != (B, D, m) or out.dtype != torch.float32 or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous float32 tensor of shape {(B, D, m)} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    grid = (cdiv(D, block_d), B)
    softmax = head == "softmax"
    with launch_device(J):
        if cfg.use_dot:
            scale, centre, delta = _row_constants(p32, head)
            _fisher_project_dot_kernel[grid](
                J, p32, scale, centre, delta, w32, out, C, D, m, J.stride(0), J.stride(1),
                SOFTMAX=softmax, BLOCK_C=cfg.block_c, BLOCK_D=block_d, M_PAD=cfg.m_pad, PRECISION=precision,
                num_warps=cfg.num_warps,
            )  # fmt: skip
        else:
            _fisher_project_kernel[grid](
                J, p32, w32, out, C, D, m, J.stride(0), J.stride(1),
                SOFTMAX=softmax, C_PAD=cfg.c_pad, BLOCK_D=block_d, M_PAD=cfg.m_pad, num_warps=cfg.num_warps,
            )  # fmt: skip
    return out


def fisher_project_triton(
    J: torch.Tensor,
    p: torch.Tensor,
    W: torch.Tensor,
    head: str = "softmax",
    *,
    out: torch.Tensor | None = None,
    block_d: int | None = None,
    precision: str | None = None,
) -> torch.Tensor:
    """Y = G^T W (B, D, m) float32 of the Fisher factor G, by the Triton kernel (see the module docstring).

    Args:
        J: (B, C, D) float32, float16 or bfloat16 input Jacobian of the logits; C <= 256.
        p: (B, C) probabilities in [0, 1].
        W: (B, C, m) weights, any floating dtype (used in float32).
        head: 'softmax' or 'sigmoid'.
        out: optional preallocated contiguous float32 (B, D, m) output.
        block_d: tile length along D (power of two >= 16); default from C and m.
        precision: ``tl.dot`` input precision for m > 16; default 'tf32x3' on a GPU, 'ieee' when interpreted.

    Returns:
        Y (B, D, m) float32.
    """
    check_fisher_inputs(J, p, head, W=W)
    check_kernel_fisher(J, MAX_CLASSES)
    return _launch(J, p, W, head, out, block_d, precision)
