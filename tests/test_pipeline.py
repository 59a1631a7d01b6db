"""End to end: the pipeline on a tiny synthetic study, resume after interruption, and CLI errors."""

import itertools

import numpy as np
import pytest
import scipy.ndimage
import torch

from drift import config, source_weights
from drift.archive import SCHEMA_VERSION, ArchiveReader
from drift.cli import main
from drift.pipeline import Pipeline

TINY = [
    'run.archs=["resnet10t", "resnet18"]', "run.progress=false", "data.image_size=64", "data.n_train=20",
    "data.n_val=10", "data.n_test=10", "model.weights=none", "train.transfer.epochs=1", "train.finetune.epochs=1",
    "train.finetune.lr=1e-3", "train.transfer.batch_size=10", "train.finetune.batch_size=10",
    'metrics.sample_set="all"', "metrics.n_boot=20", "fisher.n_spectrum=3", "fisher.n_components=2",
    "fisher.eps_grid=[0.05]", "fisher.alphas=[1.0]", "fisher.batch_size=2", "report.enabled=false",
    "train.finetune.per_arch.resnet18.epochs=2", "train.finetune.per_arch.resnet18.patience=2",
    "model.input_scale={resnet18 = 1.5}", "metrics.min_per_class=1", 'metrics.normalize=["minmax", "none"]',
    'metrics.upsample=["bilinear-halfpixel", "zoom-corners", "none"]',
]


def tiny(out, *extra):
    return config.load(None, [*TINY, f'run.out="{out}"', *extra])


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    cfg = tiny(out)
    pipe = Pipeline(cfg)
    path = pipe.run()
    return cfg, pipe, ArchiveReader(path)


def test_archive_holds_every_step(full_run):
    cfg, _, r = full_run
    names = [s["name"] for s in r.commits]
    for arch in cfg.run.archs:
        for part in (f"models/{arch}/transfer", f"models/{arch}/finetune", f"attributions/{arch}", f"drift/{arch}",
                     f"fisher/{arch}"):
            assert part in names
    assert "data" in names and "stats" in names
    for arch, epochs, side in (("resnet10t", 1, 64), ("resnet18", 2, 96)):  # per-architecture settings
        attrs = r.read(f"models/{arch}/finetune")
        assert attrs["epochs"] == epochs and len(r.history(arch, "finetune")["epoch"]) == epochs
        assert attrs["input_size"] == side
        grid = -(-side // 32)  # the CAM layer (stride 32) of the resampled input
        assert r.maps(arch, "finetune", "gradcam++").shape[1:] == (grid, grid)
        assert attrs["lr"] == cfg.train.finetune.lr and attrs["batch_size"] == cfg.train.finetune.batch_size
    assert r.config == cfg
    assert r.attrs["schema_version"] == SCHEMA_VERSION and r.attrs["git_commit"]


def test_archived_logits_are_the_checkpoints_outputs(full_run):
    """Independent check: reload each checkpoint and recompute the test logits from regenerated images."""
    from drift.data import load_synthetic
    from drift.weights import load_checkpoint

    cfg, pipe, r = full_run
    d = cfg.data
    test = load_synthetic(d.n_train, d.n_val, d.n_test, d.image_size, cfg.run.seed, difficulty=d.difficulty,
                          confounder=d.confounder).test
    x = test.images()
    for arch in cfg.run.archs:
        for phase in ("transfer", "finetune"):
            meta = r.read(f"models/{arch}/{phase}")
            model = load_checkpoint(meta["checkpoint"], arch, 5).eval()
            with torch.no_grad():
                logits = model(x).numpy()
            ev = r.evaluation(arch, phase)
            np.testing.assert_allclose(ev["logits"], logits, rtol=1e-4, atol=1e-4)
            assert ev["accuracy"] == pytest.approx(float((logits.argmax(1) == test.labels).mean()))
            np.testing.assert_array_equal(ev["confusion"].sum(1), np.bincount(test.labels, minlength=5))


def test_archived_iou_matches_brute_force_on_archived_maps(full_run):
    import torch.nn.functional as F

    cfg, _, r = full_run
    for arch in cfg.run.archs:
        for method in cfg.attribution.methods:
            a = torch.as_tensor(r.maps(arch, "transfer", method))
            b = torch.as_tensor(r.maps(arch, "finetune", method))
            up = lambda m: F.interpolate(m[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0]  # noqa
            a, b = up(a).numpy().reshape(len(a), -1), up(b).numpy().reshape(len(b), -1)
            per = r.drift(arch, method, r.primary_cell()._replace(norm="none"))  # the raw maps' metrics
            k = int(np.ceil(0.2 * a.shape[1]))

            def weights(m, k=k):  # top-k membership, tied pixels at the k-th value sharing the remaining places
                t = np.sort(m)[::-1][k - 1]
                return (m > t) + (m == t) * ((k - (m > t).sum()) / (m == t).sum())

            for i in np.flatnonzero(per["valid"]):
                if min((a[i] > 0).sum(), (b[i] > 0).sum()) < k:  # zeros never enter a top set: no IoU
                    assert np.isnan(per["iou@20"][i])
                    continue
                wa, wb = weights(a[i]), weights(b[i])  # weighted Jaccard (metrics.ties = "jaccard")
                want = np.minimum(wa, wb).sum() / np.maximum(wa, wb).sum()
                assert per["iou@20"][i] == pytest.approx(want, abs=1e-6)


def test_every_protocol_cell_is_archived_with_its_settings(full_run):
    """Maps per layer and score, drift per (layer, score, normalisation) and method, rankings per cell; the
    normalised metrics equal a brute-force recomputation from the archived raw maps."""
    import torch.nn.functional as F

    from drift.archive import Cell
    from drift.models import cam_layer_name

    cfg, _, r = full_run
    acfg, mcfg = cfg.attribution, cfg.metrics
    assert r.primary_cell() == Cell(acfg.layers[0], acfg.scores[0], mcfg.normalize[0], mcfg.upsample[0])
    assert len(r.cells()) == len(acfg.layers) * len(acfg.scores) * len(mcfg.normalize) * len(mcfg.upsample)
    for arch in cfg.run.archs:
        assert set(r.layers(arch)) == set(acfg.layers)
        for layer in acfg.layers:
            info = r.layer_info(arch, layer)
            assert info["module"] == cam_layer_name(arch, layer)
            for score in acfg.scores:
                agr = r.agreement(arch, layer, score)
                assert set(agr) == {"transfer", "finetune"}
                for mode, norm in itertools.product(mcfg.upsample, mcfg.normalize):
                    cell = Cell(layer, score, norm, mode)
                    assert set(r.methods(arch, cell)) == set(acfg.methods)
                    for method in acfg.methods:
                        a = torch.as_tensor(r.maps(arch, "transfer", method, layer, score)).double()
                        b = torch.as_tensor(r.maps(arch, "finetune", method, layer, score)).double()
                        size = 64 if mode != "none" else a.shape[1]
                        if mode == "zoom-corners":  # tf-keras-vis's resize, by scipy
                            up = lambda m: np.stack([scipy.ndimage.zoom(x, 64 / x.shape[0], order=1)  # noqa: E731
                                                     for x in m.numpy()])
                        elif mode == "bilinear-halfpixel":
                            up = lambda m: F.interpolate(m[:, None], size=(64, 64), mode="bilinear",  # noqa: E731
                                                         align_corners=False)[:, 0].numpy()
                        else:
                            up = lambda m: m.numpy()  # noqa: E731
                        a, b = up(a), up(b)
                        if norm == "minmax":
                            mm = lambda m: (m - m.min((1, 2), keepdims=True)) / np.ptp(m, (1, 2), keepdims=True)  # noqa
                            a, b = mm(a), mm(b)
                        per = r.drift(arch, method, cell)
                        ys, xs = np.mgrid[0:size, 0:size]
                        for i in np.flatnonzero(per["valid"]):
                            ca = np.array([(a[i] * ys).sum(), (a[i] * xs).sum()]) / a[i].sum()
                            cb = np.array([(b[i] * ys).sum(), (b[i] * xs).sum()]) / b[i].sum()
                            want = np.linalg.norm(ca - cb) / np.hypot(size, size)
                            assert per["centroid_shift"][i] == pytest.approx(want, rel=1e-4, abs=1e-6)
    for cell in r.cells():
        assert set(r.ranking(cell)) == set(mcfg.ranking_metrics)


def test_rankings_use_one_common_sample(full_run):
    """tp_all: the ranked images are those classified correctly by both checkpoints of every architecture."""
    cfg, _, r = full_run
    labels = r.read("data/test/labels")
    want = np.ones(len(labels), dtype=bool)
    for arch in cfg.run.archs:
        for phase in ("transfer", "finetune"):
            want &= r.evaluation(arch, phase)["logits"].argmax(1) == labels
    st = r.stats_attrs()
    assert st["ranking_sample_set"] == "tp_all" and st["n_ranked"] == int(want.sum())
    np.testing.assert_array_equal(r.read("stats/ranked"), want)


def test_changed_analysis_settings_are_recomputed_on_resume(tmp_path, monkeypatch):
    """A resume under another normalisation recomputes drift and statistics only; another layer recomputes the
    maps too; the archive records the new settings and never keeps stale cells."""
    import drift.attribution as attribution
    import drift.pipeline as pl
    from drift.archive import Cell

    base = ['run.archs=["resnet10t", "resnet18"]', "fisher.enabled=false", 'metrics.ranking_sample_set="all"']
    first = Pipeline(tiny(tmp_path, *base)).run()
    before_maps = ArchiveReader(first).maps("resnet10t", "finetune", "layercam", tiny(tmp_path).attribution.layers[0],
                                            "logit")

    def boom(*a, **k):
        raise AssertionError("training ran again")

    monkeypatch.setattr(pl, "train_transfer", boom)
    monkeypatch.setattr(pl, "train_finetune", boom)
    calls = []
    real = attribution.cams_multi
    monkeypatch.setattr(attribution, "cams_multi", lambda *a, **k: calls.append(1) or real(*a, **k))
    r = ArchiveReader(Pipeline(tiny(tmp_path, *base, 'metrics.normalize=["sum"]')).run())
    assert not calls  # the maps did not change
    assert r.config.metrics.normalize == ["sum"]
    assert {c.norm for c in r.cells()} == {"sum"}
    layer = r.config.attribution.layers[0]
    np.testing.assert_array_equal(r.maps("resnet10t", "finetune", "layercam", layer, "logit"),
                                  before_maps)
    assert r.ranking(Cell(r.primary_cell().layer, "logit", "sum"))
    block = tiny(tmp_path, *base, 'metrics.normalize=["sum"]', 'attribution.layers=["block"]')
    r = ArchiveReader(Pipeline(block).run())
    assert calls and r.layers("resnet10t") == ["block"]
    assert {c.layer for c in r.cells()} == {"block"}


def test_confounder_marker_masks_and_marker_mass_are_archived(tmp_path):
    """With the shortcut marker on, the archive holds its masks and the share of CAM mass on it per sample."""
    import torch.nn.functional as F

    from drift.data.synthetic import load_synthetic

    cfg = tiny(tmp_path, 'run.archs=["resnet10t"]', "data.confounder=0.9", "fisher.enabled=false")
    r = ArchiveReader(Pipeline(cfg).run())
    marker = r.read("data/test/marker_masks")
    expect = load_synthetic(20, 10, 10, 64, 0, difficulty=cfg.data.difficulty, confounder=0.9).test.marker_masks
    np.testing.assert_array_equal(marker, expect)
    assert marker.any(axis=(1, 2)).all()  # every image carries a plate
    for method in cfg.attribution.methods:
        b = torch.as_tensor(r.maps("resnet10t", "finetune", method))
        b = F.interpolate(b[:, None], size=(64, 64), mode="bilinear", align_corners=False)[:, 0].double().numpy()
        per = r.drift("resnet10t", method, r.primary_cell()._replace(norm="none"))  # on the raw maps
        for i in np.flatnonzero(per["valid"]):
            assert per["marker_mass_ft"][i] == pytest.approx(b[i][marker[i]].sum() / b[i].sum(), abs=1e-5)
        assert "marker_mass" in r.drift_summary("resnet10t", method, r.primary_cell()._replace(norm="none"))["paired"]


def test_seed_study_with_a_fixed_data_seed_is_comparable(tmp_path):
    """Two run seeds with one data seed share the test set (compare works); with data.seed = -1 they do not."""
    from drift import report
    from drift.data.synthetic import load_synthetic

    base = ['run.archs=["resnet10t"]', "fisher.enabled=false"]
    a = ArchiveReader(Pipeline(tiny(tmp_path / "a", *base, "run.seed=3", "data.seed=11")).run())
    b = ArchiveReader(Pipeline(tiny(tmp_path / "b", *base, "run.seed=4", "data.seed=11")).run())
    test = load_synthetic(20, 10, 10, 64, 11, difficulty=0.0).test
    for r in (a, b):
        np.testing.assert_array_equal(r.read("data/test/labels"), test.labels)
        np.testing.assert_array_equal(r.read("data/test/lung_masks"), test.lung_masks)
        assert r.attrs["data_seed"] == 11
    assert (a.attrs["seed"], b.attrs["seed"]) == (3, 4)
    la, lb = (r.evaluation("resnet10t", "finetune")["logits"] for r in (a, b))
    assert not np.allclose(la, lb)  # training did differ
    text = report.compare(a.path, b.path)
    assert "resnet10t" in text and "seed 3, data seed 11" in text and "seed 4, data seed 11" in text
    c = Pipeline(tiny(tmp_path / "c", *base, "run.seed=4")).run()  # data seed follows the run seed
    with pytest.raises(ValueError, match="different test samples"):
        report.compare(a.path, c)


def test_fisher_spectra_are_sorted_and_rank_bounded(full_run):
    cfg, _, r = full_run
    for arch in cfg.run.archs:
        for phase in ("transfer", "finetune"):
            f = r.fisher(arch, phase)
            ev = f["eigenvalues"]
            assert ev.shape == (3, 4) and (np.diff(ev, axis=1) <= 1e-12 * ev.max()).all()
            assert (f["rank"] <= 4).all()
            c = f["components"]
            np.testing.assert_allclose(c["x_high"] + c["x_low"], c["x"].astype(np.float32), atol=2e-3)


def test_ifim_controls_and_untrained_network_are_archived_and_summarised(full_run):
    """The fisher step's controls: every direction kind, the CAM region from the archived maps, an untrained network
    of the same architecture (BatchNorm statistics of the data, other weights than the trained models'), and the
    summary's table of them per eps with the KL ratio."""
    from drift.ifim_study import untrained_model
    from drift.perturb import KINDS
    from drift.summary import summary_text

    cfg, pipe, r = full_run
    for arch in cfg.run.archs:
        for model in ("finetune", "untrained"):
            p = r.read(f"fisher/{arch}/{model}/perturbation")
            assert [str(k) for k in p["kinds"]] == list(KINDS)
            assert p["abs_logodds_change"].shape[:3] == (len(KINDS), 1, 2)
            assert np.isfinite(p["abs_logodds_change"][KINDS.index("cam")]).all()  # a region from the CAMs
            assert np.all(p["kl"][np.isfinite(p["kl"])] >= 0)
        net = untrained_model(pipe, arch)
        trained = pipe.trained(arch, "finetune").model
        w = dict(net.named_parameters())
        assert any(not torch.equal(w[k].cpu(), v.cpu()) for k, v in trained.named_parameters())
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns and not torch.all(bns[0].running_var == 1)  # statistics of the data, not the reset ones
    text = summary_text(r.path)
    assert "iFIM controls" in text and "consistency check" in text
    for arch in cfg.run.archs:
        assert any(line.startswith(arch) and " untrained " in line for line in text.splitlines())


def test_resume_after_interruption_gives_the_same_results(full_run, tmp_path):
    cfg, _, ref = full_run
    out = tmp_path / "resumed"
    Pipeline(tiny(out)).run(("data", "train"))  # interrupted after training
    resumed = ArchiveReader(Pipeline(tiny(out)).run(("data", "train", "attributions", "drift", "stats")))
    for arch in cfg.run.archs:
        for phase in ("transfer", "finetune"):
            np.testing.assert_array_equal(resumed.evaluation(arch, phase)["logits"],
                                          ref.evaluation(arch, phase)["logits"])
        for method in cfg.attribution.methods:
            a, b = resumed.drift(arch, method), ref.drift(arch, method)
            np.testing.assert_array_equal(a["iou@20"], b["iou@20"])
            np.testing.assert_array_equal(a["centroid_shift"], b["centroid_shift"])


def test_rerun_skips_finished_steps(full_run, monkeypatch):
    cfg, pipe, _ = full_run
    import drift.pipeline as pl

    def boom(*a, **k):
        raise AssertionError("a finished step ran again")

    monkeypatch.setattr(pl, "train_transfer", boom)
    monkeypatch.setattr(pl, "train_finetune", boom)
    monkeypatch.setattr(Pipeline, "step_report", lambda self: None)
    Pipeline(cfg).run()


def test_resume_refuses_an_archive_of_another_config(full_run, capsys):
    cfg, _, r = full_run
    argv = ["run", "--out", str(r.path.parent), "--set", "run.seed=99", *sum((["--set", s] for s in TINY), [])]
    assert main(argv) == 2
    assert "written with other settings the checkpoints depend on (run.seed: 0 -> 99)" in capsys.readouterr().err


def test_shipped_smoke_config_runs_end_to_end(tmp_path, capsys):
    """configs/smoke.toml as shipped (with a one-cycle fine-tuning phase of 4 optimiser steps) runs every step."""
    from pathlib import Path

    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
    assert main(["run", "--config", str(smoke), "--out", str(tmp_path), "--no-progress"]) == 0
    r = ArchiveReader(tmp_path / "archive.h5")
    cfg = config.load(str(smoke))
    names = {s["name"] for s in r.commits}
    assert {"data", "stats"} <= names
    for arch in cfg.run.archs:
        assert {f"models/{arch}/transfer", f"models/{arch}/finetune", f"drift/{arch}", f"fisher/{arch}"} <= names
        for phase in ("transfer", "finetune"):
            ev = r.evaluation(arch, phase)
            assert ev["accuracy"] == pytest.approx(float(np.mean(ev["logits"].argmax(1) == ev["labels"])))
            assert len(r.history(arch, phase)["epoch"]) <= getattr(cfg.train, phase).epochs
    assert (tmp_path / "report" / "report.html").is_file()


# ---- synthetic-source weights: cache key, cache integrity, a real transfer phase

SOURCE_TINY = ["model.weights=synthetic-source", "source.n_train=12", "source.n_val=6", "source.batch_size=6",
               'source.precision="fp32"', 'run.archs=["resnet10t"]', "model.input_scale={}"]


def test_source_cache_key_follows_architecture_input_size_and_source_config(tmp_path):
    base = tiny(tmp_path, *SOURCE_TINY, f'model.cache_dir="{tmp_path}"')
    path = source_weights.cache_path(base, "resnet10t")
    assert path.parent == tmp_path / "source" and path.name.startswith("resnet10t-64px-")
    assert source_weights.cache_path(tiny(tmp_path, *SOURCE_TINY, f'model.cache_dir="{tmp_path}"'),
                                      "resnet10t") == path
    changed = [
        source_weights.cache_path(base, "resnet18"),
        source_weights.cache_path(tiny(tmp_path, *SOURCE_TINY, f'model.cache_dir="{tmp_path}"',
                                        "data.image_size=96"), "resnet10t"),
        source_weights.cache_path(tiny(tmp_path, *SOURCE_TINY, f'model.cache_dir="{tmp_path}"',
                                        "source.n_train=13"), "resnet10t"),
        source_weights.cache_path(tiny(tmp_path, *SOURCE_TINY, f'model.cache_dir="{tmp_path}"',
                                        'source.task="textures"'), "resnet10t"),
        source_weights.cache_path(tiny(tmp_path, *SOURCE_TINY, f'model.cache_dir="{tmp_path}"', "run.seed=1"),
                                   "resnet10t"),
    ]
    assert len({path, *changed}) == len(changed) + 1
    # The side the backbone sees is what the weights depend on (source images are drawn at that side): 96 px
    # images and 64 px images resampled to 96 px share weights.
    assert changed[1].name.startswith("resnet10t-96px-")
    assert source_weights.cache_path(tiny(tmp_path, *SOURCE_TINY, f'model.cache_dir="{tmp_path}"',
                                           "model.input_scale={resnet10t = 1.5}"), "resnet10t") == changed[1]
    # Settings the weights do not depend on leave the key alone.
    assert source_weights.cache_path(tiny(tmp_path, *SOURCE_TINY, f'model.cache_dir="{tmp_path}"',
                                           "train.finetune.lr=0.1", "data.n_test=11"), "resnet10t") == path


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-sidecar"])
def test_damaged_source_cache_is_rebuilt_not_loaded(tmp_path, monkeypatch, damage):
    import drift.source_weights as pipeline_module

    cfg = tiny(tmp_path, *SOURCE_TINY, f'model.cache_dir="{tmp_path}"')
    calls = {"pretrain": 0, "load": []}
    real_pretrain, real_load = pipeline_module.pretrain_source, pipeline_module.load_state

    def counting_pretrain(*args, **kwargs):
        calls["pretrain"] += 1
        return real_pretrain(*args, **kwargs)

    def recording_load(path):
        calls["load"].append(path)
        return real_load(path)

    monkeypatch.setattr(pipeline_module, "pretrain_source", counting_pretrain)
    monkeypatch.setattr(pipeline_module, "load_state", recording_load)
    first = source_weights.backbone(cfg, "resnet10t", torch.device("cpu"))
    path = source_weights.cache_path(cfg, "resnet10t")
    assert calls["pretrain"] == 1 and path.is_file() and path.with_name(path.name + ".sha256").is_file()
    again = source_weights.backbone(cfg, "resnet10t", torch.device("cpu"))  # a sound file is loaded
    assert calls["pretrain"] == 1 and calls["load"] == [path]
    assert all(torch.equal(again["state_dict"][k], v) for k, v in first["state_dict"].items())
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    else:
        path.with_name(path.name + ".sha256").unlink()
    calls["load"].clear()
    rebuilt = source_weights.backbone(cfg, "resnet10t", torch.device("cpu"))
    assert calls["pretrain"] == 2 and calls["load"] == []  # never unpickled the damaged file
    assert set(rebuilt["state_dict"]) == set(first["state_dict"])
    from drift.weights import sha256_file

    assert path.with_name(path.name + ".sha256").read_text().split()[0] == sha256_file(path)
    source_weights.backbone(cfg, "resnet10t", torch.device("cpu"))
    assert calls["pretrain"] == 2 and calls["load"] == [path]


def test_pretrain_command_fills_the_cache_and_transfer_phase_keeps_the_source_backbone(tmp_path, capsys):
    """`drift pretrain` makes the weights `drift run` then loads; the transfer phase trains the head only: every
    backbone parameter and BatchNorm running statistic of the transfer checkpoint equals the cached source weights."""
    from drift.weights import load_checkpoint

    extra = [*SOURCE_TINY, f'model.cache_dir="{tmp_path / "cache"}"']
    sets = [a for item in [*TINY, *extra, f'run.out="{tmp_path / "run"}"'] for a in ("--set", item)]
    assert main(["pretrain", *sets, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "pretraining once on the lesion-attributes task" in out and "held-out accuracy" in out
    assert "wall time" in out and not (tmp_path / "run" / "archive.h5").exists()
    cfg = tiny(tmp_path / "run", *extra)
    cached = source_weights.backbone(cfg, "resnet10t", torch.device("cpu"))
    assert "from cache" in capsys.readouterr().out
    pipe = Pipeline(cfg)
    pipe.trained("resnet10t", "transfer")
    assert "pretraining" not in capsys.readouterr().out
    ckpt = load_checkpoint(pipe.checkpoint_path("resnet10t", "transfer"), "resnet10t", 5)
    backbone = ckpt.backbone.state_dict()
    assert set(backbone) == set(cached["state_dict"])
    for k, v in cached["state_dict"].items():
        assert torch.equal(backbone[k], v), k
    assert any("running_var" in k for k in backbone)
    attrs = ArchiveReader(pipe.path).read("models/resnet10t/transfer")
    assert attrs["weights"].startswith("synthetic-source: lesion-attributes task") and attrs["bn_frozen"]
    assert "held-out accuracy" in attrs["weights"]


def test_saturation_counts_common_sample_and_their_summary_lines(full_run):
    """Per checkpoint, the images whose float32 softmax probability of the explained class is 1 or 0 (recomputed
    from the archived logits); per cell, the methods summarised on the images valid under all of them."""
    from drift.summary import summary_text

    cfg, pipe, r = full_run
    for arch in cfg.run.archs:
        g = r.read(f"attributions/{arch}")
        for phase in ("transfer", "finetune"):
            z = r.evaluation(arch, phase)["logits"].astype(np.float32)
            e = np.exp(z - z.max(1, keepdims=True))
            t = g["targets"][phase]
            p = (e / e.sum(1, keepdims=True))[np.arange(len(t)), t]
            np.testing.assert_array_equal(g["saturated"][phase], (p == 1) | (p == 0))
            assert g[f"n_saturated_{phase}"] == int(((p == 1) | (p == 0)).sum())
        for cell in r.cells():
            per = {m: r.drift(arch, m, cell) for m in cfg.attribution.methods}
            common = np.logical_and.reduce([ps["valid"].astype(bool) for ps in per.values()])
            for m, ps in per.items():
                np.testing.assert_array_equal(ps["in_common"], common)
                use = ps["selected"].astype(bool) & common & np.isfinite(ps["pearson"])
                assert int(np.sum(r.drift_summary(arch, m, cell)["pearson"]["n_per_class"])) == int(use.sum())
    text = summary_text(pipe.path)
    assert "float32 softmax probability of the explained class" in text
    assert "methods compared on the" in text
