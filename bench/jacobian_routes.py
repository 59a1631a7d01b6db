"""Time the exact input-Jacobian routes of ``drift.fisher.input_jacobian`` side by side.

The hot paths ``JACOBIAN`` and ``IFIM_SPECTRUM`` of ``bench/benchmarks/_hotpaths.py``: every route computes the
same J (B, C, D) = dz/dx; this script times each one per image (best of ``--repeats`` after one warm-up) and,
unless ``--no-check``, runs the path's check (the brute-force autograd Jacobian; memory B * C * B * D floats, so
skip it for study-sized inputs):

    python bench/jacobian_routes.py                                   # densenet201 + small CNN, 64 px, B = 16
    python bench/jacobian_routes.py --device cuda --size 224 --batch 8 --classes 5 1000 --routes loop replicate \
        --no-check

``--ifim`` also times the iFIM spectrum of ``drift.fisher.ifim`` (Jacobian by the ``loop`` route, K = G G^T by
``fisher_gram``, the C x C eigendecomposition; no eigenvectors, as the pipeline computes it) and sets it against
its floor, one forward plus C backward passes (the ``loop`` route alone): images/s of each and their ratio.
``--json PATH`` writes every row:

    python bench/jacobian_routes.py --device cuda --size 224 --batch 16 --models densenet201 --classes 5 14 \
        --routes loop --ifim --no-check --json results/gpu/ifim.json

Routes that run out of memory are reported as such, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the hot paths of its benchmarks package
from benchmarks._hotpaths import IFIM_SPECTRUM, JACOBIAN, jacobian_inputs  # noqa: E402
from benchmarks._support import sync  # noqa: E402


def best_time(fn, repeats: int, device: torch.device) -> tuple[float, object, float | None]:
    """Best wall time (s) of ``fn()`` over ``repeats`` runs after a warm-up, its output, and peak CUDA memory (GB)."""
    out = fn()
    best, peak = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        del out
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 1e9
    return best, out, peak


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["densenet201", "small_cnn"])
    ap.add_argument("--routes", nargs="+", default=list(JACOBIAN.implementations()),
                    choices=list(JACOBIAN.implementations()))
    ap.add_argument("--classes", nargs="+", type=int, default=[5])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ifim", action="store_true", help="also time the iFIM spectrum against the loop route")
    ap.add_argument("--no-check", action="store_true", help="skip the brute-force check of each route's J")
    ap.add_argument("--json", type=Path, default=None, help="write the rows to this file")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    print(f"device={device} dtype={args.dtype} size={args.size} batch={args.batch} threads={torch.get_num_threads()}")
    print(f"{'model':<14}{'C':>6}  {'route':<14}{'ms/img':>10}{'check rel err':>17}{'peak GB':>9}")
    rows: list[dict] = []
    on = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    where = dict(
        device=on, dtype=args.dtype, size=args.size, batch=args.batch, torch=torch.__version__,
        python=platform.python_version(),
    )  # fmt: skip
    for name in args.models:
        for C in args.classes:
            inputs = jacobian_inputs(name, args.size, args.batch, device, args.seed, dtype, num_classes=C)
            loop_s = None
            for route in args.routes:
                try:
                    t, J, peak = best_time(JACOBIAN.call(route, inputs), args.repeats, device)
                except torch.OutOfMemoryError:
                    print(f"{name:<14}{C:>6}  {route:<14}{'OOM':>10}")
                    rows.append(dict(where, model=name, C=C, route=route, ms_per_image=None, error="OOM"))
                    continue
                if route == "loop":
                    loop_s = t
                err = None if args.no_check else JACOBIAN.check(inputs, route, J)["max_rel_error"]
                err_s = f"{err:>17.2e}" if err is not None else f"{'-':>17}"
                peak_s = f"{peak:9.2f}" if peak is not None else f"{'-':>9}"
                print(f"{name:<14}{C:>6}  {route:<14}{1e3 * t / args.batch:>10.1f}{err_s}{peak_s}", flush=True)
                rows.append(dict(where, model=name, C=C, route=route, ms_per_image=1e3 * t / args.batch,
                                 rel_err=err, peak_gb=peak))  # fmt: skip
                del J
            if args.ifim:
                rows.append(_ifim_row(inputs, C, loop_s, args, device, dict(where, model=name, C=C)))
            del inputs
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def _ifim_row(inputs, C: int, loop_s: float | None, args, device, where: dict) -> dict:
    """Times the iFIM spectrum and its floor (one forward + C backward passes: the loop route), prints and
    returns the row."""
    if loop_s is None:
        loop_s, _, _ = best_time(JACOBIAN.call("loop", inputs), args.repeats, device)
    try:
        t, _, _ = best_time(IFIM_SPECTRUM.call("drift", inputs), args.repeats, device)
    except torch.OutOfMemoryError:
        print(f"{where['model']:<14}{C:>6}  {'ifim':<14}{'OOM':>10}")
        return dict(where, route="ifim", ms_per_image=None, error="OOM")
    B = args.batch
    print(
        f"{where['model']:<14}{C:>6}  {'ifim':<14}{1e3 * t / B:>10.1f}   {B / t:.1f} images/s, "
        f"{t / loop_s:.2f}x one forward + {C} backward passes ({B / loop_s:.1f} images/s)",
        flush=True,
    )
    return dict(
        where, route="ifim", ms_per_image=1e3 * t / B, images_per_s=B / t, jacobian_ms_per_image=1e3 * loop_s / B,
        jacobian_images_per_s=B / loop_s, ratio_to_jacobian=t / loop_s,
        note="ifim: spectrum (no eigenvectors); jacobian: one forward + C backward passes (route loop)",
    )  # fmt: skip


if __name__ == "__main__":
    main()
