"""The randomisation check (drift.randomisation): the cascade, the randomised model (its initialiser, BatchNorm
statistics, input dependence), the flag's permutation test against brute force and its error rates by simulation,
and the check on a trained toy CNN: a method that ignores the weights is flagged, Grad-CAM++ and LayerCAM are not."""

import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps
from torch import nn

from drift import randomisation as rd
from drift.attribution import cams_multi
from drift.metrics import pearson


class Toy(nn.Module):
    """A small CNN laid out like the registry's classifiers (``backbone`` then ``head``)."""

    def __init__(self, n_classes: int = 3, width: int = 8):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, n_classes))

    def forward(self, x):
        return self.head(self.backbone(x))


# ---------------------------------------------------------------------------------------------- the cascade
def test_cascade_cuts_from_the_head_down():
    torch.manual_seed(0)
    model = Toy()
    x = torch.rand(2, 1, 15, 13)
    assert rd.parameterised_layers(model, x) == ["backbone.0", "backbone.1", "backbone.3", "backbone.4",
                                                 "backbone.6", "head.2"]
    cuts = rd.cascade(model, x, [0.0, 0.4, 1.0])
    assert [c.modules for c in cuts] == [("head.2",), ("head.2", "backbone.6", "backbone.4"),
                                         ("head.2", "backbone.6", "backbone.4", "backbone.3", "backbone.1",
                                          "backbone.0")]
    assert [c.label for c in cuts] == ["head", "head + top 40%", "head + top 100%"]
    with pytest.raises(ValueError, match="no parameterised module named 'classifier'"):
        rd.cascade(model, x, [0.0], head="classifier")


def _trained_state(model):
    with torch.no_grad():  # a "trained" state in which every reset is visible
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.copy_(torch.rand_like(v) + 0.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("with_builder", [False, True])
def test_randomised_touches_only_the_cut_and_is_seeded(with_builder):
    torch.manual_seed(1)
    model = Toy()
    before = _trained_state(model)
    cut = ["head.2", "backbone.4"]
    fresh = (lambda: Toy()) if with_builder else None
    r1, r2, r3 = (rd.randomised(model, cut, seed=s, fresh=fresh).state_dict() for s in (3, 3, 4))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # the trained model is untouched
        torch.testing.assert_close(r1[k], r2[k], rtol=0, atol=0)  # seeded
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(r1[k], v) != k.startswith(("head.2.", "backbone.4.")), k
    assert torch.all(r1["backbone.4.running_var"] == 1) and torch.all(r1["backbone.4.running_mean"] == 0)
    assert not torch.equal(r1["head.2.weight"], r3["head.2.weight"])
    if with_builder:  # the architecture's own initialiser: the modules of a model built under the same seed
        torch.manual_seed(3)
        ref = Toy().state_dict()
        for k in ref:
            if k.startswith(("head.2.", "backbone.4.")):
                torch.testing.assert_close(r1[k], ref[k], rtol=0, atol=0)


def test_builder_of_another_architecture_is_refused():
    model = Toy(width=8)
    with pytest.raises(ValueError, match=r"backbone.4.weight has shape \(8,\) in the model and \(5,\)"):
        rd.randomised(model, ["backbone.4"], 0, fresh=lambda: Toy(width=5))


def test_recalibrated_statistics_are_those_of_the_data(rng):
    model = Toy(width=6).eval()
    before = _trained_state(model)
    x = torch.rand(23, 1, 11, 9, generator=rng)
    batches = list(x.split(8))
    n = rd.recalibrate_bn(model, ["head.2", "backbone.4"], batches)
    assert n == 1
    # Independent reference: the inputs of backbone.4 in each batch, their batch mean and unbiased variance,
    # averaged over the batches (the cumulative average of momentum=None).
    with torch.no_grad():
        feats = [model.backbone[:4](b) for b in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    bn = model.backbone[4]
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.backbone[1].running_mean, before["backbone.1.running_mean"])  # not in the cut
    assert not model.training and not bn.training


def test_randomised_model_depends_on_its_input_only_after_recalibration(rng):
    """Default statistics (mean 0, variance 1) of a re-initialised network squash its output; re-estimating them
    on data restores an input-dependent output. A constant model is refused, naming the cut."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=rng)))
    width = 12
    model = Toy(width=width)
    x = torch.rand(64, 1, 17, 19, generator=rng)
    _fit(model, *_blob_task(120, 3), epochs=3, seed=0)
    cut = rd.cascade(model, x, [1.0])[0]
    calibrated = rd.randomised(model, cut.modules, 0, fresh=lambda: Toy(width=width))
    rd.recalibrate_bn(calibrated, cut.modules, x.split(16))
    s = rd.check_input_dependence(calibrated, x, 1e-3, "cut 'all'")
    # Independent reference: the per-class standard deviation of the logits, averaged.
    with torch.no_grad():
        z = calibrated(x).double().numpy()
    assert s == pytest.approx(np.std(z, axis=0, ddof=1).mean(), rel=1e-9)
    constant = rd.randomised(model, cut.modules, 0)
    with torch.no_grad():
        constant.head[2].weight.zero_()
    with pytest.raises(rd.InputIndependent, match=r"randomisation cut 'head \+ top 100%'.* vary by 0 across 64"):
        rd.check_input_dependence(constant, x, 1e-3, f"cut {cut.label!r}")


# ---------------------------------------------------------------------------------------------- the flag's test
def test_pearson_matrix_matches_the_pairwise_metric(rng):
    a, b = torch.rand(7, 9, 5, generator=rng), torch.rand(7, 9, 5, generator=rng)
    s = rd.pearson_matrix(a, b)
    for i, j in itertools.product(range(7), repeat=2):
        assert s[i, j] == pytest.approx(float(pearson(a[i:i + 1], b[j:j + 1])[0]), abs=1e-12)


def test_permutation_test_matches_exhaustive_enumeration(rng):
    n = 6
    t = torch.rand(n, 8, 7, generator=rng, dtype=torch.float64)
    r = 0.5 * t + torch.rand(n, 8, 7, generator=rng, dtype=torch.float64)
    s = rd.pearson_matrix(t, r)
    res = rd.weight_test(s, n_permutations=20000, seed=int(torch.randint(999, (1,), generator=rng)))
    T = np.mean(np.diag(s))
    all_perm = np.array([s[np.arange(n), list(p)].mean() for p in itertools.permutations(range(n))])
    exact = np.mean(all_perm >= T - 1e-12)
    assert res["T"] == pytest.approx(T)
    off = s[~np.eye(n, dtype=bool)].mean()
    assert res["null"] == pytest.approx(off)  # the mean over all permutations of T_pi equals the off-diagonal mean
    assert res["normalised"] == pytest.approx((T - off) / (1 - off))
    assert res["p"] == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 20000) + 1e-4)


def test_flag_rule():
    yes = {"p": 0.01, "normalised": 0.8}
    weak = {"p": 0.01, "normalised": 0.2}
    unsure = {"p": 0.2, "normalised": 0.9}
    none = {"p": math.nan, "normalised": math.nan}
    assert rd.flagged([yes, yes, none], 0.05, 0.5)  # a refused cut does not count
    assert not rd.flagged([yes, weak], 0.05, 0.5) and not rd.flagged([yes, unsure], 0.05, 0.5)
    assert not rd.flagged([none, none], 0.05, 0.5)


def test_flag_error_rates_by_simulation():
    """False-positive rate under the null (the randomised maps share nothing image-specific with the trained
    maps) at most alpha; power against a method that ignores the weights near 1. The per-cut permutation test alone
    (no effect-size threshold) holds its level: binomial 99.9% upper bound for 200 draws at 0.05."""
    alpha = 0.05
    p_only = rd.simulate_flag_rate(True, n_sim=200, n_cuts=1, min_normalised=-1.0, alpha=alpha, seed=3)
    assert p_only <= sps.binom.ppf(0.999, 200, alpha) / 200, p_only
    fpr = rd.simulate_flag_rate(True, n_sim=100, alpha=alpha, seed=4)
    assert fpr <= sps.binom.ppf(0.999, 100, alpha) / 100, fpr
    power = rd.simulate_flag_rate(False, n_sim=30, alpha=alpha, seed=5)
    assert power >= 0.9, power


def test_similarities_and_coarse_maps_warn(rng):
    a = torch.randn(5, 12, 13, generator=rng, dtype=torch.float64)
    b = a + torch.randn(5, 12, 13, generator=rng, dtype=torch.float64)
    sim = rd.similarities(a, b)
    for i in range(5):
        ref = sps.spearmanr(a[i].abs().flatten(), b[i].abs().flatten()).statistic
        assert sim["abs_spearman"][i] == pytest.approx(ref, abs=1e-12)
        assert sim["pearson"][i] == pytest.approx(sps.pearsonr(a[i].flatten(), b[i].flatten()).statistic, abs=1e-12)
    assert np.isfinite(sim["ssim"]).all()
    with pytest.warns(RuntimeWarning, match="resnet block gradcam\\+\\+: maps of 3 x 3 cells"):
        u = rd.prepare(torch.rand(4, 3, 3, generator=rng), (15, 15), "minmax", True, "resnet block gradcam++")
    torch.testing.assert_close(u.mean(0), torch.zeros(15, 15, dtype=torch.float64), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------- a trained toy model
def _blob_task(n: int, seed: int, side: int = 17):
    """Three classes: a bright blob in the left, middle or right third of a noisy image."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.2 * torch.rand(n, 1, side, side + 2, generator=g)
    cols = (y * (side + 2) // 3 + torch.randint(1, (side + 2) // 3 - 3, (n,), generator=g)).tolist()
    rows = torch.randint(2, side - 5, (n,), generator=g).tolist()
    for i, (r, c) in enumerate(zip(rows, cols)):
        x[i, 0, r:r + 4, c:c + 3] += 0.8
    return x, y


def _fit(model: nn.Module, x, y, epochs: int, seed: int, lr: float = 3e-3) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(16):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _edge_maps(x: torch.Tensor, shape) -> torch.Tensor:
    """A "method" that ignores the model: the input's gradient magnitude, pooled to the CAM's shape."""
    e = x[:, 0]
    g = (e[:, :-1, 1:] - e[:, :-1, :-1]).abs() + (e[:, 1:, :-1] - e[:, :-1, :-1]).abs()
    return nn.functional.adaptive_avg_pool2d(g[:, None], shape)[:, 0]


def _maps_fn(model, x, t):
    res = cams_multi(model, x, t, methods=("gradcam++", "layercam"), layers=("backbone.6",))
    key = next(iter(res))
    res[key]["edge"] = _edge_maps(x, res[key]["layercam"].shape[-2:])
    return res


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    x, y = _blob_task(240, seed=11)
    model = _fit(Toy(width=12), x, y, epochs=10, seed=0)
    xt, yt = _blob_task(37, seed=99)
    acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.6, f"toy model did not learn the task (accuracy {acc:.2f})"
    return model, x, xt, yt


def test_weights_ignoring_method_is_flagged_and_cams_of_a_trained_cnn_are_not(toy):
    model, x, xt, yt = toy
    cuts = rd.cascade(model, xt, [0.0, 0.5, 1.0])
    rand = rd.randomisation_maps(model, xt, yt, cuts, _maps_fn, seed=0, batch_size=16, fresh=lambda: Toy(width=12),
                                 calibration=lambda: iter(x.split(40)), min_spread=1e-3)
    assert [r.refused for r in rand] == ["", "", ""]
    assert all(r.spread >= 1e-3 for r in rand)  # the randomised models' outputs vary with the input
    trained = _maps_fn(model, xt, yt)[("backbone.6", "logit")]
    verdict = {}
    for method in ("gradcam++", "layercam", "edge"):
        tests = []
        for i, r in enumerate(rand):
            a = rd.prepare(trained[method], (17, 19), "minmax")
            b = rd.prepare(r.maps[("backbone.6", "logit")][method], (17, 19), "minmax")
            c = rd.prepare(r.maps_other_seed[("backbone.6", "logit")][method], (17, 19), "minmax")
            sc = rd.randomisation_scores(a, b, c, 499, i)
            assert sc["mean"]["pearson"] == pytest.approx(np.nanmean(pearson(a, b).numpy()))
            tests.append(sc["test"])
        verdict[method] = rd.flagged(tests, 0.05, 0.5)
    assert verdict == {"gradcam++": False, "layercam": False, "edge": True}


def test_randomisation_batches_do_not_change_the_maps(toy):
    model, _, xt, yt = toy
    cuts = rd.cascade(model, xt, [0.5])
    one = rd.randomisation_maps(model, xt, yt, cuts, _maps_fn, seed=2, batch_size=len(xt), null_seed=False)[0]
    many = rd.randomisation_maps(model, xt, yt, cuts, _maps_fn, seed=2, batch_size=7, null_seed=False)[0]
    for key, by_method in one.maps.items():
        for m, v in by_method.items():
            torch.testing.assert_close(many.maps[key][m], v, rtol=1e-5, atol=1e-6)


def test_default_reset_of_a_whole_network_is_refused(toy):
    """PyTorch's default re-initialisation without BatchNorm statistics from data: the toy network's output barely
    depends on its input, and that cut is refused, not scored."""
    model, _, xt, yt = toy
    cuts = rd.cascade(model, xt, [1.0])
    with pytest.warns(RuntimeWarning, match="cut 'head \\+ top 100%'"):
        (res,) = rd.randomisation_maps(model, xt, yt, cuts, _maps_fn, seed=0, min_spread=1e-3)
    assert res.maps is None and res.spread < 1e-3 and "not scored" in res.refused
