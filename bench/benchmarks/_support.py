"""Helpers shared by the asv suites: lazy imports that skip cleanly, device choice, synchronisation."""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Any


def need(name: str) -> ModuleType:
    """Import ``name``; NotImplementedError (asv: skipped) when the benchmarked commit does not have it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise NotImplementedError(f"{name} cannot be imported in this commit: {exc}") from None


def need_attr(module: ModuleType, attr: str) -> Any:
    """``module.attr``; NotImplementedError when the benchmarked commit does not define it."""
    try:
        return getattr(module, attr)
    except AttributeError:
        raise NotImplementedError(f"{module.__name__}.{attr} does not exist in this commit") from None


def _gpu_driver_present() -> bool:
    """False only where a GPU certainly cannot be used: Linux without the NVIDIA (or ROCm) kernel driver."""
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd"))


def device(kernel: bool = False):
    """The device to benchmark on: CUDA when there is one, else the CPU.

    Args:
        kernel: a Triton kernel variant, which only runs on CUDA (NotImplementedError elsewhere).
    """
    if kernel and not _gpu_driver_present():
        # Decided before importing torch: asv starts a fresh process per parameter combination, and importing
        # torch there only to learn that there is no GPU costs seconds per skipped combination.
        raise NotImplementedError("the Triton kernels are benchmarked on CUDA devices only; no GPU driver here")
    torch = need("torch")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if kernel:
        raise NotImplementedError("the Triton kernels are benchmarked on CUDA devices only; none here")
    return torch.device("cpu")


def sync(dev) -> None:
    """Wait for queued CUDA work, so a timed call measures the computation and not just its launch."""
    if dev.type == "cuda":
        need("torch").cuda.synchronize(dev)


def generator(seed: int, dev=None):
    """A seeded torch.Generator on ``dev`` (CPU when None): the same inputs on every run and commit."""
    torch = need("torch")
    return torch.Generator(device=dev or "cpu").manual_seed(seed)
