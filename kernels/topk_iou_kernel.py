"""Overlap of top-k pixel sets: intersections, unions and IoU of N map pairs for T fractions, one pass over the maps.

Maths (reference: :func:`drift_kernels.reference.topk_iou_reference`). For a map v (H*W values, flat row-major
index i) and a fraction f, the top set holds k = topk_count(H*W, f) = ceil(f H W) pixels by value descending.
With t the k-th largest value, n_above = #{i : v_i > t}, n_tied = #{i : v_i == t} and r = k - n_above >= 1 the
number of tied pixels the set takes, the cut through the tie group follows one of two rules.

Fractional ties (default). Pixel i has membership weight

    w_i = 1 if v_i > t,   r / n_tied if v_i == t,   0 otherwise            (sum_i w_i = k),

its probability of being selected when the tied pixels are taken in a uniformly random order. For two maps,
inter = sum_i w_a,i w_b,i is the expected |A & B| under independent random tie breaks, union = 2k - inter and
IoU = inter / union. Classifying every pixel as above (>) or tied (=) in each map,

    inter = #{a>, b>} + #{a>, b=} r_b / n_b + #{a=, b>} r_a / n_a + #{a=, b=} r_a r_b / (n_a n_b),

so the pass only counts: the four class pairs and n_a = #{a=}, n_b = #{b=} (int32 per program, stored as int64;
exact). Jaccard ties (the weighted Jaccard index of the same memberships, inter = sum_i min(w_a,i, w_b,i),
union = sum_i max(w_a,i, w_b,i) = 2k - inter; reflexive) take the same six counts, with the last term
#{a=, b=} min(r_a / n_a, r_b / n_b). The float64 combination above is
:func:`~drift_kernels.reference.topk_overlap_from_counts`, shared with the reference, so kernel and reference agree
bit for bit; no floating-point sum runs over the pixels.

Index ties. The tied pixels of lower flat index come first: pixel i is in the set iff

    v_i > t,  or  v_i == t and #{i' <= i : v_i' == t} <= r,

and |A & B|, |A | B| are exact int64 counts.

Step 1 (torch, on the device): one ascending sort of each map gives t = sorted[H W - k] for every fraction,
and a binary search gives n_above, hence r. Step 2 (this kernel): each program takes a few map pairs and walks
them in flat order, tile by tile, and compares every pixel against all T thresholds at once. Fractional: it
accumulates the six counts. Index: it keeps a running count of the pixels equal to each threshold (a cumulative
sum within the tile plus the count carried from earlier tiles) to cut the ties exactly, and counts |A & B| and
|A | B| per fraction. Comparisons are IEEE (so -0.0 == +0.0) and run in each map's own dtype: a threshold is a
value of its map (or +inf for a padded fraction), so its float32 copy converts back exactly and v > t, v == t
read the same as in float32, while a float16 / bfloat16 tile holds two values a register.

Tiles on a GPU: two map pairs a program and at most 32 comparisons a thread (ROWS x T_PAD x BLOCK <= 8192 at
8 warps) for the fractional rule, 16 for the index rule, whose running tie count keeps a cumulative sum of the
tile live. For the study's T = 4 both compile without spills on sm_80, sm_89 and sm_90a; with twice the index
tile ptxas spills on sm_80 / sm_89, and float16 maps widened to float32 spilled on sm_90a (fractional rule).
``python -m drift_kernels.compile_check --ops topk_iou`` prints the resources (docs/kernels-compile.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common
from ._common import cdiv, interpreting, launch_device, next_pow2
from ._validate import check_fractions, check_maps
from .reference import MEMBERSHIP_TIES, TopkTies, check_ties, topk_count, topk_overlap_from_counts

#: Count planes the kernel writes per rule: fractional #{a>,b>}, #{a>,b=}, #{a=,b>}, #{a=,b=}, n_a, n_b; index
#: |A & B|, |A | B|.
N_PLANES = {"fractional": 6, "jaccard": 6, "index": 2}


@triton.jit
def _topk_iou_kernel(
    A,
    B,
    TA,
    TB,
    NA,
    NB,
    OUT,
    N,
    HW,
    T,
    stride_a,
    stride_b,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    T_PAD: tl.constexpr,
    FRACTIONAL: tl.constexpr,
):
    """Per map pair n and fraction f, the pixel counts of the tie rule (see the module docstring for the maths).

    A, B (N, HW) float32, float16 or bfloat16 with stride 1 along HW; TA, TB (N, T) float32 thresholds, values of
    the maps; NA, NB (N, T) int32 numbers r of threshold-valued pixels to take (read by the index rule only).
    OUT (N, T, P) int64 counts, last axis: FRACTIONAL, P = 6: #{a>, b>}, #{a>, b=}, #{a=, b>}, #{a=, b=}, #{a=},
    #{b=}; index, P = 2: |A & B|, |A | B|.
    A program takes ROWS consecutive map pairs (2 on a GPU; many under the interpreter, where every program costs
    a round of Python calls). Tiles are (ROWS, T_PAD, BLOCK): every map and fraction at once.
    """
    rr = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    r_ok = rr < N
    fr = tl.arange(0, T_PAD)
    rf = rr[:, None] * T + fr[None, :]
    rf_ok = r_ok[:, None] & (fr < T)[None, :]
    # Padded fractions and maps get an unreachable threshold and count nothing; their counts are never stored.
    # Thresholds in the maps' dtypes (exact: each is a value of its map, or +inf), compared without widening.
    ta = tl.load(TA + rf, mask=rf_ok, other=float("inf")).to(A.dtype.element_ty)[:, :, None]
    tb = tl.load(TB + rf, mask=rf_ok, other=float("inf")).to(B.dtype.element_ty)[:, :, None]
    need_a = tl.load(NA + rf, mask=rf_ok, other=0)[:, :, None]
    need_b = tl.load(NB + rf, mask=rf_ok, other=0)[:, :, None]
    # c0..c3: fractional class-pair counts, or (c0, c1) = index |A & B|, |A | B|; seen_a, seen_b: ties so far.
    c0 = tl.zeros((ROWS, T_PAD), dtype=tl.int32)
    c1 = tl.zeros((ROWS, T_PAD), dtype=tl.int32)
    c2 = tl.zeros((ROWS, T_PAD), dtype=tl.int32)
    c3 = tl.zeros((ROWS, T_PAD), dtype=tl.int32)
    seen_a = tl.zeros((ROWS, T_PAD), dtype=tl.int32)
    seen_b = tl.zeros((ROWS, T_PAD), dtype=tl.int32)
    for start in range(0, HW, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        ok = r_ok[:, None] & (offs < HW)[None, :]
        va = tl.load(A + rr[:, None] * stride_a + offs[None, :], mask=ok, other=0.0)[:, None, :]
        vb = tl.load(B + rr[:, None] * stride_b + offs[None, :], mask=ok, other=0.0)[:, None, :]
        ok = ok[:, None, :]
        gt_a = (va > ta) & ok
        eq_a = (va == ta) & ok
        gt_b = (vb > tb) & ok
        eq_b = (vb == tb) & ok
        eq_a_i = eq_a.to(tl.int32)
        eq_b_i = eq_b.to(tl.int32)
        if FRACTIONAL:
            c0 += tl.sum((gt_a & gt_b).to(tl.int32), axis=2)
            c1 += tl.sum((gt_a & eq_b).to(tl.int32), axis=2)
            c2 += tl.sum((eq_a & gt_b).to(tl.int32), axis=2)
            c3 += tl.sum((eq_a & eq_b).to(tl.int32), axis=2)
        else:
            # In set f iff v > t_f, or v == t_f and among the first r_f such pixels in flat order: the rank of
            # a tie is its running count within the tile plus the ties seen in earlier tiles.
            sel_a = gt_a | (eq_a & (tl.cumsum(eq_a_i, axis=2) + seen_a[:, :, None] <= need_a))
            sel_b = gt_b | (eq_b & (tl.cumsum(eq_b_i, axis=2) + seen_b[:, :, None] <= need_b))
            c0 += tl.sum((sel_a & sel_b).to(tl.int32), axis=2)
            c1 += tl.sum((sel_a | sel_b).to(tl.int32), axis=2)
        seen_a += tl.sum(eq_a_i, axis=2)
        seen_b += tl.sum(eq_b_i, axis=2)
    if FRACTIONAL:
        out = OUT + rf * 6
        tl.store(out, c0.to(tl.int64), mask=rf_ok)
        tl.store(out + 1, c1.to(tl.int64), mask=rf_ok)
        tl.store(out + 2, c2.to(tl.int64), mask=rf_ok)
        tl.store(out + 3, c3.to(tl.int64), mask=rf_ok)
        tl.store(out + 4, seen_a.to(tl.int64), mask=rf_ok)
        tl.store(out + 5, seen_b.to(tl.int64), mask=rf_ok)
    else:
        out = OUT + rf * 2
        tl.store(out, c0.to(tl.int64), mask=rf_ok)
        tl.store(out + 1, c1.to(tl.int64), mask=rf_ok)


def topk_thresholds(flat: torch.Tensor, ks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-map threshold value and tie allowance of the top-k sets, on flat's device.

    Args:
        flat: (N, P) maps, finite values.
        ks: (T,) int64 set sizes, 1 <= k <= P.

    Returns:
        t (N, T) float32, the k-th largest value of each map, and need (N, T) int32 = r = k - #{v > t} >= 1, the
        number of pixels equal to t that the set takes.
    """
    n_pix = flat.shape[1]
    srt = torch.sort(flat, dim=1).values
    t = srt[:, n_pix - ks]
    n_le = torch.searchsorted(srt, t.contiguous(), right=True)
    need = ks.unsqueeze(0) - (n_pix - n_le)
    return t.to(torch.float32).contiguous(), need.to(torch.int32).contiguous()


def _readable(t: torch.Tensor) -> torch.Tensor:
    """t contiguous in a dtype the kernel reads (float64 and others go to float32, order-preserving for finite
    values that float32 can tell apart; the public launcher refuses float64 outright)."""
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    return t.contiguous()


def _config(N: int, n_pix: int, T: int, on_gpu: bool, fractional: bool = True) -> tuple[int, int, int, int]:
    """(ROWS, BLOCK, T_PAD, num_warps): a ROWS x T_PAD x BLOCK comparison tile.

    GPU: two maps per program (N is in the thousands) and at most 8192 comparisons a tile (fractional rule) or
    4096 (index rule), 8 warps for a full tile: 32 or 16 comparisons a thread (register budget: module
    docstring). Interpreter: up to 2^18 comparisons a tile, spread over as many maps as fit, because every
    program and tile costs Python calls.
    """
    t_pad = max(2, next_pow2(T))
    if on_gpu:
        # Two maps per program keep every tile dimension above 1 (size-1 axes are the least exercised layouts).
        max_tile = 8192 if fractional else 4096
        block = max(16, min(next_pow2(n_pix), max_tile // (2 * t_pad)))
        return 2, block, t_pad, (8 if 2 * block * t_pad >= max_tile else 4)
    block = max(16, min(next_pow2(n_pix), (1 << 18) // t_pad))
    rows = max(1, min(next_pow2(N), (1 << 18) // (t_pad * block)))
    return rows, block, t_pad, 4


def output_dtypes(ties: str) -> tuple[torch.dtype, torch.dtype, torch.dtype]:
    """dtypes of (inter, union, iou) under a tie rule: float64 x 3 for fractional, (int64, int64, float32) for index."""
    if ties == "index":
        return torch.int64, torch.int64, torch.float32
    return torch.float64, torch.float64, torch.float64


def _launch(
    a: torch.Tensor,
    b: torch.Tensor,
    fractions: tuple[float, ...],
    ties: str = "fractional",
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    block: int | None = None,
    rows_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch on validated inputs (see :func:`topk_iou_triton`)."""
    N, H, W = a.shape
    n_pix = H * W
    T = len(fractions)
    device = a.device
    on_gpu = device.type == "cuda" and not interpreting()
    fa = a.reshape(N, n_pix)
    fb = b.reshape(N, n_pix)
    fa, fb = _readable(fa), _readable(fb)
    dtypes = output_dtypes(ties)
    if out is None:
        inter, union, iou = (_common.alloc((N, T), dt, device) for dt in dtypes)
    else:
        inter, union, iou = out
        for name, t, dt in zip(("inter", "union", "iou"), out, dtypes):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"out ({name}) must be a {dt} tensor of shape {(N, T)}, got {type(t).__name__}")
            if tuple(t.shape) != (N, T) or t.dtype != dt or t.device != device or not t.is_contiguous():
                raise ValueError(
                    f"out ({name}) must be a contiguous {dt} tensor of shape {(N, T)} on {device} for "
                    f"ties={ties!r}, got {t.dtype} {tuple(t.shape)} on {t.device}"
                )
    if N == 0:
        return inter, union, iou
    ks = torch.tensor([topk_count(n_pix, f) for f in fractions], dtype=torch.int64, device=device)
    ta, need_a = topk_thresholds(fa, ks)
    tb, need_b = topk_thresholds(fb, ks)
    fractional = ties in MEMBERSHIP_TIES  # fractional and jaccard: the same six counts, another float64 finish
    rows, cfg_block, t_pad, num_warps = _config(N, n_pix, T, on_gpu, fractional)
    block = cfg_block if block is None else block
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    rows = rows if rows_per_program is None else rows_per_program
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"rows_per_program must be a power of two >= 1, got {rows}")
    counts = _common.alloc((N, T, N_PLANES[ties]), torch.int64, device)
    with launch_device(a):
        _topk_iou_kernel[(cdiv(N, rows),)](
            fa, fb, ta, tb, need_a, need_b, counts, N, n_pix, T, fa.stride(0), fb.stride(0),
            ROWS=rows, BLOCK=block, T_PAD=t_pad, FRACTIONAL=fractional, num_warps=num_warps,
        )  # fmt: skip
    if fractional:
        # The reference's own float64 finish on the same integers: bit for bit its inter, union and IoU.
        for dst, src in zip((inter, union, iou), topk_overlap_from_counts(counts, need_a, need_b, ks, ties)):
            dst.copy_(src)
        return inter, union, iou
    inter.copy_(counts[..., 0])
    union.copy_(counts[..., 1])
    # IoU by torch's IEEE division, bit for bit the reference's float32 quotient.
    torch.div(inter.to(torch.float32), union.to(torch.float32), out=iou)
    return inter, union, iou


def topk_iou_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    fractions: tuple[float, ...] | list[float],
    *,
    ties: TopkTies = "fractional",
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    block: int | None = None,
    rows_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Intersections, unions and IoU (N, T) of the top-k sets of a and b, by the kernel, under a tie rule.

    Args:
        a: (N, H, W) float32, float16 or bfloat16 maps, finite.
        b: (N, H, W) maps of a's shape, on a's device.
        fractions: T fractions in (0, 1]; each selects ``topk_count(H*W, f)`` pixels per map.
        ties: ``"fractional"`` (tied pixels at the cut weigh r / n_tied each; expected overlap under random tie
            breaks), ``"jaccard"`` (weighted Jaccard of the same weights) or ``"index"`` (lower flat index first);
            see the module docstring.
        out: optional preallocated contiguous (inter, union, iou) outputs of the rule's dtypes.
        block: pixels per tile (power of two >= 16); default from H*W and T.
        rows_per_program: map pairs per program (power of two); default 2 on a GPU, many when interpreted.

    Returns:
        fractional, jaccard: inter, union, iou = inter / union, all (N, T) float64, equal bit for bit to
        :func:`~drift_kernels.reference.topk_iou_reference`; index: inter, union (N, T) int64 and iou (N, T)
        float32. union >= k >= 1 either way.
    """
    ties = check_ties(ties)
    fractions = check_fractions(fractions)
    check_maps(a, b)
    if a.dtype == torch.float64 or b.dtype == torch.float64:
        raise TypeError(f"the Triton kernel reads maps as float32, float16 or bfloat16, got {a.dtype} and {b.dtype}")
    return _launch(a, b, fractions, ties, out, block, rows_per_program)
