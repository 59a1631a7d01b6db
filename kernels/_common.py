"""Helpers shared by the kernel launchers: Triton availability, interpreter mode, sizes, allocation.

Nothing here imports Triton or touches CUDA at import time; launchers import Triton themselves, lazily.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os

import torch

#: Largest number of classes C the Fisher kernels take (K = G G^T is C x C, held per program).
MAX_CLASSES = 256

#: Input dtypes the kernels read; float64 is served by the torch reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the ``triton`` package can be found (checked once, without importing it)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] set to None to block it
        return False


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1``: kernels run through Triton's interpreter, CPU tensors included."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1): ``tl.arange`` extents must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive integers."""
    return -(-a // b)


@functools.cache
def _sm_count_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (queried at launch time, cached); 1 for other devices."""
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count_cached(index)


def alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer for kernel outputs and workspaces.

    Every launcher allocates through this one function so that tests can swap it for one that fills
    buffers with NaN (or a sentinel integer) and so prove that the kernels write every element.
    """
    return torch.empty(shape, dtype=dtype, device=device)


def launch_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context that makes t's CUDA device current for a launch (Triton launches on the current device)."""
    if t.is_cuda:
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
