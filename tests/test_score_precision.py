"""The softmax score is differentiated in float64 (float32 saturates from a logit margin of about 17): CAMs of a
confident model against a float64 computation from the same forward pass, and the saturation count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from drift.attribution import METHODS, cams
from drift.attributions_step import saturated
from drift.capture import capture, float32_saturated

C = 5


class Net(nn.Module):
    """conv -> ReLU (the target layer ``body``) -> global average pool -> linear: g = dp_t/dz W / (h w)."""

    def __init__(self, rng: torch.Generator):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 7, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(7, C)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=rng))

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def _with_margin(model: Net, x: torch.Tensor, t: torch.Tensor, margin: float) -> None:
    """Set the head's bias so that z_t - max_{c != t} z_c = margin for the single image x (1, 3, H, W)."""
    with torch.no_grad():
        model.head.bias.zero_()
        z = model(x).double()[0]
        other = torch.cat([z[: t[0]], z[t[0] + 1:]]).max()
        model.head.bias[t[0]] += float(margin - (z[t[0]] - other))


def _float64_cams(model: Net, x: torch.Tensor, t: torch.Tensor, dtype_softmax: torch.dtype) -> dict:
    """The same CAMs from the same float32 forward pass (activations A, logits z), with dp_t/dz of softmax(z) in
    ``dtype_softmax`` and every later step in float64: g = (dp_t/dz) W / (h w) over space, the method on (A, g)."""
    A = model.body(x).detach().double()
    z = model(x).detach().to(dtype_softmax).requires_grad_(True)
    (dz,) = torch.autograd.grad(z.softmax(1).gather(1, t[:, None]).sum(), z)
    hw = A.shape[2] * A.shape[3]
    gk = dz.double() @ model.head.weight.detach().double() / hw  # (B, K)
    g = gk[:, :, None, None].expand_as(A)
    return {m: fn(A, g, 0.0) for m, fn in METHODS.items()}


@pytest.mark.parametrize("margin", [25.0, 19.0])
def test_softmax_cams_at_a_large_margin_equal_float64(rng, margin):
    for _ in range(3):
        model = Net(rng).eval()
        x = torch.rand(1, 3, 9, 11, generator=rng)
        t = torch.randint(0, C, (1,), generator=rng)
        _with_margin(model, x, t, margin)
        z = model(x).detach()
        assert float32_saturated(z, t).all()  # float32 p_t is exactly 1 here
        got = cams(model, x, t, methods=tuple(METHODS), layer="body", score="softmax")
        want = _float64_cams(model, x, t, torch.float64)
        naive = _float64_cams(model, x, t, torch.float32)  # what a float32 softmax derivative gives
        for m in METHODS:
            scale = want[m].flatten(1).abs().amax(1)
            if not bool((scale > 0).all()):  # every channel weight <= 0: an all-zero map, in both
                assert float(got[m].abs().max()) == 0, m
                continue
            err = (got[m].double() - want[m]).flatten(1).abs().amax(1) / scale
            # drift's maps are float32 sums over the channels, which cancel: a few float32 ulps of the largest
            # term, relative to the map's maximum, can reach 1e-5 (3e-6 seen); the float32 softmax is off by > 1e-2
            assert float(err.max()) <= 1e-4, (m, err)
            wrong = (naive[m] - want[m]).flatten(1).abs().amax(1) / scale
            assert float(wrong.max()) > 1e-2 or not bool(naive[m].isfinite().all()), (m, wrong)


def test_softmax_gradient_matches_the_closed_form(rng):
    """g = sum_c p_t (delta_tc - p_c) W_c / (h w) at the GAP layer, p from float64 logits, at margins 5-30."""
    model = Net(rng).eval()
    x = torch.rand(1, 3, 8, 6, generator=rng)
    t = torch.randint(0, C, (1,), generator=rng)
    for margin in (5.0, 17.0, 30.0):
        _with_margin(model, x, t, margin)
        cap = capture(model, x, t, layer="body", score="softmax")
        p = cap.logits.double().softmax(1)
        pt = p.gather(1, t[:, None])
        dz = pt * (torch.nn.functional.one_hot(t, C).double() - p)
        want = dz @ model.head.weight.double() / 48
        got = cap.gradients.double()[:, :, 0, 0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_saturation_count_against_an_explicit_float32_softmax(rng):
    n = 64
    logits = torch.randn(n, C, generator=rng, dtype=torch.float64) * torch.linspace(0.1, 40, n)[:, None].double()
    t = torch.randint(0, C, (n,), generator=rng)
    got = saturated(logits.numpy(), t.numpy())
    z = logits.numpy().astype(np.float32)
    e = np.exp(z - z.max(1, keepdims=True))
    p = (e / e.sum(1, keepdims=True))[np.arange(n), t.numpy()]
    # independent: p_t is 1 or 0 in float32 when exp of every other margin vanishes against 1 (or the reverse)
    assert got.dtype == bool and got.shape == (n,)
    assert np.array_equal(got, (p == 1) | (p == 0)), (got, p)
    assert got.any() and not got.all()
