"""Timed kernels (``bench/benchmarks/_hotpaths.py``: ``FISHER_GRAM``, ``FISHER_PROJECT``, ``TOPK_IOU``), each
checked against a float64 evaluation of its formula (Fisher kernels) or a NumPy brute force (top-k IoU).

``impl="kernel"`` calls the public entry (``drift_kernels.fisher_gram`` ...), which runs the Triton kernel: compiled
on a GPU, through Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1); ``impl="launcher"``
the kernel's launcher as the entry calls it once the inputs are validated (what ``bench/gpu_kernels.py`` times);
``impl="reference"`` the torch reference. Error rule for the kernel: at most twice the torch reference's error in
the same dtype, both measured against float64 (or a few float32 ulps, whichever is larger).
"""

import pytest
import torch
from drift_kernels._common import interpreting

from bench.benchmarks._hotpaths import FISHER_GRAM, FISHER_PROJECT, TOPK_IOU, fisher_inputs, map_inputs


def compiled_gpu(device: torch.device) -> bool:
    return device.type == "cuda" and not interpreting()


def seed(rng: torch.Generator) -> int:
    return int(torch.randint(0, 2**31, (1,), generator=rng))


def fisher_case(device, dtype, rng):
    """GPU: a study-sized batch (64 px, 5 classes, or 224 px, 14 classes); CPU (interpreter): odd and small."""
    if compiled_gpu(device):
        B, C, D = (16, 5, 64 * 64 + 1) if int(torch.randint(0, 2, (1,), generator=rng)) else (8, 14, 224 * 224)
    else:
        B, C, D = 3, 5, int(torch.randint(100, 700, (1,), generator=rng)) | 1
    m = int(torch.randint(1, 6, (1,), generator=rng))
    return fisher_inputs(B, C, D, device, seed(rng), dtype, m)


# bf16 tl.dot is wrong under Triton's interpreter: bf16 is covered by the GPU run only.
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16", marks=pytest.mark.gpu),
]


def timed_and_checked(timed, benchmark, path, impl, inputs) -> None:
    out = timed(path.call(impl, inputs))
    benchmark.extra_info.update(path.check(inputs, impl, out))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["kernel", "launcher", "reference"])
def test_fisher_gram(timed, benchmark, bench_device, rng, impl, dtype):
    timed_and_checked(timed, benchmark, FISHER_GRAM, impl, fisher_case(bench_device, dtype, rng))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["kernel", "launcher", "reference"])
def test_fisher_project(timed, benchmark, bench_device, rng, impl, dtype):
    timed_and_checked(timed, benchmark, FISHER_PROJECT, impl, fisher_case(bench_device, dtype, rng))


@pytest.mark.parametrize("ties", ["fractional", "index"])
@pytest.mark.parametrize("impl", ["kernel", "launcher", "reference"])
def test_topk_iou(timed, benchmark, bench_device, rng, impl, ties):
    if compiled_gpu(bench_device):
        N, H, W = 64, 224, 224
    else:
        N, H, W = 13, 17, int(torch.randint(11, 30, (1,), generator=rng))
    inputs = map_inputs(N, H, W, bench_device, seed(rng), ties=ties)
    timed_and_checked(timed, benchmark, TOPK_IOU, impl, inputs)
