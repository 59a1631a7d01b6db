"""Timed Jacobian routes and iFIM spectrum (``bench/benchmarks/_hotpaths.py``: ``JACOBIAN``, ``IFIM_SPECTRUM``),
checked against brute force: the batch's autograd Jacobian and the eigenvalues of the explicit Fisher matrix."""

import pytest
import torch

from bench.benchmarks._hotpaths import IFIM_SPECTRUM, JACOBIAN, jacobian_inputs


def setting(device: torch.device, rng: torch.Generator):
    """drift's resnet18 at 224 px, batch 8, on a GPU (the timed run); on the CPU a small CNN at an odd size
    (D = H * W <= 441), so that the brute-force D x D Fisher matrix stays cheap."""
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    if device.type == "cuda":
        return jacobian_inputs("resnet18", 224, 8, device, seed)
    return jacobian_inputs("small_cnn", int(torch.randint(9, 22, (1,), generator=rng)), 3, device, seed)


@pytest.mark.parametrize("route", list(JACOBIAN.implementations()))
def test_input_jacobian(timed, benchmark, bench_device, rng, route):
    inputs = setting(bench_device, rng)
    J = timed(JACOBIAN.call(route, inputs))
    benchmark.extra_info.update(batch=inputs.x.shape[0], size=inputs.x.shape[-1])
    benchmark.extra_info.update(JACOBIAN.check(inputs, route, J))


def test_ifim_spectrum(timed, benchmark, bench_device, rng):
    inputs = setting(bench_device, rng)
    eigenvalues = timed(IFIM_SPECTRUM.call("drift", inputs))
    benchmark.extra_info.update(IFIM_SPECTRUM.check(inputs, "drift", eigenvalues))
