"""Drift metrics against independent numpy / scipy / scikit-image implementations, at odd sizes, with ties."""

import math
from fractions import Fraction

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch
from skimage.metrics import structural_similarity

from drift import metrics as M


def _maps(rng, b=5, h=13, w=17, levels=None):
    """Random non-negative maps; ``levels`` quantises them so that many pixels tie."""
    x = torch.rand(b, h, w, generator=rng, dtype=torch.float64) ** 2
    if levels:
        x = torch.round(x * levels) / levels
    return x


def _k(n, f):
    return max(1, min(n, math.ceil(Fraction(str(f)) * n)))


def _top_set(m, k):
    flat = m.ravel()
    order = np.lexsort((np.arange(flat.size), -flat))  # value descending, then lower flat index
    return set(order[:k].tolist())


@pytest.mark.parametrize("levels", [None, 3])
def test_centroid_and_peak_shift(rng, levels):
    a, b = _maps(rng, levels=levels), _maps(rng, levels=levels)
    diag = math.hypot(13, 17)
    ref_c = [
        np.linalg.norm(np.subtract(scipy.ndimage.center_of_mass(x), scipy.ndimage.center_of_mass(y))) / diag
        for x, y in zip(a.numpy(), b.numpy())
    ]
    np.testing.assert_allclose(M.centroid_shift(a, b).numpy(), ref_c, rtol=1e-10, atol=1e-12)
    ref_p = [
        np.linalg.norm(np.subtract(np.unravel_index(np.argmax(x), x.shape), np.unravel_index(np.argmax(y), y.shape)))
        / diag
        for x, y in zip(a.numpy(), b.numpy())
    ]
    np.testing.assert_allclose(M.peak_shift(a, b).numpy(), ref_p, rtol=1e-12)
    a[1] = 0
    a[2, 0, 0] = math.nan
    c = M.centroid_shift(a, b)
    assert c[1].isnan() and c[2].isnan() and c[[0, 3, 4]].isfinite().all()
    assert M.peak_shift(a, b)[2].isnan()
    neg = b.clone()
    neg[3, 1, 2] = -0.5
    with pytest.raises(ValueError, match=r"b\[3\] has negative values"):
        M.centroid_shift(b, neg)


def _fractional_iou(x, y, k):
    """Top-k IoU with tied pixels at the cut weighted (k - #above) / #tied, by numpy on the flat maps."""

    def weights(m):
        t = np.sort(m)[::-1][k - 1]
        above, tied = m > t, m == t
        return above + tied * ((k - above.sum()) / tied.sum())

    inter = float(weights(x.ravel()) @ weights(y.ravel()))
    return inter / (2 * k - inter)


@pytest.mark.parametrize("levels", [None, 2, 5])
def test_topk_iou_brute_force_with_ties(rng, levels):
    a, b = _maps(rng, 7, 13, 17, levels).float(), _maps(rng, 7, 13, 17, levels).float()
    b[0] = a[0]  # identical maps: IoU 1 at every fraction under the index rule
    b[1] = 0  # an all-zero map: every pixel tied
    fr = (0.05, 0.1, 0.2, 0.3, 0.37)
    got = M.topk_iou(a, b, fr, ties="fractional", positive=False)
    got_index = M.topk_iou(a, b, fr, ties="index", positive=False)
    assert got.shape == got_index.shape == (7, 5) and got.dtype == got_index.dtype == torch.float64
    for i in range(7):
        for t, f in enumerate(fr):
            k = _k(13 * 17, f)
            x, y = a[i].numpy(), b[i].numpy()
            sa, sb = _top_set(x, k), _top_set(y, k)
            assert got_index[i, t].item() == pytest.approx(len(sa & sb) / len(sa | sb), abs=1e-12), (i, f)
            assert got[i, t].item() == pytest.approx(_fractional_iou(x, y, k), abs=1e-12), (i, f)
    assert (got_index[0] == 1).all()
    if levels is None:  # distinct values: no tie group is cut and both rules agree exactly
        assert torch.equal(got[2:], got_index[2:])
    a[3, 4, 5] = math.inf
    for ties in ("fractional", "index"):
        got = M.topk_iou(a, b, fr, ties=ties, positive=False)  # a non-finite map must not reach the kernel
        assert got[3].isnan().all() and got[[0, 1, 2, 4, 5, 6]].isfinite().all()


def test_topk_iou_fractional_ties_do_not_reward_shared_zeros(rng):
    # Two sparse (ReLU'd) maps with disjoint supports: their top 10 % are the few positives plus zeros. The index
    # rule takes the same low-index zeros in both and reports overlap; the fractional rule spreads the cut over
    # all zeros, so the IoU is what a random tie break would give on average, whatever the pixel order.
    h, w = 12, 15
    a, b = torch.zeros(4, h, w, dtype=torch.float64), torch.zeros(4, h, w, dtype=torch.float64)
    for i in range(4):
        on = torch.randperm(h * w, generator=rng)[:10]
        a[i].view(-1)[on[:5]] = torch.rand(5, generator=rng, dtype=torch.float64) + 0.5
        b[i].view(-1)[on[5:]] = torch.rand(5, generator=rng, dtype=torch.float64) + 0.5
    fr = (0.1, 0.2)
    frac = M.topk_iou(a, b, fr, ties="fractional", positive=False)
    index = M.topk_iou(a, b, fr, ties="index", positive=False)
    for i in range(4):
        for t, f in enumerate(fr):
            k = _k(h * w, f)
            share = (k - 5) / (h * w - 5)  # weight of each zero pixel: the cut takes k - 5 of h w - 5 zeros
            # pixels zero in both maps, plus each map's 5 positives (weight 1) against the other's zeros
            inter = (h * w - 10) * share**2 + 10 * share
            assert frac[i, t].item() == pytest.approx(inter / (2 * k - inter), rel=1e-12)
    assert (index > frac).all()
    perm = torch.randperm(h * w, generator=rng)
    pa, pb = a.flatten(1)[:, perm].reshape(4, h, w), b.flatten(1)[:, perm].reshape(4, h, w)
    assert torch.equal(M.topk_iou(pa, pb, fr, ties="fractional", positive=False), frac)
    with pytest.raises(ValueError, match="ties must be 'fractional', 'jaccard' or 'index'"):
        M.topk_iou(a, b, fr, ties="random")


@pytest.mark.parametrize("levels", [None, 4])
def test_pearson_spearman_against_scipy(rng, levels):
    a, b = _maps(rng, 6, 11, 19, levels), _maps(rng, 6, 11, 19, levels)
    b[1] = 0.7 * a[1] + 0.3 * b[1]  # a correlated pair
    p, s = M.pearson(a, b).numpy(), M.spearman(a, b).numpy()
    for i in range(6):
        x, y = a[i].numpy().ravel(), b[i].numpy().ravel()
        assert p[i] == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-12)
        assert s[i] == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
    a[2] = 0.5
    a[3, 0, 1] = math.nan
    p, s = M.pearson(a, b), M.spearman(a, b)
    assert p[2].isnan() and s[2].isnan() and p[3].isnan() and s[3].isnan()


def test_average_ranks_match_scipy_rankdata(rng):
    x = torch.randint(0, 6, (4, 37), generator=rng).to(torch.float64)
    np.testing.assert_array_equal(M._average_ranks(x).numpy(), scipy.stats.rankdata(x.numpy(), axis=1))


@pytest.mark.parametrize("shape", [(13, 17), (11, 23), (31, 12)])
def test_ssim_matches_skimage(rng, shape):
    a, b = _maps(rng, 4, *shape) * 7, _maps(rng, 4, *shape)
    b[1] = a[1] * 3 + 1  # same map up to an affine change: SSIM 1 after min-max normalisation
    a[2] = 0  # constant: min-max gives zeros
    got = M.ssim(a, b).numpy()
    for i in range(4):
        x, y = (m[i].numpy() for m in (a, b))
        x = (x - x.min()) / (x.max() - x.min()) if x.max() > x.min() else np.zeros_like(x)
        y = (y - y.min()) / (y.max() - y.min()) if y.max() > y.min() else np.zeros_like(y)
        ref = structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1)
        assert got[i] == pytest.approx(ref, abs=1e-10)
    assert got[1] == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match=f"at least 11 x 11.*10 x {shape[1]}"):
        M.ssim(a[:, :10], b[:, :10])


@pytest.mark.parametrize("levels", [None, 3])
def test_concentration_metrics(rng, levels):
    a = _maps(rng, 5, 13, 17, levels)
    a[1] = 0.25  # uniform: entropy 1, Gini 0
    a[2] = 0
    a[2, 6, 9] = 2.0  # one pixel: entropy 0, Gini 1 - 1/n
    n = 13 * 17
    ent, gin, top = M.entropy(a).numpy(), M.gini(a).numpy(), M.top_mass(a, 0.1).numpy()
    k = _k(n, 0.1)
    for i in range(5):
        x = a[i].numpy().ravel()
        assert ent[i] == pytest.approx(scipy.stats.entropy(x) / math.log(n), abs=1e-12)
        assert gin[i] == pytest.approx(np.abs(x[:, None] - x[None, :]).sum() / (2 * n * x.sum()), abs=1e-12)
        assert top[i] == pytest.approx(np.sort(x)[::-1][:k].sum() / x.sum(), abs=1e-12)
    assert ent[1] == pytest.approx(1.0) and gin[1] == pytest.approx(0.0, abs=1e-12)
    assert ent[2] == 0 and gin[2] == pytest.approx(1 - 1 / n)
    a[3] = 0
    assert M.entropy(a)[3].isnan() and M.gini(a)[3].isnan() and M.top_mass(a)[3].isnan()
    with pytest.raises(ValueError, match=r"a\[4\] has negative"):
        M.entropy(a - (torch.arange(5, dtype=torch.float64) == 4).view(5, 1, 1).double())


def test_mask_metrics(rng):
    a = _maps(rng, 6, 13, 17, levels=3)
    mask = torch.rand(6, 13, 17, generator=rng) < 0.3
    mask[4] = False
    mf, pg = M.mass_fraction(a, mask).numpy(), M.pointing_game(a, mask).numpy()
    for i in range(6):
        x, m = a[i].numpy(), mask[i].numpy()
        if i == 4:
            assert np.isnan(mf[i]) and np.isnan(pg[i])  # empty mask: undefined, not 0
            continue
        assert mf[i] == pytest.approx(x[m].sum() / x.sum(), abs=1e-12)
        assert pg[i] == float(m.ravel()[np.argmax(x.ravel())])
    torch.testing.assert_close(M.energy_in(a, mask), M.mass_fraction(a, mask), equal_nan=True)
    shared = M.mass_fraction(a, mask[0])  # an (H, W) mask applies to every map
    torch.testing.assert_close(shared, M.mass_fraction(a, mask[0].expand(6, -1, -1)))
    with pytest.raises(ValueError, match=r"mask must have shape \(6, 13, 17\) or \(13, 17\)"):
        M.mass_fraction(a, mask[:, :12])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.mass_fraction(a, mask.double() * 2)


def test_degenerate_codes(rng):
    a = _maps(rng, 6, 13, 17)
    a[1, 2, 3] = math.nan
    a[2] = 0
    a[3] = 0.3
    a[4, 0, 0] = -math.inf
    a[5] = 0
    a[5, 12, 16] = 1e-30  # tiny but not constant: a valid map
    ref = []
    for x in a.numpy():
        ref.append(1 if not np.isfinite(x).all() else 2 if (x == 0).all() else 3 if x.min() == x.max() else 0)
    codes = M.degenerate(a)
    assert codes.dtype == torch.int64 and codes.tolist() == ref
    assert [M.degenerate_name(c) for c in codes] == ["ok", "non-finite", "all zero", "constant", "non-finite", "ok"]
    assert M.count_degenerate(codes) == {"ok": 2, "non-finite": 2, "all zero": 1, "constant": 1}
    with pytest.raises(ValueError, match="code 7"):
        M.degenerate_name(7)


def test_pair_metrics_matches_single_metrics_and_excludes_degenerate(rng):
    a, b = _maps(rng, 7, 13, 17, levels=6), _maps(rng, 7, 13, 17)
    lung = torch.rand(13, 17, generator=rng) < 0.5
    lesion = torch.rand(7, 13, 17, generator=rng) < 0.2
    a[2] = 0
    b[4, 1, 1] = math.nan
    b[5] = 0.1
    marker = torch.zeros(7, 13, 17, dtype=torch.bool)
    marker[:, 10:, 13:] = True  # a corner plate, as the synthetic confounder draws it
    out = M.pair_metrics(a, b, lung_mask=lung, lesion_mask=lesion, marker_mask=marker)
    valid = [i not in (2, 4, 5) for i in range(7)]
    assert out["valid"].tolist() == valid
    assert out["degenerate_tl"].tolist() == [0, 0, 2, 0, 0, 0, 0]
    assert out["degenerate_ft"].tolist() == [0, 0, 0, 0, 1, 3, 0]
    keys = {"centroid_shift", "peak_shift", "iou@05", "iou@10", "iou@20", "iou@30", "pearson", "spearman", "ssim"}
    for stem in ("entropy", "gini", "top10_mass", "lung_mass", "lesion_energy", "marker_mass"):
        keys |= {f"{stem}_tl", f"{stem}_ft", f"{stem}_change"}
    keys |= {"pointing_tl", "pointing_ft", "valid", "degenerate_tl", "degenerate_ft"}
    assert set(out) == keys
    ok = torch.tensor(valid)
    va, vb = a[ok], b[ok]
    iou = M.topk_iou(va, vb)
    expect = {
        "centroid_shift": M.centroid_shift(va, vb),
        "peak_shift": M.peak_shift(va, vb),
        "iou@05": iou[:, 0],
        "iou@10": iou[:, 1],
        "iou@20": iou[:, 2],
        "iou@30": iou[:, 3],
        "pearson": M.pearson(va, vb),
        "spearman": M.spearman(va, vb),
        "ssim": M.ssim(va, vb),
        "entropy_change": M.entropy(vb) - M.entropy(va),
        "gini_tl": M.gini(va),
        "top10_mass_ft": M.top_mass(vb),
        "lung_mass_tl": M.mass_fraction(va, lung),
        "lesion_energy_ft": M.energy_in(vb, lesion[ok]),
        "pointing_tl": M.pointing_game(va, lesion[ok]),
    }
    for key, v in expect.items():
        assert out[key].shape == (7,) and out[key].dtype == torch.float64
        torch.testing.assert_close(out[key][ok], v, equal_nan=True, msg=key)
        assert out[key][~ok].isnan().all(), key
    # Each metric of the pair agrees with its independent reference (spot check on the pair-level ones).
    i = 0
    x, y = a[i].numpy(), b[i].numpy()
    assert out["pearson"][i].item() == pytest.approx(scipy.stats.pearsonr(x.ravel(), y.ravel()).statistic, abs=1e-12)
    assert out["lung_mass_change"][i].item() == pytest.approx(
        y[lung.numpy()].sum() / y.sum() - x[lung.numpy()].sum() / x.sum(), abs=1e-12
    )
    assert out["marker_mass_ft"][i].item() == pytest.approx(y[10:, 13:].sum() / y.sum(), abs=1e-12)


def test_pair_metrics_edge_cases(rng):
    a = _maps(rng, 3, 12, 11)
    none_valid = M.pair_metrics(a, torch.zeros_like(a), fractions=(0.025, 0.5))
    assert set(k for k in none_valid if k.startswith("iou")) == {"iou@2.5", "iou@50"}
    assert not none_valid["valid"].any() and none_valid["ssim"].isnan().all()
    with pytest.raises(ValueError, match="at least 11 x 11.*9 x 11"):
        M.pair_metrics(a[:, :9], a[:, :9])
    with pytest.raises(ValueError, match=r"same shape"):
        M.pair_metrics(a, a[:2])
    with pytest.raises(TypeError, match="floating"):
        M.pair_metrics(a.long(), a.long())
    with pytest.raises(ValueError, match="fractions"):
        M.pair_metrics(a, a, fractions=(0.1, 1.5))
    a[0] = 0  # a degenerate pair first: the error must still name the caller's index of the bad map
    with pytest.raises(ValueError, match=r"b\[2\] has negative"):
        M.pair_metrics(a, torch.where(torch.arange(3).view(3, 1, 1) == 2, -a, a))


@pytest.mark.gpu
def test_pair_metrics_cuda_matches_cpu(rng):
    a, b = _maps(rng, 9, 37, 41, levels=8), _maps(rng, 9, 37, 41)
    lung = torch.rand(9, 37, 41, generator=rng) < 0.5
    cpu = M.pair_metrics(a, b, lung_mask=lung, lesion_mask=lung)
    gpu = M.pair_metrics(a.cuda(), b.cuda(), lung_mask=lung.cuda(), lesion_mask=lung.cuda())
    for k, v in cpu.items():
        torch.testing.assert_close(gpu[k].cpu(), v, equal_nan=True, msg=k)


# ------------------------------------------------------------------------------------------------- registry
def test_registry_covers_pair_metrics_and_computes_them(rng):
    """Every key pair_metrics returns has one registry entry whose function computes that value."""
    fractions = (0.025, 0.2, 0.5)
    a = torch.rand(3, 13, 17, generator=rng, dtype=torch.float64)
    b = torch.rand(3, 13, 17, generator=rng, dtype=torch.float64)
    lung = torch.rand(13, 17, generator=rng) > 0.5
    lesion = torch.rand(13, 17, generator=rng) > 0.7
    got = M.pair_metrics(a, b, lung_mask=lung, lesion_mask=lesion, fractions=fractions, marker_mask=~lung)
    specs = {s.key: s for s in M.registry(fractions)}
    assert len(specs) == len(M.registry(fractions))
    keys = set(got) - {"valid", "degenerate_tl", "degenerate_ft"}
    assert keys <= set(specs)
    masks = {"lung_mass": lung, "lesion_energy": lesion, "marker_mass": ~lung, "pointing": lesion}
    for key in keys:
        s = specs[key]
        if s.key.endswith(("_tl", "_ft", "_change")):
            q, st = s.key.rsplit("_", 1)
            args = (masks[q],) if q in masks else ()
            tl, ft = s.fn(a, *args), s.fn(b, *args)
            want = {"tl": tl, "ft": ft, "change": ft - tl}[st]
        else:
            want = s.fn(a, b)
        torch.testing.assert_close(got[key], want.to(torch.float64), equal_nan=True)


def test_registry_directions_labels_and_headline():
    fr = (0.025, 0.05, 0.2)
    assert M.stability("iou@2.5", fr) == (True, False) and M.stability("iou@05", fr) == (True, False)
    assert M.stability("centroid_shift") == (False, False) and M.stability("peak_shift") == (False, False)
    assert M.stability("entropy_change") == (False, True)
    assert all(M.stability(k)[0] for k in ("pearson", "spearman", "ssim", "iou@10", "iou@30"))
    with pytest.raises(ValueError, match="entropy_tl"):
        M.stability("entropy_tl")
    with pytest.raises(ValueError, match="iou@2.5"):
        M.stability("iou@2.5")  # not a key of the default fractions
    assert M.metric_label("iou@2.5", fr) == "IoU@2.5%" and M.metric_label("iou@20") == "IoU@20%"
    assert M.metric_label("gini_change") == "gini change" and M.metric_label("unknown_key") == "unknown key"
    assert M.metric_unit("centroid_shift") == "displacement (fraction of image diagonal)"
    assert [s.key for s in M.headline_specs()] == list(M.HEADLINE_KEYS)
    assert [s.key for s in M.headline_specs((0.1,))] == ["centroid_shift", "pearson", "entropy_change"]
    assert M.metric_spec("iou@2.5", fr).fraction == 0.025
