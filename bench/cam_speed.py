"""Throughput of the study's two CAM methods: drift's single pass against pytorch-grad-cam's two passes.

drift computes Grad-CAM++ and LayerCAM from one forward and one backward pass (:func:`drift.attribution.cams`);
pytorch-grad-cam runs ``GradCAMPlusPlus`` and ``LayerCAM`` each with its own forward and backward pass and does
the maths in NumPy. Both run on the same DenseNet201 (random weights, the project's classifier) and the same
batches, interleaved repeat by repeat so that machine noise hits both alike. Prints images/s of each and the
speed-up (reference time / drift time); ``--json`` writes the record.

    python bench/cam_speed.py                       # CPU: batch 16, 64 px
    python bench/cam_speed.py --device cuda         # GPU: batch 64, 224 px
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_drift(model, x, eps):
    """Both maps from one pass, brought to the reference's output form (min-max normalised, input size)."""
    from drift.attribution import cams, normalize, upsample

    raw = cams(model, x, methods=("gradcam++", "layercam"), eps=eps)
    return {m: normalize(upsample(v, tuple(x.shape[-2:])), "minmax") for m, v in raw.items()}


def run_reference(model, x, targets):
    from pytorch_grad_cam import GradCAMPlusPlus, LayerCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    wanted = [ClassifierOutputTarget(int(t)) for t in targets]
    out = {}
    for name, cls in (("gradcam++", GradCAMPlusPlus), ("layercam", LayerCAM)):
        # One reference object at a time: two live objects would both hook every forward pass.
        cam = cls(model=model, target_layers=[model.cam_layer])
        try:
            out[name] = cam(input_tensor=x, targets=wanted)
        finally:
            cam.activations_and_grads.release()
    model.zero_grad(set_to_none=True)
    return out


def measure(device: str, size: int, batch: int, repeats: int, seed: int = 0) -> dict:
    """Seconds per batch of both implementations (median over repeats) and their agreement."""
    from drift.models import build

    dev = torch.device(device)
    torch.manual_seed(seed)
    model = build("densenet201", num_classes=5).to(dev).eval()
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dev)
    with torch.no_grad():
        targets = model(x).argmax(1)
    eps = 1e-6  # pytorch-grad-cam's Grad-CAM++ constant, so that both compute the same maps

    ours, ref = run_drift(model, x, eps), run_reference(model, x, targets)  # warm-up (kernel selection, caches)
    err = max(float(np.abs(ours[m].cpu().numpy() - ref[m]).max()) for m in ours)
    t_ours, t_ref = [], []
    for _ in range(repeats):
        for fn, times in (
            (lambda: run_drift(model, x, eps), t_ours),
            (lambda: run_reference(model, x, targets), t_ref),
        ):
            _sync(dev)
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            times.append(time.perf_counter() - t0)
    med_ours, med_ref = statistics.median(t_ours), statistics.median(t_ref)
    return {
        "benchmark": "cam_speed",
        "model": "densenet201 (random weights)",
        "methods": ["gradcam++", "layercam"],
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "size": size,
        "batch": batch,
        "repeats": repeats,
        "drift_s_per_batch": med_ours,
        "reference_s_per_batch": med_ref,
        "drift_images_per_s": batch / med_ours,
        "reference_images_per_s": batch / med_ref,
        "speedup": med_ref / med_ours,
        "max_abs_diff_minmax": err,
        "drift_times_s": t_ours,
        "reference_times_s": t_ref,
        "note": "both timings include min-max normalisation and resizing to the input size",
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--size", type=int, default=None, help="input size in px (default 64 on CPU, 224 on GPU)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 16 on CPU, 64 on GPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each implementation (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the record to this file")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if gpu and not torch.cuda.is_available():
        p.error(f"--device {args.device}: CUDA is not available on this machine")
    size = args.size or (224 if gpu else 64)
    batch = args.batch or (64 if gpu else 16)
    if size < 32 or batch < 1 or args.repeats < 1:
        p.error("need --size >= 32 (DenseNet201's minimum), --batch >= 1 and --repeats >= 1")

    rec = measure(args.device, size, batch, args.repeats, args.seed)
    print(f"CAMs (Grad-CAM++ + LayerCAM), densenet201, batch {batch}, {size} px, {rec['device']}")
    print(f"  drift (one pass)             {rec['drift_images_per_s']:8.1f} images/s")
    print(f"  pytorch-grad-cam (two passes) {rec['reference_images_per_s']:7.1f} images/s")
    print(f"  speed-up {rec['speedup']:.2f}x   max |difference| after min-max {rec['max_abs_diff_minmax']:.1e}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rec, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
