"""Systematic drift against seed noise, contrasts, Holm and the energy test (drift.stats.systematic, .contrast),
each against a brute-force or textbook reference, and the estimator's coverage and power by simulation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.stats
import torch

from drift import stats
from drift.metrics import centroid_shift, pearson, topk_iou
from drift.stats.contrast import contrast, holm, reversal


def _brute(d_tl, d_ft, ok=None):
    m, n = d_tl.shape
    ok = np.ones(n, bool) if ok is None else ok
    drift = np.mean([d_tl[r, ok].mean() for r in range(m)])
    pairs = [(r, s) for r in range(m) for s in range(r + 1, m)]
    noise = 0.5 * np.mean([0.5 * (d_ft[r, s, ok] + d_ft[s, r, ok]).mean() for r, s in pairs])
    return drift - noise, noise, drift


def _sym(rng, m, n):
    d = rng.uniform(0, 2, size=(m, m, n))
    d = d + d.transpose(1, 0, 2)
    d[np.arange(m), np.arange(m)] = rng.uniform(5, 9, size=(m, n))  # the diagonal must not be read
    return d


@pytest.mark.parametrize("m,n", [(2, 13), (3, 37), (5, 21)])
def test_estimate_noise_and_share_match_the_formula(nrng, m, n):
    d_tl = nrng.uniform(0, 3, size=(m, n))
    d_ft = _sym(nrng, m, n)
    d_tl[1, 4] = np.nan  # an image degenerate under one model leaves every term
    r = stats.systematic_drift(d_tl, d_ft)
    ok = np.isfinite(d_tl).all(0)
    est, noise, drift = _brute(d_tl, d_ft, ok)
    assert r.n_images == ok.sum() and r.n_models == m
    assert r.estimate == pytest.approx(est, rel=1e-12)
    assert r.sigma2 == pytest.approx(noise, rel=1e-12)
    assert r.drift == pytest.approx(drift, rel=1e-12)
    assert r.noise_share == pytest.approx(noise / drift, rel=1e-12)
    assert r.low < r.estimate < r.high
    assert r.models_resampled == (m >= 3)


def test_macro_weights_and_the_model_jackknife_match_a_brute_force(nrng):
    m, n = 4, 29
    d_tl, d_ft = nrng.uniform(0, 3, size=(m, n)), _sym(nrng, m, n)
    labels = nrng.integers(0, 3, size=n)
    r = stats.systematic_drift(d_tl, d_ft, labels)
    classes = np.unique(labels)

    def macro(v):
        return np.mean([v[labels == c].mean() for c in classes])

    def s_of(models):
        pairs = list(itertools.combinations(models, 2))
        return (np.mean([macro(d_tl[k]) for k in models])
                - 0.5 * np.mean([macro(0.5 * (d_ft[a, b] + d_ft[b, a])) for a, b in pairs]))

    assert r.estimate == pytest.approx(s_of(range(m)), rel=1e-12)
    loo = np.array([s_of([k for k in range(m) if k != j]) for j in range(m)])
    assert r.se_models ** 2 == pytest.approx((m - 1) / m * ((loo - loo.mean()) ** 2).sum(), rel=1e-10)
    per = d_tl.mean(0) - 0.5 * np.mean([d_ft[a, b] for a, b in itertools.combinations(range(m), 2)], axis=0)
    var_img = sum((1 / len(classes)) ** 2 * per[labels == c].var(ddof=1) / (labels == c).sum() for c in classes)
    assert r.se_images ** 2 == pytest.approx(var_img, rel=1e-10)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least two fine-tuned models"):
        stats.systematic_drift(np.zeros((1, 5)), np.zeros((1, 1, 5)))
    with pytest.raises(ValueError, match=r"\(M, M, N\) = \(3, 3, 5\)"):
        stats.systematic_drift(np.zeros((3, 5)), np.zeros((3, 3, 4)))
    with pytest.raises(ValueError, match=r"d_tl must have shape \(M, N\)"):
        stats.systematic_drift(np.zeros(5), np.zeros((3, 3, 5)))


def _simulate(rng, m, n=60, p=6, share=0.6, delta2=0.0):
    """Maps as points: FT_r = delta + g_r + h_{r,i} (g shared by a model's images), TL at 0; sigma^2 = 1."""
    g = rng.normal(size=(m, 1, p)) * math.sqrt(share / p)
    h = rng.normal(size=(m, n, p)) * math.sqrt((1 - share) / p)
    u = rng.normal(size=(n, p))
    delta = u / np.linalg.norm(u, axis=1, keepdims=True) * math.sqrt(delta2)
    ft = delta + g + h
    return (ft ** 2).sum(-1), ((ft[:, None] - ft[None]) ** 2).sum(-1)


def test_coverage_under_seed_noise_and_power_at_twice_the_seed_variance(nrng):
    """The issue's acceptance: the 95% interval covers 0 in >= 90% of seed-noise-only draws, and excludes 0 in
    >= 80% with a planted change of 2 sigma^2 and R = 3 replicas (M = 4)."""
    draws = 300
    cover = np.mean([(lambda r: r.low <= 0 <= r.high)(stats.systematic_drift(*_simulate(nrng, 4)))
                     for _ in range(draws)])
    power = np.mean([stats.systematic_drift(*_simulate(nrng, 4, delta2=2.0)).low > 0 for _ in range(draws)])
    assert cover >= 0.9, cover
    assert power >= 0.8, power


def test_euclidean_readings_are_squared_distances(nrng):
    """1 - r, the squared centroid shift and 1 - Dice of top-k sets are squared distances of a representation."""
    b, h, w = 7, 9, 11
    a = torch.rand(b, h, w, dtype=torch.float64)
    c = torch.rand(b, h, w, dtype=torch.float64)
    z = [(x - x.mean((1, 2), keepdim=True)) / x.std((1, 2), unbiased=False, keepdim=True) for x in (a, c)]
    want = ((z[0] - z[1]) ** 2).sum((1, 2)) / (2 * h * w)
    got = stats.euclidean_instability("pearson", pearson(a, c).numpy())
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)
    k = int(0.2 * h * w)  # 19 pixels: no tie in continuous random maps
    iou = topk_iou(a.float(), c.float(), (k / (h * w),))[:, 0].numpy()
    ua = torch.zeros(b, h * w).scatter_(1, a.reshape(b, -1).topk(k).indices, 1.0)
    uc = torch.zeros(b, h * w).scatter_(1, c.reshape(b, -1).topk(k).indices, 1.0)
    np.testing.assert_allclose(stats.euclidean_instability("iou@17.5", iou), ((ua - uc) ** 2).sum(1) / (2 * k),
                               rtol=1e-6)
    shift = centroid_shift(a, c).numpy()
    np.testing.assert_allclose(stats.euclidean_instability("centroid_shift", shift), shift ** 2)
    with pytest.raises(ValueError, match="ssim"):
        stats.euclidean_instability("ssim", [0.5])


def test_contrast_with_one_model_is_the_paired_t_test(nrng):
    n = 41
    x, y = nrng.normal(0.3, 1, size=n), nrng.normal(0, 1, size=n)
    c = contrast([(1, x), (-1, y)])
    t = scipy.stats.ttest_rel(x, y)
    assert c.estimate == pytest.approx(np.mean(x - y))
    assert c.p_above == pytest.approx(scipy.stats.ttest_rel(x, y, alternative="greater").pvalue, rel=1e-9)
    assert c.p_below == pytest.approx(scipy.stats.ttest_rel(x, y, alternative="less").pvalue, rel=1e-9)
    q = scipy.stats.t.ppf(0.975, n - 1)
    assert (c.low, c.high) == pytest.approx((np.mean(x - y) - q * np.std(x - y, ddof=1) / math.sqrt(n),
                                             np.mean(x - y) + q * np.std(x - y, ddof=1) / math.sqrt(n)))
    assert c.df == n - 1 and not c.models_resampled and t.df == n - 1


def test_contrast_model_part_combines_a_groups_terms(nrng):
    m, n = 3, 23
    x1, x2, y = (nrng.normal(size=(m, n)) for _ in range(3))
    c = contrast([(1, x1, "a"), (-1, x2, "a"), (1, y, "b")])
    per_img = x1.mean(0) - x2.mean(0) + y.mean(0)
    ua, ub = x1.mean(1) - x2.mean(1), y.mean(1)  # per-model means of each group's terms
    var = per_img.var(ddof=1) / n + ua.var(ddof=1) / m + ub.var(ddof=1) / m
    assert c.estimate == pytest.approx(per_img.mean())
    assert c.se ** 2 == pytest.approx(var, rel=1e-10)
    assert c.models_resampled


def test_holm_matches_the_step_down_definition(nrng):
    p = nrng.uniform(0, 0.2, size=9)
    p[3] = np.nan
    got = holm(p)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok])]
    k = ok.size
    want = np.full(p.shape, np.nan)
    for j, i in enumerate(order):
        want[i] = min(1.0, max((k - jj) * p[order[jj]] for jj in range(j + 1)))
    np.testing.assert_allclose(got, want)


def test_reversal_reads_direction_and_intersection_union_p(nrng):
    n = 50
    base = nrng.normal(size=n)
    x = {"a": {"m1": base + 0.5, "m2": base + 0.5 + nrng.normal(0, 0.1, n)},
         "b": {"m1": base + 1.0 + nrng.normal(0, 0.1, n), "m2": base + 0.0}}
    r = reversal("a", "b", "m1", "m2", x)
    assert r.d1.estimate < 0 < r.d2.estimate
    assert r.direction == "a more stable under m1, b under m2"
    assert r.p_value == pytest.approx(max(r.d1.p_below, r.d2.p_above))
    assert r.interaction.estimate == pytest.approx(r.d1.estimate - r.d2.estimate)
    same = reversal("a", "b", "m1", "m2", {"a": {"m1": base, "m2": base}, "b": {"m1": base + 1, "m2": base + 1}})
    assert same.p_value == 1.0 and same.direction == ""


def _energy_brute(tt, ff, tf, phase_swap):
    r = tt.shape[0]
    models = [("tl", i) for i in range(r)] + [("ft", i) for i in range(r)]

    def d(x, y):
        (px, i), (py, j) = x, y
        if px == py:
            return (tt if px == "tl" else ff)[i, j].mean()
        return tf[i, j].mean() if px == "tl" else tf[j, i].mean()

    lab = {m: (m[0] == "ft") ^ bool(phase_swap[m[1]]) for m in models}
    tl = [m for m in models if not lab[m]]
    ft = [m for m in models if lab[m]]
    cross = np.mean([d(x, y) for x in tl for y in ft])
    wt = np.mean([d(x, y) for x in tl for y in tl if x != y])
    wf = np.mean([d(x, y) for x in ft for y in ft if x != y])
    return 2 * cross - wt - wf


def test_energy_test_matches_a_brute_force_enumeration(nrng):
    r, n = 4, 9
    tt, ff = _sym(nrng, r, n), _sym(nrng, r, n)
    tf = nrng.uniform(0.5, 3, size=(r, r, n))
    tt[np.arange(r), np.arange(r)] = np.nan  # the diagonals (a model against itself) are never read
    ff[np.arange(r), np.arange(r)] = np.nan
    res = stats.energy_test(tt, ff, tf)
    assert res.statistic == pytest.approx(_energy_brute(np.nan_to_num(tt), np.nan_to_num(ff), tf, [0] * r))
    perms = [_energy_brute(np.nan_to_num(tt), np.nan_to_num(ff), tf, sw) for sw in itertools.product((0, 1), repeat=r)]
    assert res.p_value == pytest.approx(np.mean(np.asarray(perms) >= res.statistic - 1e-12))
    assert res.n_permutations == 2 ** r and res.min_p == pytest.approx(2 / 2 ** r)
    with pytest.raises(ValueError, match="at least two chains"):
        stats.energy_test(tt[:1, :1], ff[:1, :1], tf[:1, :1])


def test_cosine_and_exchange_forms_match_their_formulas(nrng):
    m, n = 4, 31
    d_tl = nrng.uniform(0.05, 0.5, size=(m, n))
    d_ft = _sym(nrng, m, n) * 0.2
    labels = nrng.integers(0, 3, size=n)
    classes = np.unique(labels)

    def macro(v):
        return np.mean([v[labels == c].mean() for c in classes])

    a = np.mean([macro(d_tl[k]) for k in range(m)])
    b = np.mean([macro(0.5 * (d_ft[i, j] + d_ft[j, i])) for i, j in itertools.combinations(range(m), 2)])
    cos = stats.systematic_drift(d_tl, d_ft, labels, form="cosine")
    assert cos.estimate == pytest.approx(1 - (1 - a) / math.sqrt(1 - b), rel=1e-12)
    assert cos.sigma2 == pytest.approx(a - cos.estimate, rel=1e-12)
    ex = stats.systematic_drift(d_tl, d_ft, labels, form="exchange")
    assert ex.estimate == pytest.approx(a - b, rel=1e-12) and ex.sigma2 == pytest.approx(b, rel=1e-12)
    with pytest.raises(ValueError, match="form must be one of"):
        stats.systematic_drift(d_tl, d_ft, form="ratio")
    assert [stats.systematic_form(k) for k in ("pearson", "iou@20", "centroid_shift")] == \
        ["cosine", "exchange", "euclidean"]


def test_on_a_sphere_only_the_cosine_form_covers_zero(nrng):
    """Known answer: standardised maps are points on a sphere; replicas FT_r = normalise(TL + noise) have no
    systematic change, yet the mean of points on a sphere lies inside it, so a - b/2 is biased upwards while the
    disattenuated form is not."""
    p, n, m, draws = 40, 80, 4, 200
    cover = {"euclidean": 0, "cosine": 0}
    for _ in range(draws):
        tl = nrng.normal(size=(n, p))
        tl /= np.linalg.norm(tl, axis=1, keepdims=True)
        ft = tl + 0.6 * nrng.normal(size=(m, n, p)) / math.sqrt(p) + 0.3 * nrng.normal(size=(m, 1, p)) / math.sqrt(p)
        ft /= np.linalg.norm(ft, axis=2, keepdims=True)
        d_tl = 1 - np.einsum("np,mnp->mn", tl, ft)  # 1 - cosine
        d_ft = 1 - np.einsum("anp,bnp->abn", ft, ft)
        for form in cover:
            r = stats.systematic_drift(d_tl, d_ft, form=form)
            cover[form] += r.low <= 0 <= r.high
    assert cover["cosine"] / draws >= 0.9, cover
    assert cover["euclidean"] / draws < 0.5, cover
