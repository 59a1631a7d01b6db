"""Timed forward pass under drift.train.fast_layout (channels-last, bf16 autocast), checked against the same
model's fp32 NCHW logits: equal to float rounding in fp32, to bf16 accuracy in bf16."""

import pytest
import torch

from drift import models
from drift.train import fast_layout


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-4), ("bf16", 0.1)])
def test_fast_layout_forward(timed, benchmark, bench_device, rng, precision, tol):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    side = int(torch.randint(64, 100, (1,), generator=rng))
    batch = 16 if bench_device.type == "cuda" else 3
    model = models.build("resnet18", 5).eval().to(bench_device)
    x = torch.rand(batch, 1, side, side + 7, generator=rng).to(bench_device)
    with torch.no_grad():
        ref = model(x).float()
        with fast_layout(model, precision, bench_device) as prepare:
            conv = next(p for p in model.parameters() if p.ndim == 4)
            assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
            got = timed(lambda: model(prepare(x)).float())
    benchmark.extra_info.update(precision=precision, side=side, batch=batch)
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < tol, err
    if precision == "bf16":
        assert err > 0, "bf16 autocast did not engage"
    assert all(p.is_contiguous() for p in model.parameters()), "weights handed back in the standard layout"
