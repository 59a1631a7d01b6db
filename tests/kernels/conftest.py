"""Fixtures of the kernel tests."""

import drift_kernels._common as common
import pytest
import torch


@pytest.fixture
def poison(monkeypatch):
    """Make every buffer the launchers allocate (outputs and workspaces) start as NaN, or a sentinel integer.

    A kernel that skips an element then leaves a NaN (or the sentinel) behind, which the tests catch.
    """

    def filled(shape, dtype, device):
        if dtype.is_floating_point:
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        return torch.full(shape, -(2**40), dtype=dtype, device=device)

    monkeypatch.setattr(common, "alloc", filled)
    return filled
