"""Time the exact input-Jacobian routes of ``drift.fisher.input_jacobian`` side by side.

Every route computes the same J (B, C, D) = dz/dx; this script times each one per image (best of ``--repeats``
after one warm-up) and checks that all agree with the first route to float rounding. The numbers recorded in
``drift/fisher.py``'s docstring come from the default invocation on a 2-core CPU machine:

    python bench/jacobian_routes.py                                   # densenet201 + small CNN, 64 px, B = 16
    python bench/jacobian_routes.py --device cuda --size 224 --batch 8 --classes 5 1000 --routes loop replicate

``--ifim`` also times the whole iFIM of ``drift.fisher.ifim`` (Jacobian by the ``loop`` route, K = G G^T and G x by
``fisher_gram``, the C x C eigendecomposition, eigenvectors by ``fisher_project``) and sets it against its floor,
one forward plus C backward passes (the ``loop`` route alone): images/s of each and their ratio. ``--json PATH``
writes every row:

    python bench/jacobian_routes.py --device cuda --size 224 --batch 16 --models densenet201 --classes 5 14 \
        --routes loop --ifim --json results/gpu/ifim.json

Routes that run out of time or memory are reported as such, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from drift.fisher import JACOBIAN_ROUTES, ifim, input_jacobian


def small_cnn(num_classes: int, in_chans: int = 3) -> nn.Module:
    """A five-layer CNN with BatchNorm (the size of a test model), (B, 3, H, W) -> (B, C)."""
    layers: list[nn.Module] = []
    widths = [in_chans, 16, 32, 32, 64]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(b), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes)]
    return nn.Sequential(*layers)


def build(name: str, num_classes: int) -> nn.Module:
    if name == "small_cnn":
        return small_cnn(num_classes)
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_route(model, x, route, chunk, repeats, device) -> tuple[float, torch.Tensor, float | None]:
    """Best wall time (s) over ``repeats`` runs after a warm-up, the Jacobian, and peak CUDA memory (GB)."""
    J, _ = input_jacobian(model, x, chunk=chunk, route=route)
    best = float("inf")
    peak = None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        del J
        sync(device)
        t0 = time.perf_counter()
        J, _ = input_jacobian(model, x, chunk=chunk, route=route)
        sync(device)
        best = min(best, time.perf_counter() - t0)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 1e9
    return best, J, peak


def time_ifim(model, x, repeats, device) -> float:
    """Best wall time (s) of ``drift.fisher.ifim`` (spectrum and eigenvectors) over ``repeats`` runs after a warm-up."""
    ifim(model, x)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        ifim(model, x)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["densenet201", "small_cnn"])
    ap.add_argument("--routes", nargs="+", default=list(JACOBIAN_ROUTES), choices=list(JACOBIAN_ROUTES))
    ap.add_argument("--classes", nargs="+", type=int, default=[5])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=None, help="classes per backward call (default min(C, 8))")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ifim", action="store_true", help="also time drift.fisher.ifim against the loop route")
    ap.add_argument("--json", type=Path, default=None, help="write the rows to this file")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(args.seed)
    print(f"device={device} dtype={args.dtype} size={args.size} batch={args.batch} threads={torch.get_num_threads()}")
    print(f"{'model':<14}{'C':>6}  {'route':<14}{'ms/img':>10}{'max|dJ|/max|J|':>17}{'peak GB':>9}")
    rows: list[dict] = []
    on = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    where = dict(
        device=on, dtype=args.dtype, size=args.size, batch=args.batch, torch=torch.__version__,
        python=platform.python_version(),
    )  # fmt: skip
    for name in args.models:
        for C in args.classes:
            torch.manual_seed(args.seed)
            model = build(name, C).to(device=device, dtype=dtype).eval()
            x = torch.randn(args.batch, 3, args.size, args.size, generator=gen, dtype=dtype).to(device)
            J_ref = None
            loop_s = None
            for route in args.routes:
                try:
                    t, J, peak = time_route(model, x, route, args.chunk, args.repeats, device)
                except torch.OutOfMemoryError:
                    print(f"{name:<14}{C:>6}  {route:<14}{'OOM':>10}")
                    rows.append(dict(where, model=name, C=C, route=route, ms_per_image=None, error="OOM"))
                    continue
                if route == "loop":
                    loop_s = t
                if J_ref is None:
                    J_ref, err = J, 0.0
                else:
                    err = float((J - J_ref).abs().max() / J_ref.abs().max())
                peak_s = f"{peak:9.2f}" if peak is not None else f"{'-':>9}"
                print(f"{name:<14}{C:>6}  {route:<14}{1e3 * t / args.batch:>10.1f}{err:>17.2e}{peak_s}", flush=True)
                rows.append(dict(where, model=name, C=C, route=route, ms_per_image=1e3 * t / args.batch,
                                 rel_err=err, peak_gb=peak))  # fmt: skip
                del J
            del J_ref
            if args.ifim:
                rows.append(_ifim_row(model, x, C, loop_s, args, device, dict(where, model=name, C=C)))
            del model
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def _ifim_row(model, x, C: int, loop_s: float | None, args, device, where: dict) -> dict:
    """Times ifim and its floor (one forward + C backward passes: the loop route), prints and returns the row."""
    if loop_s is None:
        loop_s, J, _ = time_route(model, x, "loop", None, args.repeats, device)
        del J
    try:
        t = time_ifim(model, x, args.repeats, device)
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
        note="ifim: spectrum + eigenvectors; jacobian: one forward + C backward passes (route loop)",
    )  # fmt: skip


if __name__ == "__main__":
    main()
