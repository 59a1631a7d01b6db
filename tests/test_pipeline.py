"""End to end: the pipeline on a tiny synthetic study, resume after interruption, and CLI errors."""

import numpy as np
import pytest
import torch

from drift import config
from drift.archive import ArchiveReader
from drift.cli import main
from drift.pipeline import Pipeline

TINY = [
    'run.archs=["resnet10t", "resnet18"]', "run.progress=false", "data.image_size=64", "data.n_train=20",
    "data.n_val=10", "data.n_test=10", "model.weights=none", "train.transfer.epochs=1", "train.finetune.epochs=1",
    "train.finetune.lr=1e-3", "train.transfer.batch_size=10", "train.finetune.batch_size=10",
    'metrics.sample_set="all"', "metrics.n_boot=20", "fisher.n_spectrum=3", "fisher.n_components=2",
    "fisher.eps_grid=[0.05]", "fisher.alphas=[1.0]", "fisher.batch_size=2", "report.enabled=false",
    "train.finetune.per_arch.resnet18.epochs=2", "train.finetune.per_arch.resnet18.patience=2",
    "model.input_scale={resnet18 = 1.5}",
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


def test_archive_holds_every_stage(full_run):
    cfg, _, r = full_run
    names = [s["name"] for s in r.stages]
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
    assert r.attrs["schema_version"] == 1 and r.attrs["git_commit"]


def test_archived_logits_are_the_checkpoints_outputs(full_run):
    """Independent check: reload each checkpoint and recompute the test logits from regenerated images."""
    from drift.data import load_synthetic
    from drift.models import load_checkpoint

    cfg, pipe, r = full_run
    d = cfg.data
    test = load_synthetic(d.n_train, d.n_val, d.n_test, d.image_size, cfg.run.seed, difficulty=d.difficulty,
                          confounder=d.confounder).test
    x = test.images()
    for arch in cfg.run.archs:
        for stage in ("transfer", "finetune"):
            meta = r.read(f"models/{arch}/{stage}")
            model = load_checkpoint(meta["checkpoint"], arch, 5).eval()
            with torch.no_grad():
                logits = model(x).numpy()
            ev = r.evaluation(arch, stage)
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
            per = r.drift(arch, method)
            k = int(np.ceil(0.2 * a.shape[1]))
            for i in np.flatnonzero(per["valid"]):
                ta = set(np.argsort(-a[i], kind="stable")[:k])
                tb = set(np.argsort(-b[i], kind="stable")[:k])
                assert per["iou@20"][i] == pytest.approx(len(ta & tb) / len(ta | tb), abs=1e-6)


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
        per = r.drift("resnet10t", method)
        for i in np.flatnonzero(per["valid"]):
            assert per["marker_mass_ft"][i] == pytest.approx(b[i][marker[i]].sum() / b[i].sum(), abs=1e-5)
        assert "marker_mass" in r.drift_summary("resnet10t", method)["paired"]


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
        for stage in ("transfer", "finetune"):
            f = r.fisher(arch, stage)
            ev = f["eigenvalues"]
            assert ev.shape == (3, 4) and (np.diff(ev, axis=1) <= 1e-12 * ev.max()).all()
            assert (f["rank"] <= 4).all()
            c = f["components"]
            np.testing.assert_allclose(c["x_high"] + c["x_low"], c["x"].astype(np.float32), atol=2e-3)


def test_resume_after_interruption_gives_the_same_results(full_run, tmp_path):
    cfg, _, ref = full_run
    out = tmp_path / "resumed"
    Pipeline(tiny(out)).run(("data", "train"))  # interrupted after training
    resumed = ArchiveReader(Pipeline(tiny(out)).run(("data", "train", "attributions", "drift", "stats")))
    for arch in cfg.run.archs:
        for stage in ("transfer", "finetune"):
            np.testing.assert_array_equal(resumed.evaluation(arch, stage)["logits"],
                                          ref.evaluation(arch, stage)["logits"])
        for method in cfg.attribution.methods:
            a, b = resumed.drift(arch, method), ref.drift(arch, method)
            np.testing.assert_array_equal(a["iou@20"], b["iou@20"])
            np.testing.assert_array_equal(a["centroid_shift"], b["centroid_shift"])


def test_rerun_skips_finished_stages(full_run, monkeypatch):
    cfg, pipe, _ = full_run
    import drift.pipeline as pl

    def boom(*a, **k):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(pl, "train_transfer", boom)
    monkeypatch.setattr(pl, "train_finetune", boom)
    monkeypatch.setattr(Pipeline, "stage_report", lambda self: None)
    Pipeline(cfg).run()


def test_cli_errors_name_the_culprit(tmp_path, capsys):
    assert main(["run", "--set", "train.transfer.epochz=1", "--out", str(tmp_path)]) == 2
    assert "train.transfer.epochz" in capsys.readouterr().err
    assert main(["run", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml" in capsys.readouterr().err
    assert main(["summary", str(tmp_path / "missing.h5")]) == 2
    assert "missing.h5" in capsys.readouterr().err


def test_resume_refuses_an_archive_of_another_config(full_run, capsys):
    cfg, _, r = full_run
    argv = ["run", "--out", str(r.path.parent), "--set", "run.seed=99", *sum((["--set", s] for s in TINY), [])]
    assert main(argv) == 2
    assert "another configuration" in capsys.readouterr().err


def test_help_explains_itself(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for cmd in ("run", "attribute", "metrics", "fisher", "report", "compare", "bench"):
        assert cmd in text


def test_shipped_smoke_config_runs_end_to_end(tmp_path, capsys):
    """configs/smoke.toml as shipped (a 4-step one-cycle fine-tuning stage among others) runs every stage."""
    from pathlib import Path

    smoke = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
    assert main(["run", "--config", str(smoke), "--out", str(tmp_path), "--no-progress"]) == 0
    r = ArchiveReader(tmp_path / "archive.h5")
    cfg = config.load(str(smoke))
    names = {s["name"] for s in r.stages}
    assert {"data", "stats"} <= names
    for arch in cfg.run.archs:
        assert {f"models/{arch}/transfer", f"models/{arch}/finetune", f"drift/{arch}", f"fisher/{arch}"} <= names
        for stage in ("transfer", "finetune"):
            ev = r.evaluation(arch, stage)
            assert ev["accuracy"] == pytest.approx(float(np.mean(ev["logits"].argmax(1) == ev["labels"])))
            assert len(r.history(arch, stage)["epoch"]) <= getattr(cfg.train, stage).epochs
    assert (tmp_path / "report" / "report.html").is_file()
