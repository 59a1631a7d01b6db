"""Throughput of the study's two CAM methods: drift's single pass against pytorch-grad-cam's two passes.

The hot path ``CAMS`` of ``bench/benchmarks/_hotpaths.py``: drift computes Grad-CAM++ and LayerCAM from one
forward and one backward pass (:func:`drift.attribution.cams`); pytorch-grad-cam runs ``GradCAMPlusPlus`` and
``LayerCAM`` each with its own forward and backward pass and does the maths in NumPy. Both run on the same
DenseNet201 (random weights, the project's classifier, grayscale input) and the same batches, interleaved repeat
by repeat so that machine noise hits both alike. Prints images/s of each and the
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the hot paths of its benchmarks package
from benchmarks._hotpaths import CAMS, cam_inputs  # noqa: E402
from benchmarks._support import sync  # noqa: E402


def measure(device: str, size: int, batch: int, repeats: int, seed: int = 0) -> dict:
    """Seconds per batch of both engines of ``CAMS`` (median over repeats) and the path's agreement check."""
    dev = torch.device(device)
    inputs = cam_inputs("densenet201", size, batch, dev, seed)
    ours, ref = CAMS.call("drift", inputs), CAMS.call("pytorch-grad-cam", inputs)
    err = CAMS.check(inputs, "drift", ours())["max_abs_diff"]  # also the warm-up (kernel selection, caches)
    ref()
    t_ours, t_ref = [], []
    for _ in range(repeats):
        for fn, times in ((ours, t_ours), (ref, t_ref)):
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
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
