"""Noise floors (drift.baselines): formulas, and the pipeline step end to end with the randomisation check
(drift.randomisation, tested in test_randomisation.py)."""

import math

import numpy as np
import pytest
import torch

from drift import baselines as bl
from drift.attribution import normalize, upsample
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
            # The top-k IoU with fractional ties is the expected overlap of two random tie breaks: a map's overlap
            # with itself is below 1 where the cut goes through a tie group. The floor is then exactly that
            # self-overlap, computed here from the archived maps.
            u = normalize(upsample(torch.as_tensor(r.maps(arch, "finetune", method, "block", "logit")), (64, 64)),
                          "minmax")
            np.testing.assert_array_equal(same["iou@20"][ok], topk_iou(u, u, (0.2,))[:, 0].numpy()[ok])
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
            for null in ("null_seed", "null_images", "null_cross"):
                assert set(node["cut0"][null]) == {"pearson", "spearman", "abs_spearman", "ssim"}
            # The input-independent null, recomputed from the archived trained maps: image i vs image i + 1.
            own = normalize(upsample(torch.as_tensor(r.maps(arch, "finetune", method, "block", "logit")[:6],
                                                     dtype=torch.float64), (64, 64)), "minmax")
            ref = np.nanmean(pearson(own, torch.roll(own, -1, 0)).numpy())
            assert node["cut0"]["null_images"]["pearson"] == pytest.approx(ref, rel=1e-9, nan_ok=True)
            assert node["flagged"] in (True, False, 0, 1)
        # The randomised models (architecture's own initialiser, BatchNorm statistics of the training images) vary
        # with their input: no cut refused.
        assert np.all(rand["spread"] >= cfg.baselines.min_logit_spread), rand["spread"]
    text = summary_text(out / "archive.h5")
    assert "beside its seed floor" in text and "Randomisation check" in text and v in text
    finished = {s["name"]: s["finished"] for s in r.commits}
    # A resume with the same settings trains and scores nothing again; a changed flag threshold rescores only
    # the baselines step, not the replicas.
    Pipeline(config.load(None, [*TINY, f'run.out="{out}"', "baselines.flag_normalised=0.9"])).run()
    from drift.archive import ArchiveReader

    again = {s["name"]: s["finished"] for s in ArchiveReader(out / "archive.h5").commits}
    for name, t in finished.items():
        if name.startswith(("models/", "replicas/", "drift/", "attributions/")):
            assert again[name] == t, name
    assert ArchiveReader(out / "archive.h5").read(f"baselines/arch/{cfg.run.archs[0]}")["flag_normalised"] == 0.9
