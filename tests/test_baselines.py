"""Noise floors and the randomisation sanity check (drift.baselines): formulas, the cascade, a trained toy model,
and the pipeline step end to end."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from drift import baselines as bl
from drift.attribution import cams_multi, normalize, upsample
from drift.metrics import pearson, topk_iou
from drift.stats import aggregate


@pytest.fixture
def nrng(rng):
    """A NumPy generator seeded from the logged per-test seed."""
    return np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=rng)))


# ---------------------------------------------------------------------------------------------- formulas
def test_instability_orients_every_metric(nrng):
    v = nrng.uniform(-1, 1, size=13)
    np.testing.assert_array_equal(bl.instability("pearson", v), 1 - v)
    np.testing.assert_array_equal(bl.instability("iou@20", v), 1 - v)
    np.testing.assert_array_equal(bl.instability("centroid_shift", v), v)
    np.testing.assert_array_equal(bl.instability("entropy_change", v), np.abs(v))
    assert np.isnan(bl.instability("pearson", np.array([np.nan])))[0]
    with pytest.raises(ValueError, match="no stability direction"):
        bl.instability("entropy_tl", v)


def test_replica_seeds():
    assert bl.replica_seeds(3, 2) == [1003, 1004]
    assert bl.replica_seeds(3, 5, [9, 3]) == [9, 3]
    assert bl.replica_seeds(0, 0) == []


def test_flag_rule():
    assert bl.flagged([0.9, 0.7, 0.55], 0.5)
    assert not bl.flagged([0.9, 0.7, 0.45], 0.5)
    assert bl.flagged([0.9, math.nan], 0.5)  # a cut with no valid image does not count
    assert not bl.flagged([math.nan, math.nan], 0.5)


def test_against_floor_matches_a_direct_computation(nrng):
    n, c = 41, 3
    labels = np.arange(n) % c
    drift = nrng.uniform(0, 1, size=n)  # Pearson r values
    floors = [nrng.uniform(0.5, 1, size=n) for _ in range(3)]
    floors[1][4] = np.nan  # an invalid replica image leaves the image out
    use = nrng.uniform(size=n) > 0.2
    res = bl.against_floor(drift, floors, "pearson", use, labels, c, 200, 5, 1)
    d = 1 - drift
    f = np.mean([1 - x for x in floors], axis=0)
    ok = use & np.isfinite(f)
    macro = lambda v: np.mean([v[ok & (labels == k)].mean() for k in range(c)])  # noqa: E731
    assert res["n"] == ok.sum()
    assert res["drift"].mean == pytest.approx(macro(d))
    assert res["floor"].mean == pytest.approx(macro(f))
    assert res["excess"].mean == pytest.approx(macro(d) - macro(f))
    assert res["ratio"] == pytest.approx(macro(d) / macro(f))
    ref = aggregate(np.where(ok, d - f, np.nan), labels, c, 200, 5)
    assert (res["excess"].lo, res["excess"].hi) == (ref.lo, ref.hi)


def test_ratio_of_a_zero_floor():
    labels = np.array([0, 0, 1, 1])
    use = np.ones(4, bool)
    same = np.ones(4)
    zero = bl.against_floor(same, [same], "pearson", use, labels, 2, 10, 0, 1)
    assert zero["floor"].mean == 0 and math.isnan(zero["ratio"])
    inf = bl.against_floor(np.zeros(4), [same], "pearson", use, labels, 2, 10, 0, 1)
    assert inf["ratio"] == math.inf


def test_verdict_sentence():
    raw = {"centroid_shift": {"reverses": {"layercam vs gradcam++": True}},
           "pearson": {"reverses": {"layercam vs gradcam++": False}},
           "iou@20": {"reverses": {"layercam vs gradcam++": True}}}
    corrected = {"centroid_shift": {"reverses": {"layercam vs gradcam++": True},
                                    "p_reverse": {"layercam vs gradcam++": 0.81}},
                 "pearson": {"reverses": {"layercam vs gradcam++": True}},
                 "iou@20": {"reverses": {"layercam vs gradcam++": False}}}
    s = bl.floor_verdict(raw, corrected, {"centroid_shift": [2.0, 3.5], "pearson": [1.0], "iou@20": []},
                         ["layercam", "gradcam++"], "finetune", 2, "last-conv, logit, minmax")
    assert "by centroid_shift (drift/floor 2-3.5x) the reversal exceeds the seed noise" in s and "P 0.81" in s
    assert "by pearson (drift/floor 1-1x) no reversal to test" in s
    assert "by iou@20 (drift/floor undefined) the reversal does not survive the seed floor" in s


# ---------------------------------------------------------------------------------------------- the cascade
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


def test_cascade_cuts_from_the_head_down():
    torch.manual_seed(0)
    model = Toy()
    x = torch.rand(2, 1, 15, 13)
    assert bl.parameterised_layers(model, x) == ["backbone.0", "backbone.1", "backbone.3", "backbone.4",
                                                 "backbone.6", "head.2"]
    cuts = bl.cascade(model, x, [0.0, 0.4, 1.0])
    assert [c.modules for c in cuts] == [("head.2",), ("head.2", "backbone.6", "backbone.4"),
                                         ("head.2", "backbone.6", "backbone.4", "backbone.3", "backbone.1",
                                          "backbone.0")]
    assert [c.label for c in cuts] == ["head", "head + top 40%", "head + top 100%"]
    with pytest.raises(ValueError, match="no parameterised module named 'classifier'"):
        bl.cascade(model, x, [0.0], head="classifier")


def test_randomised_touches_only_the_cut_and_is_seeded():
    torch.manual_seed(1)
    model = Toy()
    with torch.no_grad():  # a "trained" state in which every reset is visible
        for v in model.state_dict().values():
            if v.is_floating_point():
                v.copy_(torch.rand_like(v) + 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cut = ["head.2", "backbone.4"]
    r1, r2, r3 = (bl.randomised(model, cut, seed=s).state_dict() for s in (3, 3, 4))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # the trained model is untouched
        torch.testing.assert_close(r1[k], r2[k], rtol=0, atol=0)  # seeded
        if k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(r1[k], v) != k.startswith(("head.2.", "backbone.4.")), k
    assert torch.all(r1["backbone.4.running_var"] == 1) and torch.all(r1["backbone.4.running_mean"] == 0)
    assert not torch.equal(r1["head.2.weight"], r3["head.2.weight"])


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


@pytest.fixture(scope="module")
def toy_models():
    torch.manual_seed(0)
    x, y = _blob_task(240, seed=11)
    start = _fit(Toy(width=12), x, y, epochs=10, seed=0)
    # Two fine-tunings of one starting model that differ only in the training seed (batch order).
    ft = [_fit(Toy(width=12), x, y, 0, 0) for _ in range(2)]
    for m, seed in zip(ft, (1, 2)):
        m.load_state_dict(start.state_dict())
        _fit(m, x, y, epochs=2, seed=seed, lr=1e-3)
    xt, yt = _blob_task(37, seed=99)
    acc = (ft[0](xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.6, f"toy model did not learn the task (accuracy {acc:.2f})"
    return ft, xt, yt


def _maps_fn(insensitive: bool):
    def fn(model, x, t):
        res = cams_multi(model, x, t, methods=("gradcam++", "layercam"), layers=("backbone.6",))
        key = next(iter(res))
        if insensitive:  # a "method" that ignores the model and its gradients: the image itself, pooled
            res[key]["image"] = nn.functional.adaptive_avg_pool2d(x[:, 0], res[key]["layercam"].shape[-2:])
        return res

    return fn


def test_randomisation_moves_maps_far_more_than_a_seed_and_flags_an_insensitive_method(toy_models):
    (ft_a, ft_b), x, y = toy_models
    fn = _maps_fn(insensitive=True)
    trained = fn(ft_a, x, y)[("backbone.6", "logit")]
    replica = fn(ft_b, x, y)[("backbone.6", "logit")]
    cuts = bl.cascade(ft_a, x, [0.0, 0.5, 1.0])
    rand = bl.randomisation_maps(ft_a, x, y, cuts, fn, seed=0, batch_size=10)
    assert len(rand) == 3
    for method in ("gradcam++", "layercam"):
        floor = np.nanmean(1 - pearson(trained[method], replica[method]).numpy())
        moved = [np.nanmean(1 - pearson(trained[method], r[("backbone.6", "logit")][method]).numpy()) for r in rand]
        assert floor < 0.2, (method, floor)
        assert min(moved) > 3 * floor + 0.2, (method, floor, moved)
        r_by_cut = [1 - m for m in moved]
        assert not bl.flagged(r_by_cut, 0.5)
    r_image = [np.nanmean(pearson(trained["image"], r[("backbone.6", "logit")]["image"]).numpy()) for r in rand]
    assert r_image == pytest.approx([1.0, 1.0, 1.0])
    assert bl.flagged(r_image, 0.5)


def test_randomisation_batches_do_not_change_the_maps(toy_models):
    (ft_a, _), x, y = toy_models
    fn = _maps_fn(insensitive=False)
    cuts = bl.cascade(ft_a, x, [0.5])
    one = bl.randomisation_maps(ft_a, x, y, cuts, fn, seed=2, batch_size=len(x))[0]
    many = bl.randomisation_maps(ft_a, x, y, cuts, fn, seed=2, batch_size=7)[0]
    for key, by_method in one.items():
        for m, v in by_method.items():
            torch.testing.assert_close(many[key][m], v, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the pipeline step
TINY = [
    'run.archs=["resnet10t", "resnet18"]', "run.progress=false", "data.image_size=64", "data.n_train=20",
    "data.n_val=10", "data.n_test=11", "model.weights=none", "train.transfer.epochs=1", "train.finetune.epochs=1",
    "train.finetune.lr=1e-3", "train.transfer.batch_size=10", "train.finetune.batch_size=10",
    'metrics.sample_set="all"', 'metrics.ranking_sample_set="all"', "metrics.n_boot=20", "metrics.min_per_class=1",
    "fisher.enabled=false", "report.enabled=false", 'attribution.layers=["block"]',
    'attribution.methods=["gradcam++", "layercam"]', "baselines.replica_seeds=[0, 5]",
    "baselines.randomize=[0.0, 1.0]", "baselines.n_images=6",
]


@pytest.fixture(scope="module")
def floor_run(tmp_path_factory):
    from drift import config
    from drift.archive import ArchiveReader
    from drift.pipeline import Pipeline

    out = tmp_path_factory.mktemp("floor")
    cfg = config.load(None, [*TINY, f'run.out="{out}"'])
    Pipeline(cfg).run()
    return cfg, out, ArchiveReader(out / "archive.h5")


def test_replica_with_the_run_seed_is_the_run_model_and_its_floor_is_zero(floor_run):
    cfg, out, r = floor_run
    for arch in cfg.run.archs:
        own = torch.load(out / "checkpoints" / f"{arch}-finetune.pt", weights_only=False)["state_dict"]
        rep = torch.load(out / "checkpoints" / f"{arch}-finetune-seed0.pt", weights_only=False)["state_dict"]
        other = torch.load(out / "checkpoints" / f"{arch}-finetune-seed5.pt", weights_only=False)["state_dict"]
        assert all(torch.equal(own[k], rep[k]) for k in own)
        assert not all(torch.equal(own[k], other[k]) for k in own)
        for method in cfg.attribution.methods:
            base = f"baselines/arch/{arch}/floor/finetune/block/logit/minmax/{method}"
            same, diff = r.read(f"{base}/seed0/per_sample"), r.read(f"{base}/seed5/per_sample")
            ok = same["valid"].astype(bool)
            assert ok.any()
            for metric in ("centroid_shift", "peak_shift", "entropy_change"):
                np.testing.assert_array_equal(bl.instability(metric, same[metric][ok]), 0.0)
            for metric in ("pearson", "spearman", "ssim"):  # a ratio of float64 sums: 1 up to rounding at identity
                np.testing.assert_allclose(bl.instability(metric, same[metric][ok]), 0.0, rtol=0, atol=1e-12)
            # The top-k IoU (weighted Jaccard, metrics.ties = "jaccard") of a map with itself is exactly 1, or NaN
            # where the map has fewer positive pixels than k: the floor is that self-overlap, from the archived maps.
            u = normalize(upsample(torch.as_tensor(r.maps(arch, "finetune", method, "block", "logit")), (64, 64)),
                          "minmax")
            self_iou = topk_iou(u, u, (0.2,))[:, 0].numpy()[ok]
            np.testing.assert_array_equal(same["iou@20"][ok], self_iou)
            assert np.all((self_iou == 1) | np.isnan(self_iou))
            ok = diff["valid"].astype(bool)
            assert np.nanmean(bl.instability("pearson", diff["pearson"][ok])) > 0


def test_archived_ratio_is_drift_over_floor(floor_run):
    """Independent check of the stored ratio: from the per-image drift and the per-replica floors in the archive."""
    cfg, _, r = floor_run
    arch, method = cfg.run.archs[0], "layercam"
    per = r.drift(arch, method)
    base = f"baselines/arch/{arch}/floor/finetune/block/logit/minmax/{method}"
    reps = [r.read(f"{base}/seed{s}/per_sample") for s in (0, 5)]
    for metric in cfg.metrics.ranking_metrics:
        d = bl.instability(metric, per[metric])
        f = np.mean([np.where(x["valid"].astype(bool), bl.instability(metric, x[metric]), np.nan) for x in reps], 0)
        ok = per["valid"].astype(bool) & per["selected"].astype(bool) & np.isfinite(d) & np.isfinite(f)
        classes = np.unique(per["labels"][ok])
        macro_d = np.mean([d[ok & (per["labels"] == k)].mean() for k in classes])
        macro_f = np.mean([f[ok & (per["labels"] == k)].mean() for k in classes])
        stored = r.read(f"{base}/against/{metric}")
        assert stored["n"] == ok.sum()
        assert stored["ratio"] == pytest.approx(macro_d / macro_f, rel=1e-9)


def test_step_records_ranking_verdict_randomisation_and_resumes(floor_run, capsys):
    from drift import config
    from drift.pipeline import Pipeline
    from drift.summary import summary_text

    cfg, out, r = floor_run
    v = r.read("baselines/ranking")["verdict"]
    assert v.startswith("Seed floor (finetune, 2 replicas, block, logit, minmax): by ")
    for metric in cfg.metrics.ranking_metrics:
        assert f"by {metric} (" in v
        assert r.has(f"baselines/ranking/finetune/block/logit/minmax/{metric}")
    for arch in cfg.run.archs:
        rand = r.read(f"baselines/arch/{arch}/randomisation")
        np.testing.assert_array_equal(rand["fractions"], [0.0, 1.0])
        for method in cfg.attribution.methods:
            node = rand["block"]["logit"][method]
            assert len(node["pearson_by_cut"]) == 2 and len(node["cut0"]["per_sample"]["pearson"]) == 6
    text = summary_text(out / "archive.h5")
    assert "beside its seed floor" in text and "Randomisation check" in text and v in text
    finished = {s["name"]: s["finished"] for s in r.commits}
    # A resume with the same settings trains and scores nothing again; a changed flag threshold rescores only
    # the baselines step, not the replicas.
    Pipeline(config.load(None, [*TINY, f'run.out="{out}"', "baselines.flag_pearson=0.9"])).run()
    from drift.archive import ArchiveReader

    again = {s["name"]: s["finished"] for s in ArchiveReader(out / "archive.h5").commits}
    for name, t in finished.items():
        if name.startswith(("models/", "replicas/", "drift/", "attributions/")):
            assert again[name] == t, name
    assert ArchiveReader(out / "archive.h5").read(f"baselines/arch/{cfg.run.archs[0]}")["flag_pearson"] == 0.9
