"""drift.perturb: directions against brute-force eigenvectors, removal, determinism, set metrics against sklearn."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch
from sklearn.metrics import accuracy_score, roc_auc_score
from test_fisher import _one_blas_thread, brute_eig, brute_fisher, brute_jacobian, make  # noqa: F401

import drift.ifim_study
import drift.perturb
from drift.fisher import decompose, head_probs, ifim, ifim_from_jacobian, input_jacobian
from drift.ifim_study import ifim_study
from drift.perturb import (
    KINDS,
    macro_auc,
    perturbation_directions,
    removal_inputs,
    run_perturbations,
)

SHAPE = (3, 8, 8)


def setup(rng, C=5, N=4, dtype=torch.float64, **kw):
    model = make(rng, SHAPE, C, dtype=dtype, **kw)
    x = torch.randn(N, *SHAPE, generator=rng, dtype=dtype)
    return model, x


@pytest.mark.parametrize("head,k", [("softmax", 2), ("sigmoid", None)])
def test_directions_unit_and_in_their_subspaces(rng, head, k):
    model, x = setup(rng, C=6)
    J, z = input_jacobian(model, x)
    p = head_probs(z, head)
    dirs = perturbation_directions(J, p, x, head, k=k, energy=0.8, n_draws=3, seed=int(torch.randint(99, (1,))))
    for name in KINDS[:3]:
        u = getattr(dirs, name).flatten(2)
        assert u.shape == (4, 3, 192)
        torch.testing.assert_close(u.norm(dim=-1), torch.ones(4, 3, dtype=torch.float64), rtol=0, atol=1e-12)
    for b, (_w, V) in enumerate(brute_eig(model, x, head)):
        kb = int(dirs.components.k[b])
        assert kb >= 1
        Vk = V[:, :kb]
        hi = dirs.high[b].flatten(1).numpy().T  # (D, m)
        co = dirs.complement[b].flatten(1).numpy().T
        rd = dirs.random[b].flatten(1).numpy().T
        assert np.abs(hi - Vk @ (Vk.T @ hi)).max() < 1e-8  # inside span(v_1..v_k)
        assert np.abs(Vk.T @ co).max() < 1e-10  # orthogonal to it
        assert np.abs(Vk.T @ rd).max() > 1e-3  # a random direction is neither
        # Draws differ from one another and from the other kinds.
        assert np.abs(hi[:, 0] - hi[:, 1]).max() > 1e-3 or kb == 1
        assert np.abs(co[:, 0] - co[:, 1]).max() > 1e-3


def test_removal_inputs_and_alpha_one_gives_x_low(rng):
    model, x = setup(rng, C=7)
    x_high, x_low, info = decompose(model, x, k=3)
    J, z = input_jacobian(model, x)
    dirs = perturbation_directions(J, head_probs(z), x, k=3, n_draws=2, seed=3)
    torch.testing.assert_close(dirs.x_high, x_high, rtol=1e-10, atol=1e-12)
    alphas = [0.0, 0.3, 1.0]
    hi, co = removal_inputs(x, dirs.x_high, dirs.complement, alphas)
    assert hi.shape == (3, 4, *SHAPE) and co.shape == (3, 4, 2, *SHAPE)
    torch.testing.assert_close(hi[2], x_low, rtol=0, atol=1e-12)
    torch.testing.assert_close(hi[0], x, rtol=0, atol=0)
    hn = x_high.flatten(1).norm(dim=1)
    for i, a in enumerate(alphas):
        removed = (x.unsqueeze(1) - co[i]).flatten(2).norm(dim=-1)  # (B, m)
        torch.testing.assert_close(removed, (a * hn).unsqueeze(1).expand(4, 2), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close((x - hi[i]).flatten(1).norm(dim=1), a * hn, rtol=1e-10, atol=1e-12)

    # End to end: the recorded outcome of alpha = 1 high removal is that of x_low.
    labels = torch.randint(7, (4,), generator=rng)
    res = run_perturbations(model, x, labels, eps_grid=[0.01], alphas=alphas, k=3, n_draws=2, seed=3)
    with torch.no_grad():
        p0, p_low = torch.softmax(model(x), 1), torch.softmax(model(x_low), 1)
    pred = p0.argmax(1, keepdim=True)
    expect = (p0.gather(1, pred) - p_low.gather(1, pred)).squeeze(1).numpy()
    np.testing.assert_allclose(res.removal_conf_change[0, 2], np.repeat(expect[:, None], 2, 1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.removal_conf_change[:, 0], 0, atol=1e-12)  # alpha = 0 changes nothing


def test_kl_prediction_matches_brute_force_fisher(rng):
    """kl_pred = 1/2 d^T F d with d = eps |x| u: checks the equal-norm scaling of every kind end to end."""
    model, x = setup(rng, C=4, N=3)
    eps = [0.003, 0.05]
    res = run_perturbations(model, x, [0, 1, 2], eps_grid=eps, alphas=[1.0], k=2, n_draws=2, seed=11, batch_size=2)
    J, z = input_jacobian(model, x)
    p = head_probs(z)
    dirs = perturbation_directions(J, p, x, k=2, n_draws=2, seed=11)
    Jb = brute_jacobian(model, x).numpy()
    for b in range(3):
        F = brute_fisher(Jb[b], p[b].numpy(), "softmax")
        xn = float(x[b].norm())
        for ki, kind in enumerate(KINDS[:3]):
            u = getattr(dirs, kind)[b].flatten(1).numpy()  # (m, D)
            quad = 0.5 * np.einsum("md,de,me->m", u, F, u)
            for e, ep in enumerate(eps):
                np.testing.assert_allclose(res.kl_pred[ki, e, b], (ep * xn) ** 2 * quad, rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_high_subspace_dominates_at_small_eps(rng, head):
    """With k = rank the complement holds no first- or second-order sensitivity: its KL and confidence change
    vanish faster than the high subspace's, and the high KL matches 1/2 d^T F d."""
    model, x = setup(rng, C=5, N=5)
    labels = torch.arange(5) % 5
    res = run_perturbations(model, x, labels, eps_grid=[1e-5, 1e-4], alphas=[0.5], k=10, head=head, n_draws=2)
    hi, co, rd = (KINDS.index(n) for n in ("high", "complement", "random"))
    assert np.all(res.k == res.rank)
    ratio = res.kl[hi] / res.kl_pred[hi]
    np.testing.assert_allclose(ratio, 1, atol=0.01)  # the O(|d|) remainder is ~1e-3 at eps = 1e-4
    assert abs(res.summary()["kl_ratio_small_eps"] - 1) < 0.005
    for e in range(2):
        assert res.kl[co, e].max() < 1e-3 * res.kl[hi, e].min()
        assert res.abs_conf_change[co, e].mean() < 1e-2 * res.abs_conf_change[hi, e].mean()
        assert res.kl[rd, e].mean() < res.kl[hi, e].mean()
    np.testing.assert_allclose(res.kl_pred[co], 0, atol=1e-8 * res.kl_pred[hi].max())
    s = res.summary()
    assert s["abs_confidence_gap"].shape == (2,) and np.all(s["abs_confidence_gap"] > 0)
    assert s["wilcoxon_n"] == 5 and s["wilcoxon_pvalue"] < 0.1  # all 5 pairs one way: exact p = 2 / 32


def test_set_metrics_match_sklearn(rng):
    C = 4
    model, x = setup(rng, C=C, N=9, dtype=torch.float32)
    labels = torch.cat([torch.arange(C), torch.randint(C, (5,), generator=rng)])
    res = run_perturbations(model, x, labels, eps_grid=[0.05, 0.2, 0.5], alphas=[0.0, 1.0], n_draws=2, seed=5)
    y = labels.numpy()
    assert res.valid.all()
    for ki in range(3):
        for e in range(3):
            for t in range(2):
                pr = res.probs[ki, e, :, t]
                assert res.accuracy[ki, e, t] == pytest.approx(accuracy_score(y, pr.argmax(1)))
                ref = roc_auc_score(y, pr / pr.sum(1, keepdims=True), multi_class="ovr", average="macro")
                assert res.auc[ki, e, t] == pytest.approx(ref, abs=1e-9)
                flips = pr.argmax(1) != res.clean_pred
                np.testing.assert_array_equal(res.flip[ki, e, :, t], flips)
                p_pred = res.clean_probs[np.arange(9), res.clean_pred] - pr[np.arange(9), res.clean_pred]
                # conf_change comes from float64 logits; the reference subtracts two probabilities stored in
                # float32, each rounded by up to 2^-24 of its value (<= 1): atol covers both roundings.
                np.testing.assert_allclose(res.conf_change[ki, e, :, t], p_pred, rtol=1e-6, atol=2 * 2.0**-24 + 1e-9)
    assert res.clean_accuracy == pytest.approx(accuracy_score(y, res.clean_probs.argmax(1)))
    np.testing.assert_allclose(res.curves["accuracy"], res.accuracy.mean(-1))
    np.testing.assert_allclose(res.curves["flip"][:3], res.flip[:3].mean(axis=(2, 3)))
    assert np.isnan(res.flip[KINDS.index("cam")]).all() and np.isnan(res.accuracy[KINDS.index("cam")]).all()
    # Summary areas and the paired test, recomputed with scipy from the per-sample arrays.
    s = res.summary()
    np.testing.assert_allclose(s["area_kl"], scipy.integrate.trapezoid(res.curves["kl"], res.eps, axis=-1))
    per = scipy.integrate.trapezoid(res.abs_conf_change.mean(-1), res.eps, axis=1)  # (3, N)
    ref = scipy.stats.wilcoxon(per[0], per[1])
    assert s["wilcoxon_pvalue"] == pytest.approx(ref.pvalue) and s["wilcoxon_statistic"] == pytest.approx(ref.statistic)
    # Flat export: numpy arrays only, HDF5-compatible dtypes.
    flat = res.to_arrays()
    assert all(isinstance(v, np.ndarray) and v.dtype.kind in "biufS" for v in flat.values())
    np.testing.assert_array_equal(flat["conf_change"], res.conf_change)
    assert flat["kinds"].tolist() == [k.encode() for k in KINDS]
    assert KINDS == ("high", "complement", "random", "jacobian", "gradient", "cam", "span_rest")


def test_macro_auc_guards_absent_classes(rng):
    gen = np.random.default_rng(int(torch.randint(2**31, (1,), generator=rng)))
    scores = gen.random((17, 5))
    labels = gen.choice([0, 2, 3], size=17)
    labels[:3] = [0, 2, 3]
    ref = np.mean([roc_auc_score(labels == c, scores[:, c]) for c in (0, 2, 3)])
    assert macro_auc(labels, scores) == pytest.approx(ref)
    assert np.isnan(macro_auc(np.zeros(17, dtype=int), scores))  # one class only: no AUC at all


def test_deterministic_by_seed(rng):
    model, x = setup(rng, C=5, N=5)
    labels = torch.randint(5, (5,), generator=rng)
    kw = dict(eps_grid=[0.02, 0.1], alphas=[0.5, 1.0], n_draws=2)
    a = run_perturbations(model, x, labels, seed=7, batch_size=2, **kw).to_arrays()
    b = run_perturbations(model, x, labels, seed=7, batch_size=2, **kw).to_arrays()
    c = run_perturbations(model, x, labels, seed=7, batch_size=5, **kw).to_arrays()
    d = run_perturbations(model, x, labels, seed=8, batch_size=2, **kw).to_arrays()
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    # Draws are per sample, so the batch size changes only float rounding.
    for key in ("kl", "conf_change", "kl_pred", "probs", "removal_kl"):
        np.testing.assert_allclose(c[key], a[key], rtol=1e-9, atol=1e-15, err_msg=key)
    assert not np.allclose(d["kl"], a["kl"])


class Saturating(torch.nn.Module):
    """Logits W x scaled by 1 + 1e4 x_0^2: where x_0 is large the softmax is exactly one-hot in float64, so F = 0."""

    def __init__(self, gen, D, C):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(C, D, generator=gen, dtype=torch.float64))

    def forward(self, x):
        xf = x.flatten(1)
        return (1 + 1e4 * xf[:, :1] ** 2) * (xf @ self.W.T)


def test_empty_subspace_is_counted_not_scored(rng):
    """A sample whose F is exactly 0 has no high-sensitivity subspace: NaN for it, a warning, set metrics without it."""
    model = Saturating(rng, 20, 3).eval()
    x = torch.randn(4, 20, generator=rng, dtype=torch.float64)
    x[:, 0] = torch.tensor([0.0, 3.0, 0.0, 0.0])
    labels = np.array([0, 1, 2, 1])
    assert ifim_from_jacobian(*_jp(model, x), x).rank.tolist()[1] == 0
    with pytest.warns(RuntimeWarning, match="1 of 4 samples have an empty high-sensitivity subspace"):
        res = run_perturbations(model, x, labels, eps_grid=[0.01, 0.1], alphas=[1.0], n_draws=2)
    np.testing.assert_array_equal(res.valid, [True, False, True, True])
    assert np.all(np.isnan(res.kl[0][:, 1])) and np.all(np.isnan(res.removal_kl[:, :, 1]))
    assert np.all(np.isfinite(res.kl[0][:, [0, 2, 3]])) and np.all(np.isfinite(res.kl[1:3]))
    keep = [0, 2, 3]
    for e in range(2):
        pr = res.probs[2, e, keep, 0]
        assert res.accuracy[2, e, 0] == pytest.approx(accuracy_score(labels[keep], pr.argmax(1)))
    s = res.summary()
    assert s["n_valid"] == 3 and s["wilcoxon_n"] == 3
    np.testing.assert_allclose(res.curves["kl"][0], np.nanmean(res.kl[0][:, keep], axis=(1, 2)))


def _jp(model, x):
    J, z = input_jacobian(model, x)
    return J, head_probs(z)


def test_bad_arguments(rng):
    model, x = setup(rng, C=3, N=2)
    with pytest.raises(ValueError, match="labels"):
        run_perturbations(model, x, [0, 1, 2])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        run_perturbations(model, x, [0, 3])
    with pytest.raises(ValueError, match="eps_grid"):
        run_perturbations(model, x, [0, 1], eps_grid=[-0.1])
    with pytest.raises(ValueError, match="alphas"):
        run_perturbations(model, x, [0, 1], alphas=[1.5])
    with pytest.raises(ValueError, match="n_draws"):
        run_perturbations(model, x, [0, 1], n_draws=0)
    with pytest.raises(ValueError, match="head"):
        run_perturbations(model, x, [0, 1], head="relu")
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        run_perturbations(model, x, [0, 1])


def _three_calls(model, x, labels, n, m, bs, head, energy, **kw):
    """The study as three separate computations, each differentiating its own images: ifim over batches of the
    first n, run_perturbations over the first m, decompose over batches of the first m."""
    spectra = [ifim(model, x[lo : min(n, lo + bs)], head=head) for lo in range(0, n, bs)]
    pert = run_perturbations(model, x[:m], labels[:m], energy=energy, head=head, batch_size=bs, **kw)
    parts = [decompose(model, x[lo : min(m, lo + bs)], energy=energy, head=head) for lo in range(0, m, bs)]
    return {
        "eigenvalues": torch.cat([s.eigenvalues for s in spectra]),
        "rank": torch.cat([s.rank for s in spectra]),
        "probs": torch.cat([s.probs for s in spectra]),
        "x_high": torch.cat([h for h, _, _ in parts]),
        "k": torch.cat([c.k for _, _, c in parts]),
        "energy_share": torch.cat([c.energy_share for _, _, c in parts]),
        "coefficients": torch.cat([c.coefficients for _, _, c in parts]),
    }, pert.to_arrays()


@pytest.mark.parametrize(
    "head,n,m,bs",
    [
        ("softmax", 6, 6, 4),  # every batch shared
        ("sigmoid", 3, 8, 3),  # more perturbed images than spectra, batches aligned
        ("softmax", 7, 5, 3),  # the spectrum's batch [3, 6) holds the last perturbed images 3, 4
        ("sigmoid", 5, 9, 4),  # the perturbation's batch [4, 8) holds the last spectrum image 4
    ],
)
def test_study_equals_the_three_separate_computations(rng, monkeypatch, head, n, m, bs):
    """ifim_study differentiates each image once and reproduces the three computations it replaces.

    Bit for bit where their batches coincide. Where min(n, m) is not a multiple of the batch size, the separate
    computations differentiated the images of the straddling batch twice, in batches of two sizes, and the CPU
    backend's Jacobians then differ in the last bits; the study keeps the larger set's batch, so that set stays
    bit for bit and the smaller one agrees to float64 rounding."""
    C, shape = int(torch.randint(3, 8, (1,), generator=rng)), (3, 9, 7)
    model = make(rng, shape, C)
    N = max(n, m)
    x = torch.randn(N, *shape, generator=rng, dtype=torch.float64)
    labels = torch.randint(C, (N,), generator=rng)
    kw = dict(eps_grid=[0.02, 0.1], alphas=[0.5, 1.0], n_draws=2, seed=int(torch.randint(999, (1,), generator=rng)))
    want, want_pert = _three_calls(model, x, labels, n, m, bs, head, energy=0.8, **kw)

    differentiated = []

    def counting(model, xb, *a, **k):
        differentiated.append(len(xb))
        return input_jacobian(model, xb, *a, **k)

    monkeypatch.setattr(drift.ifim_study, "input_jacobian", counting)
    got = ifim_study(model, lambda idx: x[torch.as_tensor(idx)], labels[:m], n, m, energy=0.8, head=head,
                     batch_size=bs, **kw)
    assert differentiated == [min(bs, N - lo) for lo in range(0, N, bs)]

    aligned = n == m or min(n, m) % bs == 0
    for name, value in want.items():
        component = name in ("x_high", "k", "energy_share", "coefficients")
        on = got.components if name in ("k", "energy_share", "coefficients") else got
        if aligned or (m >= n) == component:
            assert torch.equal(getattr(on, name), value), name
        elif name == "coefficients":
            # v_i^T x = u_i^T (G x) / sqrt(lambda_i): rounding in G x is amplified by 1 / sqrt(lambda_i), so the
            # trailing (smallest-eigenvalue) coefficients agree to float64 rounding times that condition only.
            # Here m < n, so the spectrum of every component image is known.
            lam = want["eigenvalues"][: value.shape[0], : value.shape[1]].clamp_min(1e-300)
            bound = 1e-13 * (1 + value.abs().amax(1, keepdim=True)) * (lam[:, :1] / lam).sqrt()
            assert ((getattr(on, name) - value).abs() <= bound).all(), name
        else:
            torch.testing.assert_close(getattr(on, name), value, rtol=1e-12, atol=1e-15, msg=name)
    assert torch.equal(got.x, x[:m])
    pert = got.perturbation.to_arrays()
    assert pert.keys() == want_pert.keys()
    for key, value in want_pert.items():
        if aligned or m >= n or value.dtype.kind not in "fc":
            np.testing.assert_array_equal(pert[key], value, err_msg=key)
        else:
            np.testing.assert_allclose(pert[key], value, rtol=1e-9, atol=1e-15, err_msg=key)


def test_study_shared_between_processes_equals_one_process(rng):
    """Batches dealt out to two processes (even and odd batch numbers) and gathered back give the one-process
    study bit for bit, batches without perturbed images included."""
    C, shape = 4, (2, 7, 5)
    model = make(rng, shape, C)
    x = torch.randn(9, *shape, generator=rng, dtype=torch.float64)
    labels = torch.randint(C, (3,), generator=rng)
    kw = dict(eps_grid=[0.05], alphas=[1.0], n_draws=2, batch_size=2)

    def study(**extra):
        return ifim_study(model, lambda idx: x[torch.as_tensor(idx)], labels, 9, 3, **kw, **extra)

    class Gathered(Exception):
        pass

    odd = []

    def keep(parts):
        odd.extend(parts)
        raise Gathered

    with pytest.raises(Gathered):
        study(schedule=lambda starts: starts[1::2], gather=keep)
    assert len(odd) == 2

    def merge(even):
        return [p for pair in itertools.zip_longest(even, odd) for p in pair if p is not None]

    shared, alone = study(schedule=lambda starts: starts[0::2], gather=merge), study()
    for name in ("eigenvalues", "rank", "probs", "x", "x_high"):
        assert torch.equal(getattr(shared, name), getattr(alone, name)), name
    assert shared.eigenvalues.shape[0] == 9 and shared.x_high.shape == (3, *shape)
    for name in ("k", "coefficients", "energy_share", "norm_share"):
        assert torch.equal(getattr(shared.components, name), getattr(alone.components, name)), name
    a, b = shared.perturbation.to_arrays(), alone.perturbation.to_arrays()
    for key in b:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
