"""GPU benchmark of the Triton kernels against their torch references: ``python bench/gpu_kernels.py``.

For every case it measures, in one run on one device:

* kernel and torch-reference time (CUDA events after warm-up, median of repeats) and their ratio. The kernel is
  timed through its launcher (``_launch`` of the kernel module, as the dispatch layer calls it on validated
  inputs), so the host-side validation of the public entries (finiteness checks that wait for the device) is
  not in its time; the public entry runs once first, untimed, and validates the inputs. Every repeat starts
  with a cold L2: a buffer of twice the L2 size (at least 256 MB) is overwritten before each timed run, outside
  the timed interval, so inputs smaller than the L2 (J of B = 8, C = 5 is 24 MB in float32) are read from HBM;
* achieved bandwidth = (bytes of J read + bytes of outputs written) / kernel time, and its ratio to the
  bandwidth of a device-to-device ``tensor.copy_`` measured at the start of the same run (read + write bytes);
* the largest absolute error of the kernel and of the reference, both against a float64 evaluation of the
  reference (the kernel passes when its error is at most twice the reference's), and the largest |entry|
  of that float64 result (``ref_scale``).

Cases: ``fisher_gram`` (K only, no x) and ``fisher_project`` (m = 4) for B in {8, 64}, C in {5, 14, 100},
D = 3 * 224 * 224, J in float32 and bfloat16; ``topk_iou`` for N = 4096 pairs of 224 x 224 float32 maps and
T = 4 fractions (kernel: the launcher, the device threshold search included; its counts must equal the
reference's exactly). Goals: fisher_* at >= 80 % of copy bandwidth and >= 2x the reference's speed;
topk_iou >= 5x the reference's speed.

Without CUDA (or with ``--dry-run``) it runs tiny cases, the kernels through Triton's interpreter, and prints
the same table under the heading "CPU dry run -- not a measurement". The table is printed last; ``--json PATH``
writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

GOAL_BANDWIDTH = 0.80
GOAL_FISHER_SPEEDUP = 2.0
GOAL_TOPK_SPEEDUP = 5.0
FRACTIONS = (0.05, 0.10, 0.20, 0.30)

COLUMNS = (
    ("op", "op", "{}"),
    ("dtype", "dtype", "{}"),
    ("B", "B/N", "{}"),
    ("C", "C", "{}"),
    ("D", "D/HW", "{}"),
    ("kernel_ms", "kernel ms", "{:.3f}"),
    ("reference_ms", "ref ms", "{:.3f}"),
    ("speedup", "speedup", "{:.2f}x"),
    ("gbps", "GB/s", "{:.0f}"),
    ("copy_fraction", "of copy", "{:.0%}"),
    ("err_kernel", "err kernel", "{:.2e}"),
    ("err_reference", "err ref", "{:.2e}"),
    ("ok", "goals", "{}"),
)


def l2_flush_bytes(device: torch.device) -> int:
    """Bytes to overwrite to evict the device's L2: twice its size, at least 256 MB."""
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
    return max(2 * l2, 256 << 20)


def _timer(device: torch.device) -> Callable[[Callable[[], object], int, int], float]:
    """A function timing fn: median milliseconds over `repeat` runs after `warmup` runs.

    On CUDA each timed run starts with a cold L2 (a flush buffer is overwritten before the start event) and is
    timed by CUDA events around fn alone.
    """
    if device.type == "cuda":
        flush = torch.empty(l2_flush_bytes(device) // 4, dtype=torch.float32, device=device)

        def cuda_time(fn: Callable[[], object], warmup: int, repeat: int) -> float:
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize(device)
            times = []
            for _ in range(repeat):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                flush.zero_()  # queued before the start event: evicts the inputs from L2, not timed
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)

        return cuda_time

    def cpu_time(fn: Callable[[], object], warmup: int, repeat: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_time


def copy_bandwidth(device: torch.device, n_bytes: int, timer, repeat: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src), 3, repeat)
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def _max_error(
    fn64: Callable[[slice], torch.Tensor], outs: Sequence[torch.Tensor], B: int, chunk: int
) -> tuple[list[float], float]:
    """max |out - ref64| for each out, and max |ref64|, with the float64 reference evaluated on chunks of samples."""
    errs = [0.0] * len(outs)
    scale = 0.0
    for s in range(0, B, chunk):
        sl = slice(s, min(B, s + chunk))
        ref = fn64(sl)
        scale = max(scale, float(ref.abs().max()))
        errs = [max(e, float((o[sl].double() - ref).abs().max())) for e, o in zip(errs, outs)]
    return errs, scale


def _kernel_module(name: str):
    """A kernel module of drift_kernels, imported on first use (after the interpreter choice is made)."""
    import importlib

    return importlib.import_module(f"drift_kernels.{name}")


def _fisher_cases(dk, J: torch.Tensor, p: torch.Tensor, W: torch.Tensor) -> list[tuple]:
    """(op, kernel, reference, float64 reference on a slice of samples, bytes written) for one input.

    The kernels are called through their launchers, as the dispatch layer calls them once the public entry has
    validated the inputs (the entries run once here, untimed, for that validation).
    """
    B, C, D = J.shape
    m = W.shape[2]
    dk.fisher_gram(J, p)
    dk.fisher_project(J, p, W)
    gram, project = _kernel_module("fisher_gram_kernel"), _kernel_module("fisher_project_kernel")
    return [
        (
            "fisher_gram",
            lambda: gram._launch(J, p, None, "softmax")[0],
            lambda: dk.fisher_gram_reference(J, p)[0],
            lambda sl: dk.fisher_gram_reference(J[sl], p[sl], compute_dtype=torch.float64)[0],
            B * C * C * 4,
        ),
        (
            "fisher_project",
            lambda: project._launch(J, p, W, "softmax"),
            lambda: dk.fisher_project_reference(J, p, W),
            lambda sl: dk.fisher_project_reference(J[sl], p[sl], W[sl], compute_dtype=torch.float64),
            B * D * m * 4,
        ),
    ]


def fisher_rows(device, dtypes, batches, classes, D, m, timer, warmup, repeat, copy_gbps, chunk) -> list[dict]:
    """One row per (op, dtype, B, C): time, bandwidth and error of fisher_gram and fisher_project."""
    import drift_kernels as dk

    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for dtype in dtypes:
        for B in batches:
            for C in classes:
                J = torch.randn(B, C, D, generator=gen, device=device).to(dtype)
                p = torch.softmax(2 * torch.randn(B, C, generator=gen, device=device), dim=-1)
                W = torch.randn(B, C, m, generator=gen, device=device)
                j_bytes = J.numel() * J.element_size()
                for op, kernel, reference, ref64, out_bytes in _fisher_cases(dk, J, p, W):
                    t_k = timer(kernel, warmup, repeat)
                    t_r = timer(reference, warmup, repeat)
                    (err_k, err_r), scale = _max_error(ref64, (kernel(), reference()), B, chunk)
                    gbps = (j_bytes + out_bytes) / (t_k * 1e-3) / 1e9
                    row = dict(
                        op=op, dtype=str(dtype).removeprefix("torch."), B=B, C=C, D=D,
                        m=m if op == "fisher_project" else None, kernel_ms=t_k, reference_ms=t_r,
                        speedup=t_r / t_k, gbps=gbps, copy_gbps=copy_gbps, copy_fraction=gbps / copy_gbps,
                        err_kernel=err_k, err_reference=err_r, ref_scale=scale,
                    )  # fmt: skip
                    row["ok"] = bool(
                        row["copy_fraction"] >= GOAL_BANDWIDTH
                        and row["speedup"] >= GOAL_FISHER_SPEEDUP
                        and err_k <= 2 * err_r
                    )
                    rows.append(row)
                del J, W
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def topk_rows(device, N, H, W, timer, warmup, repeat, copy_gbps) -> list[dict]:
    """One row: time of topk_iou (public entry) against the reference, and whether the counts agree exactly."""
    import drift_kernels as dk

    gen = torch.Generator(device=device).manual_seed(1)
    a = torch.rand(N, H, W, generator=gen, device=device)
    # Quantised maps: many ties, as after upsampling a coarse CAM.
    b = (torch.rand(N, H, W, generator=gen, device=device) * 64).floor()
    dk.topk_iou(a, b, FRACTIONS)  # the public entry validates the maps once, untimed
    topk = _kernel_module("topk_iou_kernel")
    t_k = timer(lambda: topk._launch(a, b, FRACTIONS, "fractional"), warmup, repeat)
    t_r = timer(lambda: dk.topk_iou_reference(a, b, FRACTIONS), max(1, warmup // 2), max(1, repeat // 2))
    got, want = topk._launch(a, b, FRACTIONS, "fractional"), dk.topk_iou_reference(a, b, FRACTIONS)
    mismatches = int((got[0] != want[0]).sum() + (got[1] != want[1]).sum())
    gbps = (a.numel() * 4 * 2 + N * len(FRACTIONS) * 20) / (t_k * 1e-3) / 1e9
    return [
        dict(
            op="topk_iou",
            dtype="float32",
            B=N,
            C=len(FRACTIONS),
            D=H * W,
            m=None,
            kernel_ms=t_k,
            reference_ms=t_r,
            speedup=t_r / t_k,
            gbps=gbps,
            copy_gbps=copy_gbps,
            copy_fraction=gbps / copy_gbps,
            err_kernel=float(mismatches),
            err_reference=0.0,
            ref_scale=None,
            ok=bool(mismatches == 0 and t_r / t_k >= GOAL_TOPK_SPEEDUP),
        )
    ]


def format_table(rows: Sequence[dict], title: str) -> str:
    """The rows as an aligned text table under a title line."""
    head = [label for _, label, _ in COLUMNS]
    body = [[fmt.format(r[key]) if r.get(key) is not None else "-" for key, _, fmt in COLUMNS] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """Run the benchmark (GPU when available, else the CPU dry run), print the table last, return the rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="write the rows to this JSON file")
    parser.add_argument("--dry-run", action="store_true", help="tiny CPU cases through Triton's interpreter")
    parser.add_argument("--repeat", type=int, default=None, help="timed repeats per case (median reported)")
    args = parser.parse_args(argv)

    dry = args.dry_run or not torch.cuda.is_available()
    if dry:
        # The interpreter is chosen when a kernel module is first imported: set it before any kernel runs.
        os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
        title = "CPU dry run -- not a measurement (tiny sizes; kernels through Triton's interpreter)"
        repeat = args.repeat or 1
        warmup = 1
        shapes = dict(dtypes=(torch.float32, torch.bfloat16), batches=(2,), classes=(5, 14), D=3 * 16 * 16, m=4)
        topk_shape = (16, 24, 24)
        copy_bytes = 1 << 22
    else:
        device = torch.device("cuda")
        title = f"GPU kernels on {torch.cuda.get_device_name(device)} (torch {torch.__version__})"
        repeat = args.repeat or 10
        warmup = 3
        shapes = dict(
            dtypes=(torch.float32, torch.bfloat16), batches=(8, 64), classes=(5, 14, 100), D=3 * 224 * 224, m=4
        )
        topk_shape = (4096, 224, 224)
        copy_bytes = 1 << 31
    timer = _timer(device)
    copy_gbps = copy_bandwidth(device, copy_bytes, timer, repeat)
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)", flush=True)
    rows = fisher_rows(device, **shapes, timer=timer, warmup=warmup, repeat=repeat, copy_gbps=copy_gbps, chunk=8)
    rows += topk_rows(device, *topk_shape, timer=timer, warmup=warmup, repeat=repeat, copy_gbps=copy_gbps)
    for r in rows:
        r["dry_run"] = dry
        r["device"] = "cpu" if dry else torch.cuda.get_device_name(device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    print(
        f"goals: fisher_* >= {GOAL_BANDWIDTH:.0%} of copy bandwidth, >= {GOAL_FISHER_SPEEDUP:g}x the reference, "
        f"error <= 2x the reference's; topk_iou >= {GOAL_TOPK_SPEEDUP:g}x, counts exact (err kernel = mismatches)"
    )
    print(format_table(rows, title))
    return rows


if __name__ == "__main__":
    main()
