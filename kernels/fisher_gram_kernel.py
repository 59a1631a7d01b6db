"""Fused Gram matrix of the input-Fisher factor: K = G G^T and G x, G formed on the fly, one pass over J.

Maths (reference: :func:`drift_kernels.reference.fisher_gram_reference`). For one sample, J (C, D) is the
Jacobian of the logits with respect to the input and p (C,) the predicted probabilities. The Fisher factor is

    softmax:  G_c = sqrt(p_c) * (J_c - m),   m = sum_j p_j J_j        (row c is sqrt(p_c) grad_x log p_c)
    sigmoid:  G_c = sqrt(p_c (1 - p_c)) * J_c

and the kernel returns K = G G^T (C, C) and, optionally, G x (C,). Since m is a per-column (per-d) quantity, G
is formed tile by tile along D, each tile centred before any product, which avoids the cancellation of the
expanded form J (diag(p) - p p^T) J^T when p is nearly one-hot.

Centring in float32 on the most probable class a = argmax p. With delta = 1 - sum_j p_j (a, delta and the row
scales are computed by the launcher in float64 from the float32 p and rounded once; the kernel has no float64),

    J_c - m = (J_c - J_a) - r,   r = sum_j p_j (J_j - J_a) - delta J_a,

an identity for any p. Every term is O(|J_c - J_a|) or O((1 - p_a) |J|): nothing cancels against |J| itself, so
float32 gives each G_c to a few ulps of its own size even for p_a = 1 - 1e-6, where the direct float32
J_c - m keeps only a few correct bits of G_a (the torch reference's float32 error).

Error rule (what the tests assert, and why the arithmetic is IEEE fp32 throughout): the kernel's error against a
float64 evaluation must be at most twice the error of the torch reference evaluated in float32 on the same
inputs (plus 4 float32 ulps of max |K| for tiny problems). The kernel therefore has to be at least about as
accurate as an fp32 GEMM whatever the inputs, on every run. It uses IEEE fp32 products (FMA, one rounding per
product-add) and keeps the sequential part of every sum short: per program at most ``tiles_per_split`` terms
per accumulator lane (C <= 16) or INNER_TILES * BLOCK_D FMAs before a fresh accumulator (C > 16), then a tree
over the lanes and an ordered sum of the split partials; an fp32 GEMM over D chains up to D terms. TF32
(10-bit mantissa, ~1e-3 relative error a product) misses the rule by orders of magnitude; tf32x3 (hi/lo split)
drops the lo*lo product and accumulates in the tensor cores, which align with truncation rather than IEEE
round-to-nearest, so no bound ties it to the reference's error: it stays selectable with ``precision=`` for
C > 16, at the caller's risk, and is not the default.

Work split: the grid is (row blocks of K, splits of D, B); each program walks its contiguous range of D in tiles
of BLOCK_D and writes a partial (rows I of) G G^T to a workspace (S, B, C, C). A second kernel adds the S
partials in a fixed order and symmetrises, so the result is bitwise reproducible run to run (no atomics).

* C <= 16 (the study's classes; C padded to C_PAD <= 16): broadcast-and-FMA, no ``tl.dot``. Each program keeps
  a (C_PAD, C_PAD, BLOCK_D) accumulator, adds g[:, None, :] * g[None, :, :] per tile (independent lanes, no
  reduction in the loop) and reduces over the BLOCK_D lanes once at the end. Each thread owns one column of the
  tile and all C_PAD^2 products of it, so no product is computed twice (a 16 x 16 ``tl.dot`` tile, the smallest
  there is, is replicated in every warp) and no tensor core is involved; the accumulator is at most 32 fp32
  registers a thread (BLOCK_D = 32 * 32 * num_warps / C_PAD^2).
  The tile loop is one flat ``tl.range(..., num_stages=2)`` loop, which triton (3.6 and 3.8) software-pipelines:
  the loads of the next tiles go to shared memory by cp.async while the current one is multiplied, so the
  memory-bound reduction keeps loads in flight; the grid is one wave of the programs an SM holds.
* C > 16: IEEE ``tl.dot`` (FMA) of the row block g_I (BLOCK_CI, BLOCK_D) with g^T (BLOCK_D, C_PAD), an output tile
  of at least 32 x 32 so that every thread owns distinct outputs; beyond C = 64 rows of K are split in blocks
  (a program then reads its own rows of J a second time, from cache). Compute-bound for C >= 100 (C_PAD^2 FMAs
  a column); the study's C <= 16 stays bandwidth-bound.

Resources (``python -m drift_kernels.compile_check``; table in docs/kernels-compile.md): for the launches the
dispatch layer makes, no register spills and at most ~32 KB of shared memory a program on sm_80, sm_89 and
sm_90a, which leaves every launch within the 99 KB of sm_86 / sm_89.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _common
from ._common import MAX_CLASSES, cdiv, interpreting, next_pow2
from ._validate import check_fisher_inputs, check_kernel_fisher

#: Largest padded class count served by the broadcast-and-FMA path; beyond it, ``tl.dot``.
SMALL_C = 16

#: fp32 accumulator registers a thread on the broadcast path (sets BLOCK_D from C_PAD and num_warps); 64 leaves
#: ptxas too little room on some targets (it settles on 128 registers a thread and spills).
ACC_PER_THREAD = 32

#: Input precision of the ``tl.dot`` path (C > 16) on a GPU: exact fp32 products (see the module docstring).
GPU_PRECISION = "ieee"

#: ``tl.dot`` path: tiles summed into one fresh accumulator before it is added to the running sum, which bounds
#: every sequential FMA chain to INNER_TILES * BLOCK_D terms (``tl.dot`` would otherwise chain the whole split).
INNER_TILES = 16

#: Under the interpreter a tile's product is one numpy matmul, which sums its whole length in order; the tile is
#: cut into this many pieces, multiplied as one batch and summed after, which keeps the fp32 error near the
#: reference's at the cost of one batched matmul (``tl.dot`` path only).
INTERPRETER_PIECES = 8

#: Pipeline stages of the broadcast path's tile loop (tiles in flight: the current one and the next). Three
#: stages left ptxas 64 registers and 12 B of spills a thread for C = 5 float16 on sm_80 under triton 3.8.
BROADCAST_STAGES = 2

#: Programs a streaming multiprocessor holds at once on the broadcast path (C_PAD <= 16, 8 warps): ptxas gives
#: the partial kernel 64 to 95 registers a thread (triton 3.6 and 3.8, sm_80 / sm_89 / sm_90a; 80 for the
#: study's float32, 95 for float16 with the sigmoid head and x), so 65536 registers hold 2 programs of 256
#: threads in every case (3 in some). The split of D launches this many programs per SM: one wave, all of it
#: resident (the earlier grid assumed 4 where 3 fitted, leaving a mostly idle second wave). The compile check
#: asserts that every launch's occupancy is at least its ``programs_per_sm``.
PROGRAMS_PER_SM = 2


@triton.jit
def _factor_tile(j_base, a, delta, scale, p, rows, row_ok, cols, col_ok, stride_jc, SOFTMAX: tl.constexpr):
    """One tile of the factor: g (C_PAD, BLOCK_D) float32 for the columns cols, with J_a and r of the centring.

    softmax: g[c] = scale_c ((J_c - J_a) - r), r = sum_j p_j (J_j - J_a) - delta J_a (row a read again, from
    cache); sigmoid: g[c] = scale_c J_c (J_a and r are then zeros).
    """
    j = tl.load(
        j_base + rows[:, None] * stride_jc + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0
    ).to(tl.float32)
    if SOFTMAX:
        j_a = tl.load(j_base + a * stride_jc + cols, mask=col_ok, other=0.0).to(tl.float32)
        dj = j - j_a[None, :]
        r = tl.sum(p[:, None] * dj, axis=0) - delta * j_a
        g = scale[:, None] * (dj - r[None, :])
    else:
        j_a = tl.zeros_like(cols).to(tl.float32)
        r = j_a
        g = scale[:, None] * j
    return g, j_a, r


@triton.jit
def _fisher_gram_partial_kernel(
    J,
    P,
    S,
    CENTRE,
    DELTA,
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
    USE_DOT: tl.constexpr,
    C_PAD: tl.constexpr,
    BLOCK_CI: tl.constexpr,
    BLOCK_D: tl.constexpr,
    INNER: tl.constexpr,
    SUB: tl.constexpr,
    PRECISION: tl.constexpr,
    NUM_STAGES: tl.constexpr = 2,
):
    """Partial K[s, b, I, :] = G[I, Ds] G[:, Ds]^T and G[I, Ds] x[Ds] over the D range Ds of split s.

    G[c, d] = scale_c ((J[c, d] - J[a, d]) - r[d]) (softmax; see the module docstring) or scale_c J[c, d]
    (sigmoid), in float32. Without USE_DOT (C_PAD <= 16, one row block, BLOCK_CI == C_PAD): a
    (C_PAD, C_PAD, BLOCK_D) fp32 accumulator of g[i, d] g[j, d], reduced over d after the loop. With USE_DOT:
    part (BLOCK_CI, C_PAD) = sum of g_I g^T by ``tl.dot`` over INNER tiles (one FMA chain of at most
    INNER * BLOCK_D terms; SUB-long pieces under the interpreter), added to acc after every INNER tiles.

    J (B, C, D) with stride 1 along D; P (B, C) and the scales S (B, C) float32 contiguous; CENTRE (B,) int32
    the class a and DELTA (B,) float32 (softmax only); X (B, D) stride 1 along D; KP (S, B, C, C) and
    GXP (S, B, C) float32 contiguous workspaces.
    """
    pid_i = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n_batch = tl.num_programs(2)

    rows = tl.arange(0, C_PAD)
    row_ok = rows < C
    # Scales, a and delta come from the launcher (float64 there, rounded once): no float64 in the kernel.
    scale = tl.load(S + b * C + rows, mask=row_ok, other=0.0)
    p = tl.load(P + b * C + rows, mask=row_ok, other=0.0)
    if SOFTMAX:
        a = tl.load(CENTRE + b)
        delta = tl.load(DELTA + b)
    else:
        a = 0
        delta = 0.0

    ri = pid_i * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ri_ok = ri < C
    if BLOCK_CI != C_PAD:
        scale_i = tl.load(S + b * C + ri, mask=ri_ok, other=0.0)

    j_base = J + b * stride_jb
    if USE_DOT:
        acc = tl.zeros((BLOCK_CI, C_PAD), dtype=tl.float32)
        gx = tl.zeros((BLOCK_CI,), dtype=tl.float32)
    else:
        acc3 = tl.zeros((C_PAD, C_PAD, BLOCK_D), dtype=tl.float32)
        gx2 = tl.zeros((C_PAD, BLOCK_D), dtype=tl.float32)
    d0 = s.to(tl.int64) * tiles_per_split * BLOCK_D
    if USE_DOT:
        for t0 in range(0, tiles_per_split, INNER):
            part = tl.zeros((BLOCK_CI, C_PAD), dtype=tl.float32)
            for t in range(t0, tl.minimum(t0 + INNER, tiles_per_split)):
                cols = d0 + t * BLOCK_D + tl.arange(0, BLOCK_D)
                col_ok = cols < D
                g, j_a, r = _factor_tile(j_base, a, delta, scale, p, rows, row_ok, cols, col_ok, stride_jc, SOFTMAX)
                if BLOCK_CI == C_PAD:
                    g_i = g
                else:
                    j_i = tl.load(
                        j_base + ri[:, None] * stride_jc + cols[None, :],
                        mask=ri_ok[:, None] & col_ok[None, :],
                        other=0.0,
                    ).to(tl.float32)
                    if SOFTMAX:
                        g_i = scale_i[:, None] * ((j_i - j_a[None, :]) - r[None, :])
                    else:
                        g_i = scale_i[:, None] * j_i
                if SUB == BLOCK_D:
                    part = tl.dot(g_i, tl.trans(g), part, input_precision=PRECISION)
                else:
                    g_i3 = tl.permute(tl.reshape(g_i, (BLOCK_CI, BLOCK_D // SUB, SUB)), (1, 0, 2))
                    g_3 = tl.permute(tl.reshape(g, (C_PAD, BLOCK_D // SUB, SUB)), (1, 2, 0))
                    part += tl.sum(tl.dot(g_i3, g_3, input_precision=PRECISION), axis=0)
                if HAS_X:
                    xv = tl.load(X + b * stride_xb + cols, mask=col_ok, other=0.0).to(tl.float32)
                    gx += tl.sum(g_i * xv[None, :], axis=1)
            acc += part
    else:
        # One flat loop, software-pipelined: the loads of the next NUM_STAGES - 1 tiles are issued (cp.async
        # into shared memory) while this tile is multiplied; independent lanes, no reduction inside the loop.
        for t in tl.range(0, tiles_per_split, num_stages=NUM_STAGES):
            cols = d0 + t * BLOCK_D + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            g, _j_a, _r = _factor_tile(j_base, a, delta, scale, p, rows, row_ok, cols, col_ok, stride_jc, SOFTMAX)
            acc3 += g[:, None, :] * g[None, :, :]
            if HAS_X:
                xv = tl.load(X + b * stride_xb + cols, mask=col_ok, other=0.0).to(tl.float32)
                gx2 += g * xv[None, :]
        acc = tl.sum(acc3, axis=2)
        if HAS_X:
            gx = tl.sum(gx2, axis=1)

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


class _Config(NamedTuple):
    """Launch meta-parameters of the partial kernel."""

    c_pad: int
    block_ci: int
    block_d: int
    use_dot: bool
    num_warps: int
    num_stages: int = 3
    programs_per_sm: int = PROGRAMS_PER_SM


def _config(C: int, D: int, on_gpu: bool) -> _Config:
    """Meta-parameters for C classes and D input dimensions.

    GPU, C_PAD <= 16: 8 warps and BLOCK_D = ACC_PER_THREAD * 256 / C_PAD^2 (32 to 256), so that the broadcast
    accumulator is at most 32 registers a thread; the flat loop is pipelined over ``BROADCAST_STAGES`` = 2
    stages (cp.async prefetch of the next tile) and the grid is one wave of ``PROGRAMS_PER_SM`` = 2 programs
    an SM, which every compiled variant holds at once. GPU, C_PAD >= 32: an output tile
    BLOCK_CI x C_PAD of at most 32 values a thread (rows of K in blocks of 32 for C_PAD = 128 with 4 warps and
    for 256 with 8, one stage: with 2 or 3 stages, or blocks of 16 or 64, ptxas held 128 registers and spilled
    12 to 400 B a thread on some target, version or D), and short tiles (32 columns for C_PAD = 32, 16 beyond)
    because the FMA
    ``tl.dot`` keeps a BLOCK_D-long slice of both operands in registers; 16 is also the least K of an fp32
    ``tl.dot`` that triton 3.6 accepts (3.8 takes 8). Chosen with ``python -m drift_kernels.compile_check``
    under triton 3.6 and 3.8, at D = 3 x 224 x 224 and at the odd D = 3 x 299 x 299: at neighbouring settings
    ptxas spills a few bytes a thread on some target and version, here none.
    Interpreter: few, large tiles, because every tile costs a round of numpy calls.
    """
    use_dot = next_pow2(C) > SMALL_C
    c_pad = max(16, next_pow2(C)) if use_dot else max(2, next_pow2(C))
    if not use_dot:
        if not on_gpu:
            return _Config(c_pad, c_pad, max(16, min(next_pow2(D), (1 << 18) // (c_pad * c_pad))), False, 4)
        num_warps = 8
        block_d = max(32, min(256, ACC_PER_THREAD * 32 * num_warps // (c_pad * c_pad)))
        return _Config(c_pad, c_pad, block_d, False, num_warps, BROADCAST_STAGES)
    if not on_gpu:
        block_ci = min(c_pad, 64) if c_pad > 128 else c_pad
        return _Config(c_pad, block_ci, max(16, min(next_pow2(D), (1 << 18) // (block_ci * c_pad))), True, 4)
    block_ci, block_d, num_warps, stages = {32: (32, 32, 4, 3), 64: (64, 16, 4, 3), 128: (32, 16, 4, 1)}.get(
        c_pad, (32, 16, 8, 1)
    )
    # Up to 255 registers a thread: one program an SM assumed (two for C_PAD = 32, 4 warps).
    return _Config(c_pad, block_ci, block_d, True, num_warps, stages, 2 if c_pad == 32 else 1)


def _split(B: int, n_row_blocks: int, n_tiles: int, device: torch.device, programs_per_sm: int) -> int:
    """Tiles per split of D: one wave of programs_per_sm programs on every SM, each a contiguous run of tiles."""
    if device.type != "cuda":
        return n_tiles
    target = programs_per_sm * _common.sm_count(device)
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
    cfg = _config(C, D, on_gpu)
    if block_d is None:
        block_d = cfg.block_d
    elif block_d < 16 or block_d & (block_d - 1):
        raise ValueError(f"block_d must be a power of two >= 16, got {block_d}")
    n_row_blocks = cdiv(C, cfg.block_ci)
    n_tiles = cdiv(D, block_d)
    if tiles_per_split is None:
        tiles_per_split = _split(B, n_row_blocks, n_tiles, device, cfg.programs_per_sm)
    if tiles_per_split < 1:
        raise ValueError(f"tiles_per_split must be >= 1, got {tiles_per_split}")
    n_split = cdiv(n_tiles, tiles_per_split)
    if precision is None:
        precision = GPU_PRECISION if on_gpu else "ieee"

    p32 = p.to(torch.float32).contiguous()
    scale, centre, delta = _row_constants(p32, head)
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

    with _common.launch_device(J):
        grid = (n_row_blocks, n_split, B)
        args = (J, p32, scale, centre, delta, x_arg, kp, gxp, C, D, tiles_per_split)
        args += (J.stride(0), J.stride(1), x_arg.stride(0))
        meta = dict(
            SOFTMAX=head == "softmax",
            HAS_X=x is not None,
            USE_DOT=cfg.use_dot,
            C_PAD=cfg.c_pad,
            BLOCK_CI=cfg.block_ci,
            BLOCK_D=block_d,
            INNER=INNER_TILES,
            SUB=block_d if on_gpu or not cfg.use_dot else max(16, block_d // INTERPRETER_PIECES),
            PRECISION=precision,
            NUM_STAGES=cfg.num_stages,
        )
        if autotune:
            _tuned_kernel()[grid](*args, **meta)
        else:
            _fisher_gram_partial_kernel[grid](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        red_block = min(1024, max(16, next_pow2(C * C))) if on_gpu else max(16, next_pow2(C * C))
        gx_out = Gx if x is not None else K
        _fisher_gram_reduce_kernel[(cdiv(C * C, red_block), B)](
            kp, gxp, K, gx_out, n_split, B, C, HAS_X=x is not None, BLOCK=red_block, num_warps=4
        )
    return K, (Gx if x is not None else None)


def _row_constants(p: torch.Tensor, head: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample constants of the factor, in float64 and rounded once (B x C values, negligible next to J).

    Args:
        p: (B, C) float32 probabilities.
        head: 'softmax' or 'sigmoid'.

    Returns:
        scale (B, C) float32: sqrt(p) or sqrt(p (1 - p)); a (B,) int32 = argmax p, the centring class; and
        delta (B,) float32 = 1 - sum p (a and delta are used by the softmax head only).
    """
    p64 = p.to(torch.float64)
    if head == "softmax":
        scale = p64.sqrt()
    else:
        scale = (p64 * (1 - p64)).clamp_min(0).sqrt()
    centre = p.argmax(dim=1).to(torch.int32)
    delta = (1 - p64.sum(dim=1)).to(torch.float32)
    return scale.to(torch.float32).contiguous(), centre.contiguous(), delta.contiguous()


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
        precision: ``tl.dot`` input precision for C > 16 ('ieee', 'tf32x3', 'tf32'); default 'ieee', the only
            one that meets the error rule of the module docstring (C <= 16 never uses ``tl.dot``).
        autotune: pick num_warps / num_stages with ``triton.autotune`` (reproducible only within a process).

    Returns:
        K (B, C, C) float32, exactly symmetric, and G x (B, C) float32, or None when x is None.
    """
    check_fisher_inputs(J, p, head, x=x)
    check_kernel_fisher(J, MAX_CLASSES)
    return _launch(J, p, x, head, out, block_d, tiles_per_split, precision, autotune)
