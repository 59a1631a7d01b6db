"""Selection, aggregation, paired tests and rank reversal against brute force, scipy and analytic facts."""

import dataclasses
import math

import numpy as np
import pytest
import scipy.stats
import torch

from drift.stats import (
    SELECTION_RULES,
    RankReversal,
    aggregate,
    area,
    bootstrap,
    common_sample,
    macro_auc,
    macro_auc_rows,
    mean_band,
    paired_test,
    percentile_interval,
    rank_reversal,
    resample,
    select_samples,
)
from drift.stats.ranking import _boot_images


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
    # One architecture's predictions cannot define the sample common to all of them.
    assert "tp_all" in SELECTION_RULES
    with pytest.raises(ValueError, match="tp_all.*every architecture.*common_sample"):
        select_samples([0, 1], [0, 1], [0, 1], "tp_all")


def test_common_sample_against_loop(rng):
    g = _np_rng(rng)
    n, n_archs = 131, 3
    y = g.integers(0, 4, n)
    preds = [tuple(np.where(g.random(n) < 0.8, y, g.integers(0, 4, n)) for _ in range(2)) for _ in range(n_archs)]
    ref = [all(y[i] == tl[i] and y[i] == ft[i] for tl, ft in preds) for i in range(n)]
    got = common_sample(torch.from_numpy(y), [(torch.from_numpy(tl), ft.tolist()) for tl, ft in preds])
    assert got.dtype == bool and got.tolist() == ref
    assert 0 < got.sum() < n  # neither trivial outcome
    # Never more than one architecture's own tp_both sample.
    for tl, ft in preds:
        assert not (got & ~select_samples(y, tl, ft, "tp_both")).any()
    with pytest.raises(ValueError, match="one .pred_tl, pred_ft. pair per architecture"):
        common_sample(y, [])
    with pytest.raises(ValueError, match=r"predictions\[1\] must be a pair"):
        common_sample(y, [preds[0], preds[1][0]])
    with pytest.raises(ValueError, match=r"labels and predictions\[0\] must have one shape"):
        common_sample(y, [(preds[0][0][:-1], preds[0][1])])


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
    # The default minimum of one value uses exactly the classes present.
    assert res.class_used.tolist() == [c in set(y[ok].tolist()) for c in range(5)] and d["class_used"][2] is False
    # n_boot = 0 asks for no interval, and says so.
    none = aggregate(v, y, 5, n_boot=0)
    assert none.mean == res.mean and math.isnan(none.lo) and math.isnan(none.hi) and none.n_boot == 0


def test_aggregate_min_per_class_drops_small_classes(rng):
    g = _np_rng(rng)
    sizes = [41, 4, 23, 2, 0, 5]  # finite values per class; classes 1, 3 and 4 fall below 5
    y = np.concatenate([np.full(k, c) for c, k in enumerate(sizes)] + [np.array([1, 3, 0])])
    v = g.normal(y.astype(float), 1.0)
    v[-3:] = np.nan  # non-finite values do not count towards the minimum
    perm = g.permutation(y.size)
    y, v = y[perm], v[perm]
    res = aggregate(v, y, n_classes=6, n_boot=300, seed=7, min_per_class=5)
    hand = [sum(v[i] for i in range(y.size) if y[i] == c and v[i] == v[i]) / sizes[c] for c in (0, 2, 5)]
    assert res.mean == pytest.approx(sum(hand) / 3, rel=1e-12)
    assert res.class_used.tolist() == [True, False, True, False, False, True]
    assert res.n_per_class.tolist() == sizes and res.n_excluded == 3 and res.min_per_class == 5
    assert not math.isnan(res.per_class[1])  # reported, though left out of the mean
    # Left out of every replicate too: the interval is that of the data without those classes, same seed.
    dropped = np.isin(y, [1, 3, 4])
    ref = aggregate(np.where(dropped, np.nan, v), y, 6, n_boot=300, seed=7)
    assert (res.lo, res.hi) == (ref.lo, ref.hi) and res.mean == pytest.approx(ref.mean, rel=1e-12)
    none = aggregate(v, y, 6, n_boot=50, min_per_class=42)
    assert math.isnan(none.mean) and math.isnan(none.lo) and not none.class_used.any()
    assert none.n_per_class.tolist() == sizes
    with pytest.raises(ValueError, match="min_per_class"):
        aggregate(v, y, 6, min_per_class=0)


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


def _study(g, means, n=150, sd=0.05, classes=3, shared=True):
    """{arch: {method: (values, labels)}} with per-class values around the given macro means.

    Every method of an architecture scores the same images; with ``shared`` every architecture does too.
    """
    out = {}
    common = g.integers(0, classes, n)
    for arch, per_method in means.items():
        out[arch] = {}
        y = common if shared else g.integers(0, classes, n + len(out))  # per-arch images, odd sizes differ
        shift = np.linspace(-0.1, 0.1, classes)[y]  # class effects that cancel in the macro mean
        for method, mu in per_method.items():
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
    # Tau is descriptive: over three architectures its exact p-value cannot go below 2/3! = 1/3.
    assert ref.pvalue == pytest.approx(1 / 3)
    assert "kendall_p" not in {f.name for f in dataclasses.fields(RankReversal)} and not hasattr(res, "kendall_p")
    assert res.p_reverse[key] == 1.0 and res.p_fully_reversed[key] == 1.0
    assert res.pairing == "images" and res.n_boot_used == 300
    # Lower-is-stable reads every ranking backwards; the disagreement between methods stays.
    low = rank_reversal(data, 3, higher_is_stable=False, n_boot=0)
    assert low.rankings == {"lc": ["C", "B", "A"], "gpp": ["A", "B", "C"]}
    assert low.fully_reversed[key] and math.isnan(low.p_reverse[key]) and low.n_boot_used == 0


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
    data = _study(g, {"A": {"lc": 0.5, "gpp": 0.9}, "B": {"lc": 0.5, "gpp": 0.2}}, n=61, sd=0.2)
    # Under "lc", B's values (independent of A's on the same images) are shifted so that B's macro mean sits half a
    # standard error of the difference below A's: A ranks first, but B overtakes it in about a third of the
    # replicates (Phi(-0.5)), each one a reversal.
    (va, y), (vb, _) = data["A"]["lc"], data["B"]["lc"]
    gap = _macro(vb, y) - _macro(va, y) + 0.5 * math.hypot(_se(va, y), _se(vb, y))
    data["B"]["lc"] = (vb - gap, y)
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


def _macro(v, y):
    return np.mean([v[y == c].mean() for c in np.unique(y)])


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
    nan = {"A": data["A"], "B": {"lc": (np.full(y.size, np.nan), y), "gpp": data["B"]["gpp"]}}
    with pytest.raises(ValueError, match=r"values\['B'\]\['lc'\] has no finite value"):
        rank_reversal(nan, 3, True)
    other = {"A": data["A"], "B": {"lc": data["B"]["lc"], "gpp": (v, np.roll(y, 1))}}
    with pytest.raises(ValueError, match=r"labels of values\['B'\]\['gpp'\] differ .* same images"):
        rank_reversal(other, 3, True)
    with pytest.raises(ValueError, match="min_per_class"):
        rank_reversal(data, 3, True, min_per_class=0)


def _entry_stat(v, y, picks, n_classes, min_per_class):
    """Macro mean over the classes with enough finite values of the finite values at the picked images."""
    class_means = []
    for c in range(n_classes):
        if sum(1 for i in range(y.size) if y[i] == c and math.isfinite(v[i])) < min_per_class:
            continue
        vals = [v[i] for i in picks.get(c, ()) if math.isfinite(v[i])]
        if vals:
            class_means.append(sum(vals) / len(vals))
    return sum(class_means) / len(class_means) if class_means else math.nan


def _brute_paired(data, n_classes, higher, n_boot, seed, absolute=False, min_per_class=1):
    """(P(reverse), P(fully reversed), replicates kept) from a loop over replicates in the documented draw order:
    one resample of images per replicate shared by every entry when all labels agree, else one per architecture
    (architectures in order, each drawing all its replicates), classes in order, one draw per class."""
    archs = list(data)
    methods = list(data[archs[0]])
    labels0 = data[archs[0]][methods[0]][1]
    shared = all(np.array_equal(data[a][m][1], labels0) for a in archs for m in methods)
    rng = np.random.default_rng(seed)
    stat = {(a, m): [] for a in archs for m in methods}
    for group in [archs] if shared else [[a] for a in archs]:
        y = data[group[0]][methods[0]][1]
        for _ in range(n_boot):
            picks = {}
            for c in range(n_classes):
                members = [i for i in range(y.size) if y[i] == c]
                if members:
                    picks[c] = [members[k] for k in rng.integers(0, len(members), size=len(members))]
            for a in group:
                for m in methods:
                    v = np.abs(data[a][m][0]) if absolute else data[a][m][0]
                    stat[a, m].append(_entry_stat(v, y, picks, n_classes, min_per_class))
    sign = 1 if higher else -1
    rev, full, kept = {}, {}, 0
    pairs = [(methods[i], methods[j]) for i in range(len(methods)) for j in range(i + 1, len(methods))]
    for b in range(n_boot):
        if any(math.isnan(stat[k][b]) for k in stat):
            continue
        kept += 1
        rank = {m: sorted(range(len(archs)), key=lambda k: (-sign * stat[archs[k], m][b], k)) for m in methods}
        for p, q in pairs:
            rev[p, q] = rev.get((p, q), 0) + (rank[p][0] != rank[q][0])
            full[p, q] = full.get((p, q), 0) + (rank[p] == rank[q][::-1])
    return {k: rev.get(k, 0) / kept for k in pairs}, {k: full.get(k, 0) / kept for k in pairs}, kept


def _brute_unpaired_p_reverse(data, n_boot, g):
    """P(reverse) of the first two methods when every (architecture, method) is resampled on its own."""
    archs = list(data)
    methods = list(data[archs[0]])[:2]
    top = []
    for m in methods:
        boot = np.empty((len(archs), n_boot))
        for k, a in enumerate(archs):
            v, y = data[a][m]
            groups = [v[(y == c) & np.isfinite(v)] for c in np.unique(y)]
            for b in range(n_boot):
                boot[k, b] = np.mean([x[g.integers(0, x.size, x.size)].mean() for x in groups if x.size])
        top.append(boot.argmax(axis=0))
    return float(np.mean(top[0] != top[1]))


def _tied_study(g, archs, n, shared, nan_rate=0.1):
    """One method "lc" whose architectures have macro means 1e-3 apart (a close call), with NaN holes."""
    data = _study(g, {a: {"lc": 0.5} for a in archs}, n=n, sd=0.2, shared=shared)
    for k, a in enumerate(archs):
        v, y = data[a]["lc"]
        v = v.copy()
        v[g.random(v.size) < nan_rate] = np.nan
        ok = np.isfinite(v)
        v = v - np.mean([v[ok & (y == c)].mean() for c in np.unique(y)]) + 0.5 + 1e-3 * k
        data[a]["lc"] = (v, y)
    return data


@pytest.mark.parametrize("shared", [True, False])
def test_identical_methods_never_reverse_when_paired(rng, shared):
    g = _np_rng(rng)
    data = _tied_study(g, "ABC", n=97, shared=shared)
    for a in data:
        v, y = data[a]["lc"]
        data[a]["gpp"] = (v.copy(), y.copy())
    seed = int(g.integers(1 << 30))
    res = rank_reversal(data, 3, True, n_boot=500, seed=seed)
    key = ("lc", "gpp")
    assert res.pairing == ("images" if shared else "methods") and res.n_boot_used == 500
    assert res.rankings["lc"] == res.rankings["gpp"] == ["C", "B", "A"]
    assert res.p_reverse[key] == 0.0 and res.p_fully_reversed[key] == 0.0
    # Each entry resampled on its own, the same maps disagree on the top architecture most of the time.
    assert _brute_unpaired_p_reverse(data, 300, g) > 0.3
    # The replicate statistics of the two methods are bit-identical, so every replicate ranks them alike.
    v, y = data["A"]["lc"]
    boot = _boot_images(np.stack([v, v.copy()]), np.ones((2, 3), bool), y, 200, np.random.default_rng(seed))
    assert np.array_equal(boot[0], boot[1]) and np.isfinite(boot).all()


def test_shared_resample_preserves_affine_rankings_and_cross_arch_gaps(rng):
    g = _np_rng(rng)
    data = _tied_study(g, "ABC", n=83, shared=True)
    for a in data:  # one increasing affine map for every architecture: the ranking is the same in every replicate
        v, y = data[a]["lc"]
        data[a]["affine"] = (2.0 * v + 0.3, y)
    res = rank_reversal(data, 3, True, n_boot=400, seed=int(g.integers(1 << 30)))
    key = ("lc", "affine")
    assert res.p_reverse[key] == 0.0 and res.p_fully_reversed[key] == 0.0
    assert _brute_unpaired_p_reverse(data, 300, g) > 0.3
    # Across architectures: under "lc" Y is X lowered by 1e-3 on every image, under "flip" raised. On one shared
    # resample of images the gap never changes sign, so every replicate reverses; unpaired, about half would.
    y = data["A"]["lc"][1]
    base, other = data["A"]["lc"][0], data["B"]["lc"][0]
    pair = {"X": {"lc": (base, y), "flip": (other, y)}, "Y": {"lc": (base - 1e-3, y), "flip": (other + 1e-3, y)}}
    res = rank_reversal(pair, 3, True, n_boot=400, seed=int(g.integers(1 << 30)))
    assert res.pairing == "images" and res.rankings == {"lc": ["X", "Y"], "flip": ["Y", "X"]}
    assert res.p_reverse[("lc", "flip")] == 1.0 and res.p_fully_reversed[("lc", "flip")] == 1.0
    assert _brute_unpaired_p_reverse(pair, 300, g) < 0.8


def _sparse_study(g):
    """Per-architecture images; in one entry a single finite value, so many replicates leave it undefined."""
    data = _tied_study(g, "AB", n=45, shared=False, nan_rate=0.15)
    for a in data:
        v, y = data[a]["lc"]
        data[a]["gpp"] = (v + g.normal(0, 0.05, v.size), y)
    v, y = data["B"]["gpp"]
    idx = np.flatnonzero(y == 1)
    lone = np.full(v.size, np.nan)
    lone[idx[0]] = 0.7
    data["B"]["gpp"] = (lone, y)
    return data


@pytest.mark.parametrize("case", ["images", "methods", "sparse"])
def test_paired_bootstrap_matches_a_replicate_loop(rng, case):
    g = _np_rng(rng)
    kw = {"n_classes": 4, "higher": False, "absolute": True, "min_per_class": 3}
    if case == "sparse":
        data, kw = _sparse_study(g), {"n_classes": 3, "higher": True, "absolute": False, "min_per_class": 1}
    else:
        data = {}
        y = g.permutation(np.repeat(np.arange(4), [40, 15, 9, 7]))  # unequal classes, 71 images
        for a in ("A", "B", "C"):
            if case == "methods":
                y = g.permutation(np.repeat(np.arange(4), [30, 20, 12 + 2 * len(data), 9]))
            first = np.zeros(y.size, dtype=bool)
            for c in range(4):
                first[np.flatnonzero(y == c)[:3]] = True  # every class keeps min_per_class finite values
            data[a] = {}
            for m in ("lc", "gpp", "ig"):
                v = g.normal(0.0, 0.3, y.size) + 0.02 * g.normal()
                v[(g.random(y.size) < 0.15) & ~first] = np.nan
                data[a][m] = (v, y)
        # Class 3 keeps too few finite values in one entry: left out of its sample mean and of every replicate.
        v, y = data["B"]["gpp"]
        v = v.copy()
        v[np.flatnonzero(y == 3)[2:]] = np.nan
        data["B"]["gpp"] = (v, y)
    seed = int(g.integers(1 << 30))
    res = rank_reversal(data, kw["n_classes"], kw["higher"], n_boot=150, seed=seed, absolute=kw["absolute"],
                        min_per_class=kw["min_per_class"])
    p_rev, p_full, kept = _brute_paired(data, kw["n_classes"], kw["higher"], 150, seed, kw["absolute"],
                                        kw["min_per_class"])
    assert res.pairing == ("images" if case == "images" else "methods")
    assert res.n_boot_used == kept
    assert res.p_reverse == p_rev and res.p_fully_reversed == p_full
    assert any(0 < p < 1 for p in p_rev.values())  # not a trivially certain case
    if case == "sparse":
        assert 0.4 * 150 < kept < 0.85 * 150  # the lone value is missed by about (1 - 1/n_1)^n_1 of the replicates
    else:
        assert not res.class_used["gpp"]["B"][3] and res.class_used["lc"]["B"][3]


def test_rank_reversal_min_per_class(rng):
    g = _np_rng(rng)
    data = _study(g, {"A": {"lc": 0.6, "gpp": 0.4}, "B": {"lc": 0.5, "gpp": 0.45}}, n=103, classes=4)
    v, y = data["B"]["gpp"]
    v = v.copy()
    for c, keep in ((2, 4), (3, 1)):
        v[np.flatnonzero(y == c)[keep:]] = np.nan
    data["B"]["gpp"] = (v, y)
    res = rank_reversal(data, 4, True, n_boot=100, seed=3, min_per_class=5)
    hand = []
    for c in (0, 1):
        vals = [v[i] for i in range(y.size) if y[i] == c]
        hand.append(sum(vals) / len(vals))
    assert res.means["gpp"]["B"] == pytest.approx(sum(hand) / 2, rel=1e-12)
    assert res.means["gpp"]["B"] == pytest.approx(aggregate(v, y, 4, n_boot=0, min_per_class=5).mean, rel=1e-12)
    assert res.class_used["gpp"]["B"].tolist() == [True, True, False, False]
    assert res.class_used["lc"]["B"].all() and res.min_per_class == 5
    # The default keeps every class with a value.
    assert rank_reversal(data, 4, True, n_boot=0).class_used["gpp"]["B"].tolist() == [True, True, True, True]
    few = np.full(y.size, np.nan)
    for c in range(4):
        few[np.flatnonzero(y == c)[:4]] = 0.5
    data["A"]["lc"] = (few, y)
    with pytest.raises(ValueError, match=r"values\['A'\]\['lc'\] has no class with at least min_per_class = 5"):
        rank_reversal(data, 4, True, min_per_class=5)


# ------------------------------------------------------------------------------------- macro AUC, areas, bootstrap
def test_macro_auc_matches_sklearn_over_present_classes(rng):
    from sklearn.metrics import roc_auc_score

    for n, c in ((23, 5), (7, 3), (40, 2), (11, 6)):
        labels = torch.randint(0, c, (n,), generator=rng).numpy()
        labels[:2] = [0, 1]
        labels[labels == c - 1] = 0 if c > 2 else labels[labels == c - 1]  # one class absent (when C > 2)
        scores = torch.randn(n, c, generator=rng, dtype=torch.float64).numpy().round(1)  # tied scores
        present = sorted(set(labels.tolist()))
        ref = float(np.mean([roc_auc_score(labels == k, scores[:, k]) for k in present]))
        assert macro_auc(labels, scores) == pytest.approx(ref, rel=1e-12, abs=1e-12), (n, c)
    assert math.isnan(macro_auc(np.zeros(9, dtype=int), scores[:9]))  # one class only: no AUC
    assert math.isnan(macro_auc(np.zeros(0, dtype=int), np.zeros((0, 3))))
    bad = scores.copy()
    bad[3, 1] = np.nan
    assert math.isnan(macro_auc(labels, bad))


def test_macro_auc_rows_equal_one_row_at_a_time(rng):
    B, N, C = 6, 17, 4
    labels = torch.randint(0, C, (B, N), generator=rng).numpy()
    labels[2] = 1  # a row with one class
    scores = torch.rand(B, N, C, generator=rng, dtype=torch.float64).numpy()
    got = macro_auc_rows(labels, scores)
    want = [macro_auc(labels[b], scores[b]) for b in range(B)]
    np.testing.assert_allclose(got, want, rtol=0, atol=0)
    assert math.isnan(got[2])
    with pytest.raises(ValueError, match="labels must be"):
        macro_auc_rows(labels[0], scores)


def test_area_is_the_trapezoid_rule(rng):
    E = 5
    x = np.sort(torch.rand(E, generator=rng, dtype=torch.float64).numpy())
    y = torch.rand(3, 2, E, generator=rng, dtype=torch.float64).numpy()
    brute = sum((x[e + 1] - x[e]) * (y[..., e] + y[..., e + 1]) / 2 for e in range(E - 1))
    np.testing.assert_allclose(area(y, x), brute, rtol=1e-13)
    np.testing.assert_array_equal(area(y[..., :1], x[:1]), y[..., 0])  # one point: the value itself
    with pytest.raises(ValueError, match="grid"):
        area(y, x[:3])


def test_bootstrap_is_the_documented_resampling(rng):
    n, n_boot = 13, 301
    seed = int(torch.randint(0, 10**6, (1,), generator=rng))
    v = torch.rand(n, generator=rng, dtype=torch.float64).numpy()
    lo, hi = bootstrap(lambda idx: v[idx].mean(1), n, n_boot, seed, ci=0.9)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    boot = np.array([v[row].mean() for row in idx])
    assert (lo, hi) == pytest.approx(tuple(np.percentile(boot, [5, 95])), rel=1e-12)
    # a one-class aggregate is the same bootstrap of the mean
    agg = aggregate(v, np.zeros(n, dtype=int), 1, n_boot, seed, ci=0.9)
    assert (agg.lo, agg.hi) == pytest.approx((lo, hi), rel=1e-12) and agg.mean == pytest.approx(v.mean())
    # blocks draw the same indices as one call
    blocks = np.concatenate([b for _, _, b in resample(n, n_boot, np.random.default_rng(seed))])
    np.testing.assert_array_equal(blocks, idx)
    assert percentile_interval([np.nan, 1.0, 3.0], 0.5) == pytest.approx((1.5, 2.5))
    assert all(math.isnan(x) for x in percentile_interval([np.nan], 0.9))
    assert all(math.isnan(x) for x in bootstrap(lambda idx: idx.mean(1), n, 0))


def test_paired_test_with_no_difference_is_p_one(rng):
    a = torch.rand(9, generator=rng, dtype=torch.float64).numpy()
    t = paired_test(a, a.copy())
    assert (t.statistic, t.pvalue, t.n, t.median_diff) == (0.0, 1.0, 9, 0.0)
    b = a + torch.rand(9, generator=rng, dtype=torch.float64).numpy() - 0.3
    ref = scipy.stats.wilcoxon(b, a)  # two-sided: symmetric in its arguments
    assert paired_test(a, b).pvalue == pytest.approx(ref.pvalue)
    assert paired_test(b, a).pvalue == pytest.approx(ref.pvalue)
    assert math.isnan(paired_test([np.nan], [1.0]).pvalue)


def test_mean_band_matches_scipy(rng):
    v = torch.randn(21, 4, generator=rng, dtype=torch.float64).numpy()
    v[3, 1] = np.nan
    mean, lo, hi = mean_band(v)
    for e in range(4):
        col = v[:, e][np.isfinite(v[:, e])]
        half = scipy.stats.norm.ppf(0.975) * scipy.stats.sem(col)
        assert mean[e] == pytest.approx(col.mean()) and hi[e] - mean[e] == pytest.approx(half)
        assert mean[e] - lo[e] == pytest.approx(half)
    one = mean_band(v[:1])
    np.testing.assert_array_equal(one[1][np.isfinite(one[0])], one[0][np.isfinite(one[0])])
