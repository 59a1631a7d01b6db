"""Timed CAM engines (``bench/benchmarks/_hotpaths.py``: ``CAMS``): drift's (Grad-CAM++ and LayerCAM from one
forward and one backward pass) and pytorch-grad-cam's, each checked against the other after min-max
normalisation at the input size."""

import pytest
import torch

from bench.benchmarks._hotpaths import CAMS, cam_inputs


@pytest.mark.parametrize("engine", ["drift", "pytorch-grad-cam"])
def test_cams_gradcampp_and_layercam(timed, benchmark, bench_device, rng, engine):
    """A study backbone at 224 px, batch 16, on a GPU; resnet18 at 72 px (3 x 3 maps), batch 3, on the CPU."""
    arch, size, batch = ("densenet201", 224, 16) if bench_device.type == "cuda" else ("resnet18", 72, 3)
    inputs = cam_inputs(arch, size, batch, bench_device, seed=int(torch.randint(0, 2**31, (1,), generator=rng)))
    out = timed(CAMS.call(engine, inputs))
    benchmark.extra_info.update(batch=batch, size=size, **CAMS.check(inputs, engine, out))
