"""Selection, aggregation, paired tests and rank reversal against brute force, scipy and analytic facts."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from drift.stats import STABILITY_DIRECTION, aggregate, paired_test, rank_reversal, select_samples, stability


def _np_rng(rng):
    return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=rng)))


@pytest.mark.parametrize("rule", ["tp_both", "tp_either", "all"])
def test_select_samples_against_loop(rng, rule):
    y = torch.randint(0, 5, (123,), generator=rng)
    p1 = torch.where(torch.rand(123, generator=rng) < 0.6, y, torch.randint(0, 5, (123,), generator=rng))
    p2 = torch.where(torch.rand(123, generator=rng) < 0.6, y, torch.randint(0, 5, (123,), generator=rng))
    ref = []
    for a, b, c in zip(y.tolist(), p1.tolist(), p2.tolist()):
        ref.append({"tp_both": a == b and a == c, "tp_either": a == b or a == c, "all": True}[rule])
    got = select_samples(y, p1.numpy(), p2.tolist(), rule)
    assert got.dtype == bool and got.tolist() == ref


def test_select_samples_bad_input():
    with pytest.raises(ValueError, match="rule"):
        select_samples([0, 1], [0, 1], [0, 1], "tp")
    with pytest.raises(ValueError, match="one shape"):
        select_samples([0, 1], [0, 1], [0])
    with pytest.raises(TypeError, match="pred_tl.*integer"):
        select_samples([0, 1], [0.0, 1.0], [0, 1])


def test_aggregate_means_counts_and_exclusions(rng):
    g = _np_rng(rng)
    y = g.integers(0, 4, 137)
    y[y == 2] = 3  # class 2 absent: the macro mean is over the classes present
    v = g.normal(y * 1.5, 1.0)
    v[g.random(137) < 0.1] = np.nan
    res = aggregate(v, y, n_classes=5, n_boot=200, seed=3)
    ok = ~np.isnan(v)
    per_class = [v[ok & (y == c)].mean() if (ok & (y == c)).any() else np.nan for c in range(5)]
    np.testing.assert_allclose(res.per_class, per_class, rtol=1e-12)
    assert res.n_per_class.tolist() == [int((ok & (y == c)).sum()) for c in range(5)]
    assert res.n_excluded == int((~ok).sum())
    assert res.mean == pytest.approx(np.nanmean(per_class), rel=1e-12)
    # The sample statistic lies inside its own bootstrap interval; the same seed reproduces it exactly.
    assert res.lo < res.mean < res.hi
    again = aggregate(torch.from_numpy(v), torch.from_numpy(y), 5, n_boot=200, seed=3)
    assert (again.lo, again.hi) == (res.lo, res.hi)
    other = aggregate(v, y, 5, n_boot=200, seed=4)
    assert (other.lo, other.hi) != (res.lo, res.hi)
    d = res.as_dict()
    assert d["n_per_class"] == res.n_per_class.tolist() and d["n_excluded"] == res.n_excluded
    empty = aggregate(np.full(5, np.nan), np.zeros(5, dtype=int), 2)
    assert math.isnan(empty.mean) and math.isnan(empty.lo) and empty.n_excluded == 5


def test_bootstrap_interval_width_shrinks_like_standard_error(rng):
    g = _np_rng(rng)
    widths = {}
    for n in (60, 960):
        y = np.repeat(np.arange(3), n)
        sd = np.array([1.0, 2.0, 0.5])
        v = g.normal(np.array([0.0, 1.0, 3.0])[y], sd[y])
        res = aggregate(v, y, 3, n_boot=2000, seed=int(g.integers(1 << 30)))
        # Normal theory: the macro mean's standard error is sqrt(sum_c s_c^2 / n_c) / C.
        se = math.sqrt(sum(v[y == c].var(ddof=1) / n for c in range(3))) / 3
        widths[n] = res.hi - res.lo
        assert widths[n] == pytest.approx(2 * 1.959964 * se, rel=0.15)
    assert widths[960] < 0.35 * widths[60]  # 16x the samples: about a quarter of the width


def test_bootstrap_interval_covers_the_true_macro_mean(rng):
    g = _np_rng(rng)
    truth = np.array([0.2, 0.5, 0.9])
    true_macro = truth.mean()
    y = np.repeat(np.arange(3), [40, 25, 60])
    hits = 0
    trials = 300
    for _ in range(trials):
        v = g.normal(truth[y], 0.3)
        res = aggregate(v, y, 3, n_boot=400, seed=int(g.integers(1 << 30)))
        hits += res.lo <= true_macro <= res.hi
    # Nominal 95%; percentile intervals run slightly short at these sizes. The band is about 4 binomial SDs wide.
    assert 0.87 <= hits / trials <= 0.995


def test_aggregate_bad_input():
    with pytest.raises(ValueError, match=r"labels\[1\] = 5"):
        aggregate([0.1, 0.2], [0, 5], 5)
    with pytest.raises(ValueError, match="one shape"):
        aggregate([0.1, 0.2], [0], 5)
    with pytest.raises(ValueError, match="ci"):
        aggregate([0.1], [0], 2, ci=95)
    with pytest.raises(ValueError, match="n_boot"):
        aggregate([0.1], [0], 2, n_boot=-1)


def test_paired_test_against_independent_signed_ranks_and_scipy(rng):
    g = _np_rng(rng)
    tl = g.random(123)
    ft = tl + g.normal(0.05, 0.2, 123)
    ft[[3, 17]] = tl[[3, 17]]  # zero differences are discarded
    tl[5] = np.nan
    res = paired_test(tl, ft)
    ok = ~np.isnan(tl)
    d = (ft - tl)[ok]
    nz = d[d != 0]
    ranks = scipy.stats.rankdata(np.abs(nz))
    w = min(ranks[nz > 0].sum(), ranks[nz < 0].sum())
    assert res.statistic == pytest.approx(w)
    assert res.n == 122 and res.n_excluded == 1
    assert res.median_diff == pytest.approx(np.median(d))
    assert res.pvalue == pytest.approx(scipy.stats.wilcoxon(tl[ok], ft[ok]).pvalue, rel=1e-12)
    # Normal approximation of the signed-rank statistic (tie-corrected variance) as an independent check.
    n = nz.size
    _, counts = np.unique(np.abs(nz), return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24 - (counts**3 - counts).sum() / 48
    z = (w - n * (n + 1) / 4) / math.sqrt(var)
    assert res.pvalue == pytest.approx(2 * scipy.stats.norm.cdf(z), rel=0.05)


def test_paired_test_all_equal_and_empty():
    same = paired_test([0.3, 0.1, 0.7], [0.3, 0.1, 0.7])
    assert (same.statistic, same.pvalue, same.n) == (0.0, 1.0, 3)
    empty = paired_test([np.nan], [1.0])
    assert empty.n == 0 and empty.n_excluded == 1 and math.isnan(empty.pvalue)
    with pytest.raises(ValueError, match="paired"):
        paired_test([1.0, 2.0], [1.0])


def _study(g, means, n=150, sd=0.05, classes=3):
    """{arch: {method: (values, labels)}} with per-class values around the given macro means."""
    out = {}
    for arch, per_method in means.items():
        out[arch] = {}
        for method, mu in per_method.items():
            y = g.integers(0, classes, n)
            shift = np.linspace(-0.1, 0.1, classes)[y]  # class effects that cancel in the macro mean
            out[arch][method] = (g.normal(mu + shift, sd), y)
    return out


def test_rank_reversal_full_reversal(rng):
    g = _np_rng(rng)
    data = _study(g, {"A": {"lc": 0.9, "gpp": 0.2}, "B": {"lc": 0.5, "gpp": 0.5}, "C": {"lc": 0.2, "gpp": 0.9}})
    res = rank_reversal(data, n_classes=3, higher_is_stable=True, n_boot=300, seed=1)
    assert res.rankings == {"lc": ["A", "B", "C"], "gpp": ["C", "B", "A"]}
    key = ("lc", "gpp")
    assert res.reverses[key] and res.fully_reversed[key]
    ref = scipy.stats.kendalltau([res.means["lc"][a] for a in "ABC"], [res.means["gpp"][a] for a in "ABC"])
    assert res.kendall_tau[key] == pytest.approx(ref.statistic) == pytest.approx(-1.0)
    assert res.kendall_p[key] == pytest.approx(ref.pvalue)
    assert res.p_reverse[key] == 1.0 and res.p_fully_reversed[key] == 1.0
    # Lower-is-stable reads every ranking backwards; the disagreement between methods stays.
    low = rank_reversal(data, 3, higher_is_stable=False, n_boot=0)
    assert low.rankings == {"lc": ["C", "B", "A"], "gpp": ["A", "B", "C"]}
    assert low.fully_reversed[key] and math.isnan(low.p_reverse[key])


def test_rank_reversal_none_and_partial(rng):
    g = _np_rng(rng)
    same = _study(g, {"A": {"lc": 0.9, "gpp": 0.7}, "B": {"lc": 0.5, "gpp": 0.4}, "C": {"lc": 0.2, "gpp": 0.1}})
    res = rank_reversal(same, 3, True, n_boot=300, seed=2)
    key = ("lc", "gpp")
    assert not res.reverses[key] and not res.fully_reversed[key]
    assert res.kendall_tau[key] == pytest.approx(1.0)
    assert res.p_reverse[key] == 0.0
    partial = _study(g, {"A": {"lc": 0.9, "gpp": 0.5}, "B": {"lc": 0.5, "gpp": 0.9}, "C": {"lc": 0.2, "gpp": 0.2}})
    res = rank_reversal(partial, 3, True, n_boot=300, seed=2)
    assert res.rankings["gpp"] == ["B", "A", "C"]
    assert res.reverses[key] and not res.fully_reversed[key]
    assert res.kendall_tau[key] == pytest.approx(1 / 3)


def test_rank_reversal_bootstrap_probability_of_a_close_call(rng):
    g = _np_rng(rng)
    data = _study(g, {"A": {"lc": 0.5, "gpp": 0.9}, "B": {"lc": 0.5, "gpp": 0.2}}, n=60, sd=0.2)
    # Under "lc", B is A's own sample lowered by half the standard error of the difference: A ranks first, but
    # B overtakes it in about a third of the replicates (Phi(-0.5)), each one a reversal.
    v, y = data["A"]["lc"]
    data["B"]["lc"] = (v - 0.5 * math.sqrt(2) * _se(v, y), y)
    res = rank_reversal(data, 3, True, n_boot=1000, seed=5)
    key = ("lc", "gpp")
    assert res.rankings["lc"] == ["A", "B"] and not res.reverses[key]
    assert 0.15 < res.p_reverse[key] < 0.5
    # With two architectures a reversal of the top is a full reversal.
    assert res.p_fully_reversed[key] == res.p_reverse[key]
    # The probability follows the observed gap: the bootstrap means are roughly normal around the sample means.
    d = res.means["lc"]["A"] - res.means["lc"]["B"]
    se = math.hypot(_se(*data["A"]["lc"]), _se(*data["B"]["lc"]))
    expect = scipy.stats.norm.cdf(-d / se)  # P(B beats A under lc) = P(reversal), gpp's top (A) being certain
    assert res.p_reverse[key] == pytest.approx(expect, abs=0.08)
    assert rank_reversal(data, 3, True, n_boot=1000, seed=5).p_reverse == res.p_reverse


def _se(v, y):
    classes = np.unique(y)
    return math.sqrt(sum(v[y == c].var(ddof=1) / (y == c).sum() for c in classes)) / classes.size


def test_rank_reversal_absolute_and_errors(rng):
    g = _np_rng(rng)
    data = _study(g, {"A": {"lc": -0.6, "gpp": 0.1}, "B": {"lc": 0.3, "gpp": 0.5}})
    res = rank_reversal(data, 3, higher_is_stable=False, n_boot=0, absolute=True)
    assert res.rankings["lc"] == ["B", "A"]  # |-0.6| is the larger change
    v, y = data["A"]["lc"]
    assert res.means["lc"]["A"] == pytest.approx(np.mean([np.abs(v[y == c]).mean() for c in range(3)]), rel=1e-12)
    with pytest.raises(ValueError, match="'B' has methods"):
        rank_reversal({"A": data["A"], "B": {"lc": data["B"]["lc"]}}, 3, True)
    with pytest.raises(ValueError, match="at least two architectures"):
        rank_reversal({"A": data["A"]}, 3, True)
    nan = {"A": data["A"], "B": {"lc": (np.full(4, np.nan), np.zeros(4, int)), "gpp": data["B"]["gpp"]}}
    with pytest.raises(ValueError, match=r"values\['B'\]\['lc'\] has no finite value"):
        rank_reversal(nan, 3, True)


def test_stability_directions():
    assert stability("iou@10") == (True, False) and stability("iou@2.5") == (True, False)
    assert stability("centroid_shift") == (False, False)
    assert stability("entropy_change") == (False, True)
    assert all(STABILITY_DIRECTION[k] for k in ("pearson", "spearman", "ssim", "iou@05", "iou@30"))
    assert not STABILITY_DIRECTION["peak_shift"]
    with pytest.raises(ValueError, match="entropy_tl"):
        stability("entropy_tl")
