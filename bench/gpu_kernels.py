"""GPU benchmark of the Triton kernels against their torch references: ``python bench/gpu_kernels.py``.

The hot paths ``FISHER_GRAM``, ``FISHER_PROJECT`` and ``TOPK_IOU`` of ``bench/benchmarks/_hotpaths.py`` (their
inputs, their ``launcher`` and ``reference`` implementations, their errors). For every case it measures, in one
run on one device:

* kernel and torch-reference time (CUDA events after warm-up, median of repeats) and their ratio. The kernel is
  timed through its launcher (``_launch`` of the kernel module, as the dispatch layer calls it on validated
  inputs), so the host-side validation of the public entries (finiteness checks that wait for the device) is
  not in its time; the public entry runs once first, untimed, and validates the inputs. Every repeat starts
  with a cold L2: a buffer of twice the L2 size (at least 256 MB) is overwritten before each timed run, outside
  the timed interval, so inputs smaller than the L2 (J of B = 8, C = 5 is 24 MB in float32) are read from HBM;
* achieved bandwidth = (bytes of J read + bytes of outputs written) / kernel time, and its ratio to the
  bandwidth of a device-to-device ``tensor.copy_`` measured at the start of the same run (read + write bytes);
* the relative error (max |error| / max |exact|) of the kernel and of the reference, both against a float64
  evaluation of the formula (the kernel passes when its error is at most twice the reference's, or a few
  float32 ulps).

Cases: ``fisher_gram`` (K only, no x) and ``fisher_project`` (m = 4) for B in {8, 64}, C in {5, 14, 100},
D = 3 * 224 * 224, J in float32 and bfloat16; ``topk_iou`` for N = 4096 pairs of 224 x 224
float32 maps of eight levels (many ties) and T = 4 fractions, fractional tie rule (kernel: the launcher, the
device threshold search included; the counts of both must equal a NumPy brute force's, on 64 of the pairs).
Comparators, each timed in the same run: ``fisher_gram`` against the best of three torch routes, the reference
(``drift_kernels.reference``), the three-pass bmm route (``bench/benchmarks/_torch_routes.py``: subtract the
argmax row, one ``bmm``, a (C + 1)-sized float64 product) and that route under ``torch.compile`` (float32,
B = 8, C = 5 and 14: the study's shapes; each compiles once, untimed); ``fisher_project`` against its reference;
``topk_iou`` against ``drift_kernels.reference``'s torch top-k function, whatever overlap it computes.
Goals: fisher_* at >= 60 % of copy bandwidth and >= 1.5x the best torch route; topk_iou >= 1.5x its reference.
A kernel that misses its speed goal is reported as such (goals: no); the dispatch layer then ought to send
that case to torch (docs/benchmarks.md).

Without CUDA (or with ``--dry-run``) it runs tiny cases, the kernels through Triton's interpreter, and prints
the same table under the heading "CPU dry run -- not a measurement". The table is printed last; ``--json PATH``
writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the hot paths of its benchmarks package
from benchmarks._hotpaths import (  # noqa: E402
    FISHER_GRAM,
    FISHER_PROJECT,
    FRACTIONS,
    TOPK_IOU,
    ULPS,
    fisher_inputs,
    gram_error,
    map_inputs,
    project_error,
    topk_mismatches,
)
from benchmarks._torch_routes import gram_compiled, gram_three_pass  # noqa: E402

GOAL_BANDWIDTH = 0.60
GOAL_FISHER_SPEEDUP = 1.5
GOAL_TOPK_SPEEDUP = 1.5

COLUMNS = (
    ("op", "op", "{}"),
    ("dtype", "dtype", "{}"),
    ("B", "B/N", "{}"),
    ("C", "C", "{}"),
    ("D", "D/HW", "{}"),
    ("kernel_ms", "kernel ms", "{:.3f}"),
    ("reference_ms", "ref ms", "{:.3f}"),
    ("three_pass_ms", "3-pass ms", "{:.3f}"),
    ("compiled_ms", "compile ms", "{:.3f}"),
    ("best_torch", "best torch", "{}"),
    ("speedup", "vs best", "{:.2f}x"),
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


def torch_gram_times(inputs, timer, warmup: int, repeat: int, compiled: bool) -> dict[str, float]:
    """Times (ms) of the torch routes of the Gram: the reference, the three-pass bmm route and, when compiled,
    the three-pass route under torch.compile (compiled by an untimed first call)."""
    times = {"reference": timer(FISHER_GRAM.call("reference", inputs), warmup, repeat)}
    times["three_pass"] = timer(lambda: gram_three_pass(inputs.J, inputs.p), warmup, repeat)
    if compiled:
        fn = gram_compiled()
        fn(inputs.J, inputs.p)
        times["compiled"] = timer(lambda: fn(inputs.J, inputs.p), warmup, repeat)
    return times


def fisher_rows(
    device, dtypes, batches, classes, D, m, timer, warmup, repeat, copy_gbps, compile_cases=()
) -> list[dict]:
    """One row per (op, dtype, B, C): time, bandwidth and error of fisher_gram (K only) and fisher_project.

    fisher_gram is compared with the best torch route measured (reference, three-pass bmm, and torch.compile of
    the three-pass route for the (dtype, B, C) in compile_cases); fisher_project with its reference.
    """
    rows = []
    for dtype in dtypes:
        for B in batches:
            for C in classes:
                inputs = fisher_inputs(B, C, D, device, seed=0, dtype=dtype, m=m, with_x=False)
                j_bytes = inputs.J.numel() * inputs.J.element_size()
                for path, error, out_bytes in (
                    (FISHER_GRAM, gram_error, B * C * C * 4),
                    (FISHER_PROJECT, project_error, B * D * m * 4),
                ):
                    kernel, reference = path.call("launcher", inputs), path.call("reference", inputs)
                    t_k = timer(kernel, warmup, repeat)
                    if path is FISHER_GRAM:
                        times = torch_gram_times(inputs, timer, warmup, repeat, (dtype, B, C) in compile_cases)
                    else:
                        times = {"reference": timer(reference, warmup, repeat)}
                    t_r = times["reference"]
                    best = min(times, key=times.get)
                    err_k, err_r = error(inputs, kernel()), error(inputs, reference())
                    gbps = (j_bytes + out_bytes) / (t_k * 1e-3) / 1e9
                    row = dict(
                        op=path.name, dtype=str(dtype).removeprefix("torch."), B=B, C=C, D=D,
                        m=m if path is FISHER_PROJECT else None, kernel_ms=t_k, reference_ms=t_r,
                        three_pass_ms=times.get("three_pass"), compiled_ms=times.get("compiled"), best_torch=best,
                        best_torch_ms=times[best], speedup=times[best] / t_k, gbps=gbps, copy_gbps=copy_gbps,
                        copy_fraction=gbps / copy_gbps,
                        err_kernel=err_k, err_reference=err_r,
                    )  # fmt: skip
                    row["ok"] = bool(
                        row["copy_fraction"] >= GOAL_BANDWIDTH
                        and row["speedup"] >= GOAL_FISHER_SPEEDUP
                        and err_k <= max(2 * err_r, ULPS)
                    )
                    rows.append(row)
                del inputs
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def topk_rows(device, N, H, W, timer, warmup, repeat, copy_gbps) -> list[dict]:
    """One row: time of the topk_iou launcher against the reference, and the counts of both against the brute
    force (err kernel / err ref: mismatched counts)."""
    inputs = map_inputs(N, H, W, device, seed=1)
    kernel, reference = TOPK_IOU.call("launcher", inputs), TOPK_IOU.call("reference", inputs)
    t_k = timer(kernel, warmup, repeat)
    t_r = timer(reference, max(1, warmup // 2), max(1, repeat // 2))
    bad_k, bad_r = topk_mismatches(inputs, kernel()), topk_mismatches(inputs, reference())
    gbps = (inputs.a.numel() * 4 * 2 + N * len(FRACTIONS) * 20) / (t_k * 1e-3) / 1e9
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
            best_torch="reference",
            best_torch_ms=t_r,
            speedup=t_r / t_k,
            gbps=gbps,
            copy_gbps=copy_gbps,
            copy_fraction=gbps / copy_gbps,
            err_kernel=float(bad_k),
            err_reference=float(bad_r),
            ok=bool(bad_k == 0 and t_r / t_k >= GOAL_TOPK_SPEEDUP),
        )
    ]


def torch_wins(rows: Sequence[dict]) -> list[dict]:
    """The dispatch records (op, device, dtype, C) of the Fisher rows where the best torch route beat the kernel;
    at several B for one (op, dtype, C), torch must win at every B measured."""
    cases: dict[tuple, list[bool]] = {}
    for r in rows:
        if r["op"] in ("fisher_gram", "fisher_project"):
            cases.setdefault((r["op"], r["device"], r["dtype"], r["C"]), []).append(r["best_torch_ms"] < r["kernel_ms"])
    return [dict(op=o, device=d, dtype=t, C=c) for (o, d, t, c), won in sorted(cases.items()) if all(won)]


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
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile route of the Gram")
    parser.add_argument(
        "--torch-wins", type=Path, help="write the Fisher cases torch won (kernels/torch_wins.json's format) here"
    )
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
        compile_cases = ()  # torch.compile needs a C compiler on the CPU and minutes; the GPU run measures it
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
        # torch.compile at the study's shapes only: each shape compiles once (tens of seconds).
        compile_cases = () if args.no_compile else ((torch.float32, 8, 5), (torch.float32, 8, 14))
        copy_bytes = 1 << 31
    timer = _timer(device)
    copy_gbps = copy_bandwidth(device, copy_bytes, timer, repeat)
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)", flush=True)
    rows = fisher_rows(device, **shapes, timer=timer, warmup=warmup, repeat=repeat, copy_gbps=copy_gbps,
                       compile_cases=compile_cases)  # fmt: skip
    rows += topk_rows(device, *topk_shape, timer=timer, warmup=warmup, repeat=repeat, copy_gbps=copy_gbps)
    for r in rows:
        r["dry_run"] = dry
        r["device"] = "cpu" if dry else torch.cuda.get_device_name(device)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    if args.torch_wins and not dry:
        args.torch_wins.parent.mkdir(parents=True, exist_ok=True)
        args.torch_wins.write_text(json.dumps(torch_wins(rows), indent=1) + "\n")
    print(
        f"goals: fisher_* >= {GOAL_BANDWIDTH:.0%} of copy bandwidth, >= {GOAL_FISHER_SPEEDUP:g}x the best torch "
        "route (fisher_gram: reference, three-pass bmm, torch.compile; fisher_project: reference), "
        f"error <= 2x the reference's; topk_iou >= {GOAL_TOPK_SPEEDUP:g}x, counts exact (err kernel = mismatches)"
    )
    print(format_table(rows, title))
    return rows


if __name__ == "__main__":
    main()
