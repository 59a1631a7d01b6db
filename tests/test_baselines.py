"""Seed replicas, systematic drift and whole chains (drift.baselines): formulas, and the pipeline step end to end with
the randomisation check (drift.randomisation, tested in test_randomisation.py)."""

import json

import numpy as np
import pytest
import torch

from drift import baselines as bl
from drift.attribution import normalize, upsample
from drift.metrics import pearson, topk_iou


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


def test_systematic_arrays_read_values_as_squared_distances(nrng):
    m, n = 3, 17
    r = nrng.uniform(-0.5, 1, size=(m, n))
    rf = nrng.uniform(-0.5, 1, size=(m, m, n))
    d_tl, d_ft = bl.systematic_arrays(r, rf, "pearson")
    np.testing.assert_array_equal(d_tl, 1 - r)
    np.testing.assert_array_equal(d_ft[0, 1], 1 - rf[0, 1])
    np.testing.assert_array_equal(d_ft[np.arange(m), np.arange(m)], 0.0)
    iou = nrng.uniform(0, 1, size=(m, n))
    np.testing.assert_allclose(bl.systematic_arrays(iou, rf, "iou@20")[0], 1 - 2 * iou / (1 + iou))
    np.testing.assert_allclose(bl.systematic_arrays(iou, rf, "centroid_shift")[0], iou ** 2)


# ---------------------------------------------------------------------------------------------- the pipeline step
TINY = [
    'run.archs=["resnet10t", "resnet18"]', "run.progress=false", "data.image_size=64", "data.n_train=20",
    "data.n_val=10", "data.n_test=11", "model.weights=none", "train.transfer.epochs=1", "train.finetune.epochs=1",
    "train.finetune.lr=1e-3", "train.transfer.batch_size=10", "train.finetune.batch_size=10",
    'metrics.sample_set="all"', 'metrics.ranking_sample_set="all"', "metrics.n_boot=20", "metrics.min_per_class=1",
    "fisher.enabled=false", "report.enabled=false", 'attribution.layers=["block"]',
    'attribution.methods=["gradcam++", "layercam"]', "baselines.replica_seeds=[0, 5, 7]",
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


def test_replica_with_the_run_seed_is_the_run_model_and_its_pairs_are_identities(floor_run):
    cfg, out, r = floor_run
    for arch in cfg.run.archs:
        own = torch.load(out / "checkpoints" / f"{arch}-finetune.pt", weights_only=False)["state_dict"]
        rep = torch.load(out / "checkpoints" / f"{arch}-finetune-seed0.pt", weights_only=False)["state_dict"]
        other = torch.load(out / "checkpoints" / f"{arch}-finetune-seed5.pt", weights_only=False)["state_dict"]
        assert all(torch.equal(own[k], rep[k]) for k in own)
        assert not all(torch.equal(own[k], other[k]) for k in own)
        for method in cfg.attribution.methods:
            base = f"baselines/arch/{arch}/seeds/finetune/block/logit/minmax/{method}"
            same, diff = r.read(f"{base}/run_vs_seed0/per_sample"), r.read(f"{base}/run_vs_seed5/per_sample")
            ok = same["valid"].astype(bool)
            assert ok.any()
            for metric in ("centroid_shift", "peak_shift", "entropy_change"):
                np.testing.assert_array_equal(bl.instability(metric, same[metric][ok]), 0.0)
            for metric in ("pearson", "spearman", "ssim"):  # a ratio of float64 sums: 1 up to rounding at identity
                np.testing.assert_allclose(bl.instability(metric, same[metric][ok]), 0.0, rtol=0, atol=1e-12)
            # The top-k IoU (weighted Jaccard, metrics.ties = "jaccard") of a map with itself is exactly 1, or NaN
            # where the map has fewer positive pixels than k: checked from the archived maps.
            u = normalize(upsample(torch.as_tensor(r.maps(arch, "finetune", method, "block", "logit")), (64, 64)),
                          "minmax")
            self_iou = topk_iou(u, u, (0.2,))[:, 0].numpy()[ok]
            np.testing.assert_array_equal(same["iou@20"][ok], self_iou)
            assert np.all((self_iou == 1) | np.isnan(self_iou))
            # TL vs the seed-0 replica is the drift step's TL vs FT pair
            tl0 = r.read(f"{base}/fixed_vs_seed0/per_sample")
            np.testing.assert_array_equal(tl0["pearson"], r.drift(arch, method)["pearson"])
            ok = diff["valid"].astype(bool)
            assert np.nanmean(bl.instability("pearson", diff["pearson"][ok])) > 0


def test_archived_systematic_drift_is_the_formula_on_the_archived_pairs(floor_run):
    """Independent check of the stored estimate: S from the archived per-image pair values (the seed-0 replica,
    a copy of the run's model, left out of the estimator)."""
    cfg, _, r = floor_run
    arch, method = cfg.run.archs[0], "layercam"
    per = r.drift(arch, method)
    base = f"baselines/arch/{arch}/seeds/finetune/block/logit/minmax/{method}"
    use = per["selected"].astype(bool)
    for metric in cfg.metrics.ranking_metrics:
        def val(node, metric=metric):
            return np.where(use & node["valid"].astype(bool), node[metric], np.nan)

        rows = [val(per)] + [val(r.read(f"{base}/fixed_vs_seed{s}/per_sample")) for s in (5, 7)]
        pairs = [val(r.read(f"{base}/{x}_vs_{y}/per_sample"))
                 for x, y in (("run", "seed5"), ("run", "seed7"), ("seed5", "seed7"))]
        to_d = {"pearson": lambda v: 1 - v, "centroid_shift": lambda v: v ** 2,
                "iou@20": lambda v: 1 - 2 * v / (1 + v)}[metric]
        d_tl, d_p = np.stack([to_d(x) for x in rows]), np.stack([to_d(x) for x in pairs])
        ok = np.isfinite(d_tl).all(0) & np.isfinite(d_p).all(0)
        labels = per["labels"][ok]

        def macro(v, labels=labels):
            return np.mean([v[labels == k].mean() for k in np.unique(labels)])

        a, b = macro(d_tl[:, ok].mean(0)), macro(d_p[:, ok].mean(0))
        want = {"pearson": 1 - (1 - a) / np.sqrt(1 - b), "centroid_shift": a - b / 2, "iou@20": a - b}[metric]
        stored = r.read(f"{base}/systematic/{metric}")
        assert stored["n_models"] == 3 and stored["n_images"] == ok.sum()
        assert json.loads(stored["models"]) == ["run", "seed5", "seed7"]
        assert stored["estimate"] == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert stored["low"] <= stored["estimate"] <= stored["high"]


def test_step_records_ranking_verdict_randomisation_and_resumes(floor_run, capsys):
    from drift import config
    from drift.pipeline import Pipeline
    from drift.summary import summary_text

    cfg, out, r = floor_run
    v = r.read("baselines/ranking")["verdict"]
    assert v.startswith("finetune replicas (3, block, logit, minmax): Systematic drift beyond seed noise (S from 3 "
                        "fine-tuned models per architecture")
    assert "Architectures ranked on systematic drift" in v
    # At `block` (global pooling, then a linear head) the methods give one map: no reversal can be tested there.
    assert "Reversal of the stability order between LayerCAM and Grad-CAM++: not judged, no testable cell " \
        "(untestable: block/logit (gradcam++ vs layercam" in v
    for arch in cfg.run.archs:
        for method in cfg.attribution.methods:
            for metric in cfg.metrics.ranking_metrics:
                node = r.read(f"baselines/ranking/finetune/systematic/{arch}/{method}/{metric}")
                assert 0 <= node["p_holm"] <= 1 and node["n_models"] == 3
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
    assert "Systematic drift against seed noise" in text and "Randomisation check" in text and v in text
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


def test_whole_chains_are_trained_from_their_own_transfer_model_and_judged(tmp_path):
    """baselines.chains: each chain fine-tunes its own transfer replica; every pair of the chains' models is scored
    and the energy test and the per-chain count are stored with the sentence."""
    from drift import config
    from drift.archive import ArchiveReader
    from drift.pipeline import Pipeline

    tiny = [x for x in TINY if not x.startswith(("baselines.replica_seeds", "baselines.randomize"))]
    cfg = config.load(None, [*tiny, f'run.out="{tmp_path}"', "baselines.chains=1", "baselines.seeds=0"])
    Pipeline(cfg).run()
    r = ArchiveReader(tmp_path / "archive.h5")
    seeds = json.loads(r.read("baselines/chains")["chains"])
    assert seeds == [0, 2000]
    for arch in cfg.run.archs:
        for s in seeds[1:]:
            assert r.read(f"replicas/{arch}/chain/seed{s}")["weights"] == f"transfer replica seed {s}"
        node = r.read(f"baselines/chains/pairs/{arch}/layercam/pearson")
        tf = node["raw_tf"]
        assert tf.shape == (2, 2, cfg.data.n_test)
        # chain 0 is the run's own: its TL vs FT is the drift step's pair
        ok = np.isfinite(tf[0, 0])
        np.testing.assert_allclose(tf[0, 0][ok], r.drift(arch, "layercam")["pearson"][ok], rtol=1e-12)
        np.testing.assert_array_equal(node["raw_tt"], node["raw_tt"].transpose(1, 0, 2))
        energy = r.read(f"baselines/chains/energy/{arch}")
        assert energy["n_chains"] == 2 and energy["min_p"] == pytest.approx(2 / 4)
        assert np.isfinite(energy["statistic"]) and 0 < energy["p_value"] <= 1
    v = r.read("baselines/chains")["verdict"]
    assert v.startswith("Whole chains (2;") and "no test can reject" in v and "(a count across seeds, not a test)" in v


@pytest.fixture(scope="module", autouse=True)
def _torch_references(reference_kernels):
    """Every test here, module fixtures included, on the kernels' torch references (tests/conftest.py)."""
