"""The controls of the iFIM claim (drift.directions.control_directions, drift.perturb): each control direction
against a brute-force construction, float64 outcomes at a saturated head (margin 10), the log-odds and margin
changes against an independent float64 computation, the KL ratio's local regime, the per-eps tests against scipy,
and the CAM region of the ``cam`` control."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch
from test_fisher import _one_blas_thread, brute_eig, brute_jacobian, make  # noqa: F401

from drift.directions import control_directions
from drift.fisher import head_probs, ifim_from_jacobian, input_jacobian
from drift.ifim_study import cam_regions
from drift.perturb import KINDS, LOCAL_RATIO, perturbation_directions, run_perturbations

SHAPE = (2, 7, 9)  # odd shapes: D = 126


@pytest.mark.parametrize("head,k", [("softmax", 2), ("sigmoid", 1)])
def test_control_directions_match_brute_force(rng, head, k):
    C, N, m = 6, 3, 2
    model = make(rng, SHAPE, C)
    x = torch.randn(N, *SHAPE, generator=rng, dtype=torch.float64)
    J, z = input_jacobian(model, x)
    p = head_probs(z, head)
    spec = ifim_from_jacobian(J, p, x, head, eigenvectors=False)
    kk = perturbation_directions(J, p, x, head, k=k, spectrum=spec).components.k
    region = torch.rand(N, *SHAPE, generator=rng) < 0.3
    ctrl = control_directions(J, p, x, spec, kk, head, m, seed=int(torch.randint(999, (1,), generator=rng)),
                              region=region)
    Jb = brute_jacobian(model, x).numpy()
    pb = p.detach().numpy()
    for b, (_w, V) in enumerate(brute_eig(model, x, head)):
        kb, rank = int(kk[b]), int(spec.rank[b])
        # (a) inside the span of the top-k right singular vectors of J
        _, _, Vt = np.linalg.svd(Jb[b])
        Wk = Vt[:kb].T
        u = ctrl["jacobian"][b].flatten(1).numpy().T  # (D, m)
        assert np.abs(u - Wk @ (Wk.T @ u)).max() < 1e-9
        # (b) +-grad log p_pred / |.|
        pred = int(pb[b].argmax())
        e = np.eye(C)[pred]
        g = Jb[b].T @ (e - pb[b]) if head == "softmax" else (1 - pb[b, pred]) * Jb[b, pred]
        g = g / np.linalg.norm(g)
        u = ctrl["gradient"][b].flatten(1).numpy()
        np.testing.assert_allclose(np.abs(u @ g), 1, atol=1e-10)
        # (c) zero outside the region
        u = ctrl["cam"][b].flatten(1).numpy()
        assert np.all(u[:, ~region[b].flatten().numpy()] == 0)
        # (d) inside span(G) = span(v_1 .. v_rank), orthogonal to v_1 .. v_k
        u = ctrl["span_rest"][b].flatten(1).numpy().T
        if rank > kb:
            Vr = V[:, :rank]
            assert np.abs(u - Vr @ (Vr.T @ u)).max() < 1e-8
            assert np.abs(V[:, :kb].T @ u).max() < 1e-8
        else:
            assert np.isnan(u).all()
        for kind in ("jacobian", "gradient", "cam"):
            np.testing.assert_allclose(ctrl[kind][b].flatten(1).norm(dim=1).numpy(), 1, atol=1e-12)


class Saturated(torch.nn.Module):
    """A float32 linear classifier whose logits at the inputs used have a margin of about 10."""

    def __init__(self, gen, D: int, C: int):
        super().__init__()
        self.W = torch.nn.Parameter(0.05 * torch.randn(C, D, generator=gen))
        self.b = torch.nn.Parameter(torch.zeros(C))
        with torch.no_grad():
            self.b[0] = 10.0

    def forward(self, x):
        return x.flatten(1) @ self.W.T + self.b


def test_outcomes_at_margin_10_are_nonzero_and_kl_non_negative(rng):
    D, C, N = 35, 4, 5
    model = Saturated(rng, D, C).eval()
    x = 0.1 * torch.randn(N, 5, 7, generator=rng)
    with torch.no_grad():
        z = model(x).double()
    margin = z[:, 0] - z[:, 1:].amax(1)
    assert margin.min() > 9.5
    eps = [1e-4, 1e-3, 0.05]
    res = run_perturbations(model, x, [0] * N, eps_grid=eps, alphas=[1.0], k=1, n_draws=2, seed=1)
    ok = np.isfinite(res.kl)
    assert np.all(res.kl[ok] >= 0)
    for kind in ("high", "random", "jacobian", "gradient"):
        i = KINDS.index(kind)
        assert np.all(res.abs_logodds_change[i] > 0), kind
        assert np.all(res.kl[i] > 0), kind
        assert np.all(res.abs_conf_change[i] > 0), kind
    # Independent float64 reference from the stored probabilities at x + d: log-odds and margin of class 0 (its
    # own rounding: log1p(-p) with 1 - p ~ 5e-5 carries ~2e-12 absolute error).
    logp = np.log(res.probs)
    lo1 = logp[..., 0] - np.log1p(-res.probs[..., 0])
    p0 = scipy.special.softmax(z.numpy(), axis=1)
    lo0 = np.log(p0[:, 0]) - np.log1p(-p0[:, 0])
    # (NaN only for the kinds without a direction: no CAM region given, and rank 3 = k + 2 leaves span_rest.)
    assert np.isnan(res.logodds_change[KINDS.index("cam")]).all()
    np.testing.assert_allclose(res.logodds_change[ok], (lo0[None, None, :, None] - lo1)[ok], rtol=1e-6, atol=1e-11)
    mg1 = logp[..., 0] - logp[..., 1:].max(-1)
    np.testing.assert_allclose(res.margin_change[ok], (margin.numpy()[None, None, :, None] - mg1)[ok], rtol=1e-6,
                               atol=1e-9)
    # The KL at the largest eps against scipy's relative entropy (whose cancellation leaves ~3e-16 absolute).
    kl_ref = scipy.special.rel_entr(p0[None, None, :, None], res.probs).sum(-1)
    np.testing.assert_allclose(res.kl[:, 2][ok[:, 2]], kl_ref[:, 2][ok[:, 2]], rtol=1e-6, atol=1e-14)


def test_kl_ratio_separates_the_local_regime(rng):
    model = make(rng, SHAPE, 5)
    x = torch.randn(4, *SHAPE, generator=rng, dtype=torch.float64)
    res = run_perturbations(model, x, [0, 1, 2, 3], eps_grid=[1e-5, 30.0], alphas=[1.0], k=2, n_draws=2, seed=2)
    s = res.summary()
    hi = KINDS.index("high")
    r = res.kl[hi] / res.kl_pred[hi]
    np.testing.assert_allclose(res.kl_ratio[hi], r)
    assert s["kl_ratio_high"][0] == pytest.approx(np.median(r[0]))
    assert LOCAL_RATIO[0] <= s["kl_ratio_high"][0] <= LOCAL_RATIO[1] and s["local"][0] == 1
    assert s["local"][1] == 0  # 30 |x|: far outside the quadratic regime, the KL saturates
    # Per-eps paired tests of high vs each control against scipy's Wilcoxon.
    for kind in KINDS[1:]:
        j = KINDS.index(kind)
        for e in range(2):
            for values, key in ((res.abs_logodds_change, "pvalue"), (np.abs(res.margin_change), "margin_pvalue")):
                a, b = values[j, e].mean(-1), values[hi, e].mean(-1)
                ok = np.isfinite(a) & np.isfinite(b)
                want = scipy.stats.wilcoxon(a[ok], b[ok]).pvalue if ok.sum() and np.any(a[ok] != b[ok]) else np.nan
                got = s[f"vs_{kind}_{key}"][e]
                assert (np.isnan(want) and (np.isnan(got) or got == 1.0)) or got == pytest.approx(want), (kind, key)


def test_cam_regions_hold_the_top_fraction(rng):
    maps = torch.rand(3, 4, 5, generator=rng).numpy()
    mask = cam_regions(maps, (2, 9, 11), 0.25)
    assert mask.shape == (3, 2, 9, 11) and mask.dtype == torch.bool
    up = torch.nn.functional.interpolate(torch.as_tensor(maps, dtype=torch.float64)[:, None], (9, 11),
                                         mode="bilinear", align_corners=False)[:, 0]
    for i in range(3):
        assert int(mask[i, 0].sum()) == int(np.ceil(0.25 * 99))
        assert torch.equal(mask[i, 0], mask[i, 1])
        assert up[i][mask[i, 0]].min() >= up[i][~mask[i, 0]].max()


@pytest.mark.parametrize("scale", [1e-9, 1e-4, 3.0])
def test_kl_matches_a_high_precision_reference_and_is_never_negative(rng, scale):
    import mpmath

    from drift.head_scores import kl_categorical, kl_from_logits

    z0 = 6 * torch.randn(40, 5, generator=rng, dtype=torch.float64)
    z1 = z0 + scale * torch.randn(40, 5, generator=rng, dtype=torch.float64)
    kl = kl_categorical(z0, z1).numpy()
    assert np.all(kl >= 0)
    assert np.all(kl_categorical(z0, z0).numpy() == 0)
    mpmath.mp.dps = 50
    for i in range(0, 40, 7):
        a = [mpmath.mpf(float(v)) for v in z0[i]]
        b = [mpmath.mpf(float(v)) for v in z1[i]]
        la, lb = mpmath.log(sum(mpmath.exp(v) for v in a)), mpmath.log(sum(mpmath.exp(v) for v in b))
        ref = sum(mpmath.exp(u - la) * ((u - la) - (v - lb)) for u, v in zip(a, b))
        assert kl[i] == pytest.approx(float(ref), rel=1e-6, abs=1e-300)
    # sigmoid: the sum of the Bernoulli KLs of each logit against scipy's relative entropy
    s0, s1 = scipy.special.expit(z0.numpy()), scipy.special.expit(z1.numpy())
    ref = (scipy.special.rel_entr(s0, s1) + scipy.special.rel_entr(1 - s0, 1 - s1)).sum(-1)
    got = kl_from_logits(z0, z1, "sigmoid").numpy()
    assert np.all(got >= 0)
    if scale > 1e-4:  # below that the reference's own cancellation dominates
        np.testing.assert_allclose(got, ref, rtol=1e-6)
