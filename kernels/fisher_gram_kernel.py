"""Fused Gram matrix of the input-Fisher factor: K = G G^T and G x, G formed on the fly, one pass over J.

Maths (reference: :func:`drift_kernels.reference.fisher_gram_reference`). For one sample, J (C, D) is the
Jacobian of the logits with respect to the input and p (C,) the predicted probabilities. The Fisher factor is

    softmax:  G_c = sqrt(p_c) * (J_c - m),   m = sum_j p_j J_j        (row c is sqrt(p_c) grad_x log p_c)
    sigmoid:  G_c = sqrt(p_c (1 - p_c)) * J_c

and the kernel returns K = G G^T (C, C) and, optionally, G x (C,). Since m is a per-column (per-d) quantity, G
can be formed tile by tile along D: each tile of J is centred before the product, which avoids the cancellation
of the expanded form J (diag(p) - p p^T) J^T when p is nearly one-hot.

Work split: the grid is (row blocks of K, splits of D, B). Each program walks its contiguous range of D in
tiles of BLOCK_D, accumulates its row block of G G^T with ``tl.dot`` (C padded with masked rows to at least
16, tl.dot's smallest tile) and writes a partial sum to a workspace (S, B, C, C). A second kernel adds the S
partials in a fixed order and symmetrises, so the result is bitwise reproducible run to run (no atomics).
J is read once (row blocks of a sample share their tiles through L2 when C > 128).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import MAX_CLASSES, cdiv, interpreting, launch_device, next_pow2, sm_count
from ._validate import check_fisher_inputs, check_kernel_fisher

#: Precision of the fp32 ``tl.dot`` on a GPU. Plain TF32 (10-bit mantissa) gives ~1e-3 relative error, far
#: beyond the fp32 reference; tf32x3 (hi/lo split, three products) is within fp32 accuracy at tensor-core speed.
GPU_PRECISION = "tf32x3"

#: Under the interpreter a tile's product is one numpy matmul, which sums its whole length in order; the tile is
#: cut into this many pieces, multiplied as one batch and summed after, which keeps the fp32 error near the
#: reference's at the cost of one batched matmul (a GPU tile is summed by the tensor cores in steps of 8).
INTERPRETER_PIECES = 8

#: Programs launched per streaming multiprocessor when choosing the split of D (enough to hide memory latency).
PROGRAMS_PER_SM = 4


@triton.jit
def _fisher_gram_partial_kernel(
    J,
    P,
    X,
    KP,
    GXP,
    C,
    D,
    tiles_per_split,
    stride_jb,
    stride_jc,
    stride_xb,
    SOFTMAX: tl.constexpr,
    HAS_X: tl.constexpr,
    C_PAD: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SUB: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Partial K[s, b, I, :] = G[I, Ds] G[:, Ds]^T and G[I, Ds] x[Ds] over the D range Ds of split s.

    J (B, C, D) with stride 1 along D; P (B, C) float32 contiguous; X (B, D) stride 1 along D;
    KP (S, B, C, C) and GXP (S, B, C) float32 contiguous workspaces.
    """
    pid_i = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_batch = tl.num_programs(2)

    rows = tl.arange(0, C_PAD)
    row_ok = rows < C
    # G is formed in float64 and rounded once to float32: with p nearly one-hot, J_c - m cancels to ~1e-6 of J,
    # and a float32 centre would leave only a few correct bits in that row.
    p = tl.load(P + b * C + rows, mask=row_ok, other=0.0).to(tl.float64)
    if SOFTMAX:
        scale = tl.sqrt(p)
    else:
        scale = tl.sqrt(tl.maximum(p * (1.0 - p), 0.0))

    ri = pid_i * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ri_ok = ri < C
    p_i = tl.load(P + b * C + ri, mask=ri_ok, other=0.0).to(tl.float64)
    if SOFTMAX:
        scale_i = tl.sqrt(p_i)
    else:
        scale_i = tl.sqrt(tl.maximum(p_i * (1.0 - p_i), 0.0))

    j_base = J + b * stride_jb
    acc = tl.zeros((BLOCK_CI, C_PAD), dtype=tl.float32)
    gx = tl.zeros((BLOCK_CI,), dtype=tl.float32)
    d0 = s.to(tl.int64) * tiles_per_split * BLOCK_D
    for t in range(0, tiles_per_split):
        cols = d0 + t * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        j = tl.load(
            j_base + rows[:, None] * stride_jc + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
        ).to(tl.float64)
        # Centre the tile before any product: the cancellation happens here, once per element, not in K.
        if SOFTMAX:
            centre = tl.sum(p[:, None] * j, axis=0)
        else:
            centre = tl.zeros((BLOCK_D,), dtype=tl.float64)
        g = (scale[:, None] * (j - centre[None, :])).to(tl.float32)
        if BLOCK_CI == C_PAD:
            g_i = g
        else:
            # C > 128: this program owns rows I of K; the full tile (for the centre and the columns of K) and
            # its own rows are both read, the second time from cache.
            j_i = tl.load(
                j_base + ri[:, None] * stride_jc + cols[None, :], mask=ri_ok[:, None] & col_ok[None, :], other=0.0
            ).to(tl.float64)
            g_i = (scale_i[:, None] * (j_i - centre[None, :])).to(tl.float32)
        # A fresh accumulator per tile (or per SUB-long piece of it), added to the running sum: the rounding
        # error grows with the piece length plus the number of pieces, not with the whole range of D. (A compiler
        # may fold the add into the product's accumulator; that costs accuracy, never correctness.)
        if SUB == BLOCK_D:
            acc += tl.dot(g_i, tl.trans(g), input_precision=PRECISION)
        else:
            g_i3 = tl.permute(tl.reshape(g_i, (BLOCK_CI, BLOCK_D // SUB, SUB)), (1, 0, 2))
            g_3 = tl.permute(tl.reshape(g, (C_PAD, BLOCK_D // SUB, SUB)), (1, 2, 0))
            acc += tl.sum(tl.dot(g_i3, g_3, input_precision=PRECISION), axis=0)
        if HAS_X:
            xv = tl.load(X + b * stride_xb + cols, mask=col_ok, other=0.0).to(tl.float32)
            gx += tl.sum(g_i * xv[None, :], axis=1)

    part = s.to(tl.int64) * n_batch + b
    kp = KP + part * C * C + ri[:, None] * C + rows[None, :]
    tl.store(kp, acc, mask=ri_ok[:, None] & row_ok[None, :])
    if HAS_X:
        tl.store(GXP + part * C + ri, gx, mask=ri_ok)


@triton.jit
def _fisher_gram_reduce_kernel(
    KP,
    GXP,
    K,
    GX,
    n_split,
    B,
    C,
    HAS_X: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """K[b] = sym(sum_s KP[s, b]) with sym(A) = (A + A^T) / 2, and GX[b] = sum_s GXP[s, b], s in ascending order."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    ok = idx < C * C
    row = idx // C
    col = idx - row * C
    idx_t = col * C + row
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_t = tl.zeros((BLOCK,), dtype=tl.float32)
    g_ok = idx < C
    gx = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, n_split):
        part = s * B + b
        acc += tl.load(KP + part * C * C + idx, mask=ok, other=0.0)
        acc_t += tl.load(KP + part * C * C + idx_t, mask=ok, other=0.0)
        if HAS_X:
            gx += tl.load(GXP + part * C + idx, mask=g_ok & (pid == 0), other=0.0)
    # (a + b) / 2 is the same float for (i, j) and (j, i): K comes out exactly symmetric.
    tl.store(K + b * C * C + idx, (acc + acc_t) * 0.5, mask=ok)
    if HAS_X:
        tl.store(GX + b * C + idx, gx, mask=g_ok & (pid == 0))


def _config(C: int, D: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(C_PAD, BLOCK_CI, BLOCK_D, num_warps) for C classes and D input dimensions.

    GPU: the accumulator BLOCK_CI x C_PAD is at most 16384 values (64 registers a thread with 8 warps); rows of
    at least 32 contiguous values keep the loads coalesced.
    Interpreter: few, large tiles, because every tile costs a round of numpy calls.
    """
    c_pad = max(16, next_pow2(C))
    block_ci = min(c_pad, 64) if c_pad > 128 else c_pad
    if not on_gpu:
        block_d = max(16, min(next_pow2(D), (1 << 18) // c_pad))
        return c_pad, block_ci, block_d, 4
    # Every GPU tile is 8192 values (16 x 512 ... 256 x 32): 32 registers a thread with 8 warps, and 10-25 KB
    # of useful loads in flight per program for C = 5 ... 100 in float32.
    block_d = max(32, 8192 // c_pad)
    return c_pad, block_ci, block_d, 8


def _split(B: int, n_row_blocks: int, n_tiles: int, device: torch.device) -> int:
    """Tiles per split of D: enough programs for every SM, each a contiguous run of whole tiles."""
    if device.type != "cuda":
        return n_tiles
    target = PROGRAMS_PER_SM * sm_count(device)
    n_split = max(1, min(n_tiles, cdiv(target, B * n_row_blocks)))
    return cdiv(n_tiles, n_split)


_TUNED = None


def _tuned_kernel():
    """The partial kernel under ``triton.autotune`` over num_warps and num_stages (one config when interpreting).

    Tuning changes the order of the in-tile reductions, so results are bitwise reproducible only within a
    process (after the first call has fixed the configuration); the default, untuned path is reproducible always.
    """
    global _TUNED
    if _TUNED is None:
        configs = [triton.Config({}, num_warps=w, num_stages=st) for w in (4, 8) for st in (2, 3, 4)]
        if interpreting():
            configs = configs[:1]
        _TUNED = triton.autotune(configs=configs, key=["C", "D", "tiles_per_split"])(_fisher_gram_partial_kernel)
    return _TUNED


def _launch(
    J: torch.Tensor,
    p: torch.Tensor,
    x: torch.Tensor | None,
    head: str,
    out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    block_d: int | None = None,
    tiles_per_split: int | None = None,
    precision: str | None = None,
    autotune: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch on validated inputs (see :func:`fisher_gram_triton`)."""
    if J.stride(2) != 1:
        J = J.contiguous()
    B, C, D = J.shape
    if B > 65535:
        raise ValueError(f"the Triton kernel takes at most 65535 samples per call (a grid axis), got B = {B}")
    device = J.device
    on_gpu = device.type == "cuda" and not interpreting()
    c_pad, block_ci, cfg_block_d, num_warps = _config(C, D, on_gpu)
    block_d = cfg_block_d if block_d is None else block_d
    if block_d < 16 or block_d & (block_d - 1):
        raise ValueError(f"block_d must be a power of two >= 16, got {block_d}")
    n_row_blocks = cdiv(C, block_ci)
    n_tiles = cdiv(D, block_d)
    if tiles_per_split is None:
        tiles_per_split = _split(B, n_row_blocks, n_tiles, device)
    if tiles_per_split < 1:
        raise ValueError(f"tiles_per_split must be >= 1, got {tiles_per_split}")
    n_split = cdiv(n_tiles, tiles_per_split)
    if precision is None:
        precision = GPU_PRECISION if on_gpu else "ieee"

    p32 = p.to(torch.float32).contiguous()
    if x is not None and (x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.stride(1) != 1):
        x = x.to(torch.float32).contiguous()
    if out is None:
        K = _common.alloc((B, C, C), torch.float32, device)
        Gx = _common.alloc((B, C), torch.float32, device) if x is not None else None
    else:
        K, Gx = out
        _check_out("out[0] (K)", K, (B, C, C), device)
        if x is not None:
            _check_out("out[1] (Gx)", Gx, (B, C), device)
    kp = _common.alloc((n_split, B, C, C), torch.float32, device)
    gxp = _common.alloc((n_split, B, C), torch.float32, device) if x is not None else kp
    x_arg = x if x is not None else p32

    with launch_device(J):
        grid = (n_row_blocks, n_split, B)
        args = (J, p32, x_arg, kp, gxp, C, D, tiles_per_split, J.stride(0), J.stride(1), x_arg.stride(0))
        meta = dict(
            SOFTMAX=head == "softmax",
            HAS_X=x is not None,
            C_PAD=c_pad,
            BLOCK_CI=block_ci,
            BLOCK_D=block_d,
            SUB=block_d if on_gpu else max(16, block_d // INTERPRETER_PIECES),
            PRECISION=precision,
        )
        if autotune:
            _tuned_kernel()[grid](*args, **meta)
        else:
            _fisher_gram_partial_kernel[grid](*args, **meta, num_warps=num_warps)
        red_block = min(1024, max(16, next_pow2(C * C))) if on_gpu else max(16, next_pow2(C * C))
        gx_out = Gx if x is not None else K
        _fisher_gram_reduce_kernel[(cdiv(C * C, red_block), B)](
            kp, gxp, K, gx_out, n_split, B, C, HAS_X=x is not None, BLOCK=red_block, num_warps=4
        )
    return K, (Gx if x is not None else None)


def _check_out(name: str, t: torch.Tensor | None, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a float32 tensor of shape {shape}, got {type(t).__name__}")
    if tuple(t.shape) != shape or t.dtype != torch.float32 or t.device != device or not t.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous float32 tensor of shape {shape} on {device}, "
            f"got {t.dtype} {tuple(t.shape)} on {t.device}"
        )


def fisher_gram_triton(
    J: torch.Tensor,
    p: torch.Tensor,
    x: torch.Tensor | None = None,
    head: str = "softmax",
    *,
    out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    block_d: int | None = None,
    tiles_per_split: int | None = None,
    precision: str | None = None,
    autotune: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """K = G G^T (B, C, C) and G x (B, C) of the Fisher factor G, by the Triton kernel (see the module docstring).

    Args:
        J: (B, C, D) float32, float16 or bfloat16 input Jacobian of the logits; C <= 256. A J whose D stride is
            not 1 is copied to a contiguous tensor first.
        p: (B, C) probabilities in [0, 1] (softmax, or per-class sigmoid).
        x: optional (B, D) vector projected onto the rows of G.
        head: 'softmax' or 'sigmoid'.
        out: optional preallocated (K, Gx) float32 contiguous outputs (Gx may be None when x is None).
        block_d: tile length along D (power of two >= 16); default from the number of classes.
        tiles_per_split: tiles of D per program; default spreads the work over every SM (one split on CPU).
        precision: ``tl.dot`` input precision ('ieee', 'tf32x3', 'tf32'); default 'tf32x3' on a GPU, 'ieee'
            under the interpreter.
        autotune: pick num_warps / num_stages with ``triton.autotune`` (reproducible only within a process).

    Returns:
        K (B, C, C) float32, exactly symmetric, and G x (B, C) float32, or None when x is None.
    """
    check_fisher_inputs(J, p, head, x=x)
    check_kernel_fisher(J, MAX_CLASSES)
    return _launch(J, p, x, head, out, block_d, tiles_per_split, precision, autotune)
