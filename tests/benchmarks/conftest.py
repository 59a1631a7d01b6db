"""Fixtures of the pytest-benchmark suite: the device to run on and a timed call that waits for the device.

On a CPU machine every test runs once (pyproject's addopts has ``--benchmark-disable``) and checks what it ran;
with ``--benchmark-enable`` the same tests are timed. On a GPU they use CUDA inputs and larger shapes.
"""

import os

import pytest
import torch

from bench.benchmarks import _hotpaths as hotpaths


def pytest_configure(config):
    # tests/conftest.py turns Triton's interpreter on for the whole session so that CPU runs exercise the kernels.
    # A timed run on a GPU must time the compiled kernels: the interpreter would also take the CUDA tensors.
    timed = config.getoption("benchmark_enable", default=False)
    if timed and os.environ.get("TRITON_INTERPRET") == "1" and torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "0"


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    """CUDA when available (the timed GPU run), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@pytest.fixture
def timed(benchmark, bench_device):
    """``timed(fn, *args)``: benchmark fn(*args) including the wait for queued CUDA work; returns fn's result."""

    def run(fn, *args, **kwargs):
        def call():
            out = fn(*args, **kwargs)
            if bench_device.type == "cuda":
                torch.cuda.synchronize(bench_device)
            return out

        benchmark.extra_info["device"] = str(bench_device)
        return benchmark(call)

    return run


@pytest.fixture
def single_thread():
    """``with single_thread():`` runs a reference computation on one torch thread and one BLAS thread."""
    return hotpaths.single_thread
