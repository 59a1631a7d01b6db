"""drift.fisher against brute force: the full D x D Fisher matrix built in float64 from autograd Jacobians."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.special
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from drift.fisher import (
    JACOBIAN_ROUTES,
    decompose,
    decompose_from_jacobian,
    default_rtol,
    fisher_apply,
    fisher_quadratic,
    head_probs,
    ifim,
    ifim_from_jacobian,
    input_jacobian,
)

SHAPES = [(1, 12, 12), (3, 8, 8)]


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Brute-force references run many tiny numpy eigh/matmul calls: a spinning BLAS pool only slows them down."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


class TinyCNN(nn.Module):
    """Odd widths, eval-mode BatchNorm with non-trivial running statistics, smooth activations."""

    def __init__(self, in_chans: int, num_classes: int, gen: torch.Generator, scale: float = 4.0, rank: int = 0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 7, 3, stride=2, padding=1)
        self.fc = nn.Linear(7 * 4, num_classes)
        with torch.no_grad():
            for prm in self.parameters():
                prm.copy_(torch.randn(prm.shape, generator=gen) * 0.5)
            self.bn.running_mean.copy_(torch.randn(5, generator=gen) * 0.1)
            self.bn.running_var.copy_(torch.rand(5, generator=gen) + 0.5)
            w = torch.randn(num_classes, 28, generator=gen)
            if rank:
                # A head of rank `rank`: the logits, hence J and F, have rank <= rank whatever the input.
                w = torch.randn(num_classes, rank, generator=gen) @ torch.randn(rank, 28, generator=gen)
            self.fc.weight.copy_(w * scale / w.norm(dim=1, keepdim=True))

    def forward(self, x):
        h = nn.functional.gelu(self.bn(self.conv1(x)))
        h = torch.tanh(self.conv2(h))
        h = nn.functional.adaptive_avg_pool2d(h, (2, 2)).flatten(1)
        return self.fc(h)


class TupleOut(nn.Module):
    """Returns a tuple, as some models do in training mode (auxiliary logits)."""

    def forward(self, x):
        return (x.flatten(1)[:, :3],)


def make(gen, shape, C, dtype=torch.float64, **kw):
    model = TinyCNN(shape[0], C, gen, **kw).to(dtype).eval()
    return model


def model_and_factors(rng, shape, C, N, head="softmax"):
    """A float64 TinyCNN with C classes, N random inputs of ``shape``, their Jacobian J, logits z and head
    probabilities p."""
    model = make(rng, shape, C)
    x = torch.randn(N, *shape, generator=rng, dtype=torch.float64)
    J, z = input_jacobian(model, x)
    return model, x, J, z, head_probs(z, head)


def brute_jacobian(model, x):
    """(B, C, D) per-sample Jacobians, one autograd.functional.jacobian call per sample."""
    rows = []
    for b in range(x.shape[0]):
        jb = torch.autograd.functional.jacobian(lambda t: model(t.unsqueeze(0))[0], x[b])
        rows.append(jb.reshape(jb.shape[0], -1))
    return torch.stack(rows)


def brute_fisher(Jb: np.ndarray, p: np.ndarray, head: str) -> np.ndarray:
    """D x D Fisher matrix: J^T (diag p - p p^T) J (softmax) or J^T diag(p (1 - p)) J (sigmoid)."""
    if head == "softmax":
        return Jb.T @ (np.diag(p) - np.outer(p, p)) @ Jb
    return Jb.T @ np.diag(p * (1 - p)) @ Jb


def brute_eig(model, x, head):
    """Per sample: descending eigenvalues and eigenvectors (D, D) of the brute-force Fisher matrix."""
    J = brute_jacobian(model, x).numpy()
    p = head_probs(model(x), head).detach().numpy()
    out = []
    for b in range(x.shape[0]):
        w, V = np.linalg.eigh(brute_fisher(J[b], p[b], head))
        out.append((w[::-1], V[:, ::-1]))
    return out


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


# ---------------------------------------------------------------------------------------------------------------
# Jacobian engine
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", sorted(JACOBIAN_ROUTES))
def test_input_jacobian_matches_autograd(rng, route):
    shape, C = SHAPES[int(torch.randint(2, (1,), generator=rng))], 7
    model = make(rng, shape, C)
    x = torch.randn(5, *shape, generator=rng, dtype=torch.float64)
    J, z = input_jacobian(model, x, chunk=3, route=route)  # 3 does not divide 7: a ragged last chunk
    assert J.shape == (5, C, int(np.prod(shape))) and J.dtype == torch.float64
    assert not J.requires_grad and not z.requires_grad
    torch.testing.assert_close(J, brute_jacobian(model, x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z, model(x).detach(), rtol=1e-12, atol=1e-12)


def test_input_jacobian_frozen_model_leaves_no_grad(rng):
    model = make(rng, (3, 8, 8), 5)
    for prm in model.conv1.parameters():
        prm.requires_grad_(False)
    marker = torch.randn(model.fc.weight.shape, generator=rng, dtype=torch.float64)
    model.fc.weight.grad = marker.clone()
    x = torch.randn(4, 3, 8, 8, generator=rng, dtype=torch.float64)
    J, _ = input_jacobian(model, x)
    torch.testing.assert_close(J, brute_jacobian(model, x), rtol=1e-10, atol=1e-12)
    assert all(prm.grad is None for name, prm in model.named_parameters() if name != "fc.weight")
    assert torch.equal(model.fc.weight.grad, marker)

    for prm in model.parameters():
        prm.requires_grad_(False)
    J2, _ = input_jacobian(model, x, route="vmap")
    torch.testing.assert_close(J2, J, rtol=1e-10, atol=1e-12)
    # Works inside no_grad too (a caller's evaluation loop).
    with torch.no_grad():
        J3, _ = input_jacobian(model, x)
    torch.testing.assert_close(J3, J, rtol=1e-10, atol=1e-12)
    with torch.inference_mode():
        x_inf = x.clone()
        with pytest.raises(RuntimeError, match="inference_mode"):
            input_jacobian(model, x_inf)
    J4, _ = input_jacobian(model, x_inf)  # an inference tensor used outside inference mode
    torch.testing.assert_close(J4, J, rtol=1e-10, atol=1e-12)


def test_input_jacobian_requires_eval_mode(rng):
    model = make(rng, (1, 12, 12), 3)
    x = torch.randn(2, 1, 12, 12, generator=rng, dtype=torch.float64)
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        input_jacobian(model, x)
    model.eval()
    model.bn.train()  # one submodule left in training mode is enough to couple the samples
    with pytest.raises(ValueError, match="bn"):
        input_jacobian(model, x)


def test_input_jacobian_bad_input(rng):
    model = make(rng, (1, 12, 12), 3)
    x = torch.randn(2, 1, 12, 12, generator=rng, dtype=torch.float64)
    with pytest.raises(ValueError, match="route"):
        input_jacobian(model, x, route="jacfwd")
    with pytest.raises(ValueError, match="chunk"):
        input_jacobian(model, x, chunk=0)
    with pytest.raises(TypeError, match="dtype"):
        input_jacobian(model, x.to(torch.int64))
    bad = x.clone()
    bad[1, 0, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        input_jacobian(model, bad)
    with pytest.raises(TypeError, match="logits"):
        input_jacobian(TupleOut().eval(), x)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        input_jacobian(nn.Sequential(nn.Flatten(0)).eval(), x)


# ---------------------------------------------------------------------------------------------------------------
# Spectrum
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shape,C", [((1, 12, 12), 3), ((3, 8, 8), 10), ((1, 12, 12), 7)])
def test_spectrum_matches_brute_force(rng, head, shape, C):
    model = make(rng, shape, C)
    x = torch.randn(3, *shape, generator=rng, dtype=torch.float64)
    spec = ifim(model, x, head=head)
    r = C - 1 if head == "softmax" else C
    assert spec.eigenvalues.shape == (3, r) and spec.eigenvectors.shape == (3, r, *shape)
    assert spec.U.shape == (3, C, r) and spec.K.shape == (3, C, C) and spec.K.dtype == torch.float64
    p = head_probs(model(x), head).detach()
    assert float((p.max(1).values - p.min(1).values).mean()) > 0.01  # not the trivial uniform case
    for b, (w, V) in enumerate(brute_eig(model, x, head)):
        rank_bf = int((w > 1e-10 * w[0]).sum())
        assert int(spec.rank[b]) == rank_bf <= r
        lam = spec.eigenvalues[b].numpy()
        assert np.all(np.diff(lam) <= 0)
        assert rel_err(lam[:rank_bf], w[:rank_bf]) < 1e-6
        assert np.all(lam[rank_bf:] == 0)
        Vs = spec.eigenvectors[b].reshape(r, -1).numpy()
        # Whole nonzero eigenspace, then each leading eigenvector alone (random spectra are well separated).
        assert np.max(scipy.linalg.subspace_angles(Vs[:rank_bf].T, V[:, :rank_bf])) < 1e-6
        for i in range(min(rank_bf, 2)):
            assert abs(abs(Vs[i] @ V[:, i]) - 1) < 1e-8
        np.testing.assert_allclose(Vs[:rank_bf] @ Vs[:rank_bf].T, np.eye(rank_bf), atol=1e-8)
        assert np.all(Vs[rank_bf:] == 0)
        # Gx against the brute-force factor: |G x|^2 = x^T F x.
        xf = x[b].reshape(-1).numpy()
        F = brute_fisher(brute_jacobian(model, x[b : b + 1])[0].numpy(), p[b].numpy(), head)
        assert rel_err(spec.Gx[b].pow(2).sum().numpy(), xf @ F @ xf) < 1e-8


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_rank_deficient_head(rng, head):
    """A head of rank 2 among 7 classes: rank F = 2 (the tolerance finds it in float32 and float64)."""
    model = make(rng, (3, 8, 8), 7, rank=2)
    x = torch.randn(4, 3, 8, 8, generator=rng, dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        spec = ifim(model.to(dtype), x.to(dtype), head=head)
        assert spec.rank.tolist() == [2] * 4, dtype
        assert torch.all(spec.eigenvalues[:, 2:] == 0)
        assert torch.all(spec.eigenvectors[:, 2:] == 0)
        assert torch.all(spec.U[:, :, 2:] == 0)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_float32_path_matches_float64(rng, head):
    """The fp32 route (through drift_kernels dispatch) agrees with the float64 evaluation."""
    model = make(rng, (1, 12, 12), 5)
    x = torch.randn(3, 1, 12, 12, generator=rng, dtype=torch.float64)
    s64 = ifim(model, x, head=head)
    s32 = ifim(model.float(), x.float(), head=head)
    assert s32.eigenvalues.dtype == torch.float64 and s32.eigenvectors.dtype == torch.float32
    keep = s64.eigenvalues > 1e-4 * s64.eigenvalues[:, :1]
    torch.testing.assert_close(s32.eigenvalues[keep], s64.eigenvalues[keep], rtol=1e-3, atol=0)
    lead = (s32.eigenvectors[:, 0].double() * s64.eigenvectors[:, 0]).flatten(1).sum(1).abs()
    torch.testing.assert_close(lead, torch.ones_like(lead), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Components, quadratic form and KL
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
@pytest.mark.parametrize("k", [None, 2, 50])
def test_decompose_matches_brute_force(rng, head, k):
    shape, C = (3, 8, 8), 9
    model = make(rng, shape, C)
    x = torch.randn(3, *shape, generator=rng, dtype=torch.float64)
    energy = float(torch.empty(()).uniform_(0.5, 0.95, generator=rng))
    x_high, x_low, info = decompose(model, x, k=k, energy=energy, head=head)
    assert x_high.shape == x.shape and x_low.shape == x.shape
    torch.testing.assert_close(x_high + x_low, x, rtol=0, atol=1e-12)
    for b, (w, V) in enumerate(brute_eig(model, x, head)):
        rank = int((w > 1e-10 * w[0]).sum())
        wr = w[:rank]
        if k is None:
            kb = int(np.searchsorted(np.cumsum(wr) / wr.sum(), energy) + 1)
        else:
            kb = min(k, rank)
        assert int(info.k[b]) == kb
        xf = x[b].reshape(-1).numpy()
        Vk = V[:, :kb]
        ref_high = Vk @ (Vk.T @ xf)
        np.testing.assert_allclose(x_high[b].reshape(-1).numpy(), ref_high, atol=1e-8 * np.linalg.norm(xf))
        # x_low is orthogonal to the top-k eigenvectors.
        assert np.abs(Vk.T @ x_low[b].reshape(-1).numpy()).max() < 1e-8 * np.linalg.norm(xf)
        np.testing.assert_allclose(np.abs(info.coefficients[b, :rank].numpy()), np.abs(V[:, :rank].T @ xf), rtol=1e-6)
        assert abs(float(info.energy_share[b]) - wr[:kb].sum() / wr.sum()) < 1e-10
        assert abs(float(info.norm_share[b]) - ref_high @ ref_high / (xf @ xf)) < 1e-8


def test_decompose_from_jacobian_reuses_spectrum(rng):
    model, x, J, z, p = model_and_factors(rng, (1, 12, 12), 6, 4)
    spec = ifim_from_jacobian(J, p, x, eigenvectors=True)
    xh1, xl1, i1 = decompose_from_jacobian(J, p, x, k=3, spectrum=spec)
    xh2, _, i2 = decompose(model, x, k=3)
    torch.testing.assert_close(xh1, xh2, rtol=1e-9, atol=1e-12)
    # x_high equals the projection onto the engine's own eigenvectors.
    V = spec.eigenvectors[:, :3].flatten(2)
    ref = torch.einsum("brd,br->bd", V, torch.einsum("brd,bd->br", V, x.flatten(1)))
    torch.testing.assert_close(xh1.flatten(1), ref, rtol=1e-8, atol=1e-10)
    # Spectrum computed without x: G x recomputed, same answer.
    spec_nox = ifim_from_jacobian(J, p, None, eigenvectors=False)
    assert spec_nox.Gx is None
    xh3, _, _ = decompose_from_jacobian(J, p, x, k=3, spectrum=spec_nox)
    torch.testing.assert_close(xh3, xh1, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_fisher_apply_and_quadratic(rng, head):
    model, x, J, z, p = model_and_factors(rng, (3, 8, 8), 5, 3, head)
    X = torch.randn(3, 192, 4, generator=rng, dtype=torch.float64)
    GX = fisher_apply(J, p, X, head)
    d = torch.randn(3, 3, 8, 8, generator=rng, dtype=torch.float64)
    q = fisher_quadratic(J, p, d, head)
    for b in range(3):
        Jb, pb = J[b].numpy(), p[b].numpy()
        if head == "softmax":
            G = np.sqrt(pb)[:, None] * (Jb - pb @ Jb)
        else:
            G = np.sqrt(pb * (1 - pb))[:, None] * Jb
        np.testing.assert_allclose(GX[b].numpy(), G @ X[b].numpy(), rtol=1e-10, atol=1e-12)
        db = d[b].reshape(-1).numpy()
        assert rel_err(q[b].numpy(), 0.5 * db @ brute_fisher(Jb, pb, head) @ db) < 1e-10


def kl(z0, z1, head):
    """KL(p(z0) || p(z1)) in float64 SciPy: categorical over the classes (softmax), or the sum over classes of the
    two-outcome categorical of logits (z, 0), i.e. (sigmoid(z), 1 - sigmoid(z)) (sigmoid)."""
    a, b = z0.detach().double().numpy(), z1.detach().double().numpy()
    if head == "sigmoid":
        a, b = (np.stack([v, np.zeros_like(v)], -1) for v in (a, b))
    lp, lq = scipy.special.log_softmax(a, -1), scipy.special.log_softmax(b, -1)
    out = (np.exp(lp) * (lp - lq)).sum(-1)
    return torch.from_numpy(out if head == "softmax" else out.sum(-1))


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_kl_tends_to_second_order_prediction(rng, head):
    """KL / (1/2 d^T F d) - 1 = O(|d|): it shrinks tenfold per tenfold smaller eps."""
    model, x, J, z, p = model_and_factors(rng, (1, 12, 12), 4, 3, head)
    spec = ifim_from_jacobian(J, p, x, head)
    # A random direction and the top eigenvector: both must approach the prediction.
    for u in (torch.randn(x.shape, generator=rng, dtype=torch.float64), spec.eigenvectors[:, 0]):
        u = u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        errs = []
        for eps in (1e-1, 1e-2, 1e-3, 1e-4):
            d = eps * x.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * u
            with torch.no_grad():
                ratio = kl(z, model(x + d), head) / fisher_quadratic(J, p, d, head)
            errs.append(float((ratio - 1).abs().max()))
        assert errs[2] < 0.3 * errs[1] and errs[3] < 0.3 * errs[2] + 2e-4 and errs[3] < 5e-3, errs


def test_bad_input_messages(rng):
    model, x, J, z, p = model_and_factors(rng, (1, 12, 12), 4, 2)
    with pytest.raises(ValueError, match="head"):
        ifim_from_jacobian(J, p, x, head="tanh")
    with pytest.raises(ValueError, match=r"p must have shape"):
        ifim_from_jacobian(J, p[:, :3], x)
    with pytest.raises(ValueError, match="logits"):
        ifim_from_jacobian(J, z, x)  # logits passed for probabilities
    with pytest.raises(ValueError, match="x must have shape"):
        ifim_from_jacobian(J, p, x[:, :, :11])
    with pytest.raises(ValueError, match=r"J must have shape \(B, C, D\)"):
        ifim_from_jacobian(J[0], p, x)
    with pytest.raises(ValueError, match="rtol"):
        ifim_from_jacobian(J, p, x, rtol=-1.0)
    with pytest.raises(ValueError, match="k must"):
        decompose_from_jacobian(J, p, x, k=-1)
    with pytest.raises(ValueError, match="energy"):
        decompose_from_jacobian(J, p, x, energy=1.5)
    with pytest.raises(ValueError, match="C >= 2"):
        ifim_from_jacobian(J[:, :1], torch.ones(2, 1, dtype=torch.float64), x)
    with pytest.raises(TypeError, match="int32"):
        default_rtol(torch.int32)
