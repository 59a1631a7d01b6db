"""Settings checked before compute, training that diverges stopped before a checkpoint, a collapsed model's report,
and resume messages that name what changed."""

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from drift import config
from drift.archive import ArchiveError, open_archive
from drift.cli import main
from drift.pipeline import Pipeline

SYNTHETIC = [
    'run.archs=["resnet10t"]', "run.progress=false", "data.image_size=64", "data.n_train=12", "data.n_val=6",
    "data.n_test=6", "model.weights=none", "train.transfer.epochs=1", "train.finetune.epochs=1",
    "train.transfer.batch_size=6", "train.finetune.batch_size=6", "fisher.enabled=false", "report.enabled=false",
]


def _sets(args: list[str]) -> list[str]:
    return [x for a in args for x in ("--set", a)]


def _logged(fn, *args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = fn(*args)
    return result, buf.getvalue()


# ---- every setting validated before compute

@pytest.mark.parametrize("setting, named", [
    ("model.dropout=1.5", "model.dropout must be a probability in [0, 1), got 1.5"),
    ("model.dropout=1.0", "model.dropout"),
    ('model.weights="imagnet"', "did you mean 'imagenet'?"),
    ('model.weights="synthetic_source"', "did you mean 'synthetic-source'?"),
    ("train.transfer.lr=nan", "train.transfer.lr must be a finite number > 0, got nan"),
    ("train.finetune.lr=inf", "train.finetune.lr must be a finite number > 0, got inf"),
    ("train.finetune.lr=-1e-3", "train.finetune.lr"),
    ("train.transfer.epochs=0", "train.transfer.epochs"),
    ("train.finetune.batch_size=2.5", "train.finetune.batch_size"),
    ("train.finetune.weight_decay=nan", "train.finetune.weight_decay"),
    ("train.finetune.per_arch.resnet10t.lr=inf", "train.finetune.per_arch.resnet10t.lr"),
    ("data.n_train=5", "train.transfer.batch_size = 6 is larger than the 5 training images"),
    ("train.finetune.per_arch.resnet10t.batch_size=13", "train.finetune.per_arch.resnet10t.batch_size = 13"),
])
def test_bad_settings_fail_before_the_data_step(tmp_path, capsys, setting, named):
    assert main(["run", "--out", str(tmp_path / "o"), *_sets([*SYNTHETIC, setting])]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing computed, the folder not even created (nor locked)


def test_source_settings_are_checked_when_the_source_weights_are_used(tmp_path, capsys):
    args = [a for a in SYNTHETIC if not a.startswith("model.weights")]
    assert main(["run", "--out", str(tmp_path / "o"), *_sets([*args, "source.lr=nan"])]) == 2
    assert "source.lr must be a finite number > 0, got nan" in capsys.readouterr().err
    small = ["source.n_train=15", "source.batch_size=16"]
    assert main(["run", "--out", str(tmp_path / "o"), *_sets([*args, *small])]) == 2
    assert "source.batch_size = 16 is larger than source.n_train = 15" in capsys.readouterr().err
    config.load(None, [*SYNTHETIC, "source.lr=nan"])  # unused under model.weights = none


def test_diverging_training_stops_before_any_checkpoint(tmp_path, capsys):
    lr = float(torch.empty(1, dtype=torch.float64).uniform_(1e38, 3e38))  # finite, but the weights overflow
    out = tmp_path / "o"
    assert main(["run", "--out", str(out), *_sets([*SYNTHETIC, f"train.transfer.lr={lr}"])]) == 2
    err = capsys.readouterr().err
    assert "resnet10t transfer: training diverged in epoch 1" in err
    assert f"train.transfer.lr = {lr!r}" in err and len(err.strip().splitlines()) == 1
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    assert [c["name"] for c in open_archive(out / "archive.h5").commits] == ["data"]


def test_the_figures_of_a_collapsed_model_render(rng):
    """A model that predicts one class: zero iFIM spectra on a log axis, NaN validation curves."""
    from drift.figures import CurvePanel, curve_grid, to_png, training_history

    n, e = (int(v) for v in torch.randint(2, 9, (2,), generator=rng))
    zeros = np.zeros((n, e))
    png = to_png(curve_grid([CurvePanel("KL", np.arange(1, e + 1) / 10, "eps", "KL (nats)",
                                        {"high": zeros, "low": -np.abs(zeros)}, logy=True)]))
    assert png[:4] == b"\x89PNG"
    const = np.full(e, float(torch.rand(1, generator=rng)))
    hist = {"r": {p: {"train_loss": const, "val_loss": const, "val_auc": np.full(e, np.nan),
                      "val_accuracy": np.full(e, np.nan)} for p in ("transfer", "finetune")}}
    fig = training_history(hist)
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts == ["no finite value"] and to_png(fig)[:4] == b"\x89PNG"


# ---- resume messages name what changed; equal paths are equal; versions recorded

def _images(root: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_a_refused_resume_names_the_settings_that_changed(tmp_path):
    args = [*SYNTHETIC, f'run.out="{tmp_path}"']
    Pipeline(config.load(None, args)).run(("data",))
    lr = float(torch.rand(1)) / 100 + 1e-4
    with pytest.raises(ArchiveError) as e:
        Pipeline(config.load(None, [*args, f"train.transfer.lr={lr}", "model.dropout=0.3"]))
    msg = str(e.value)
    assert f"train.transfer.lr: 0.001 -> {lr!r}" in msg and "model.dropout: 0.2 -> 0.3" in msg
    assert "hash" not in msg


def test_equal_places_and_devices_resume_without_recomputing(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _images(root, 4, int(torch.randint(0, 1000, (1,))))
    out = tmp_path / "out"
    base = [*SYNTHETIC, 'data.source="folder"', f'run.out="{out}"', 'run.device="auto"']
    Pipeline(config.load(None, [*base, f'data.path="{root}"', 'model.cache_dir="c1"'])).run(("data",))
    monkeypatch.chdir(tmp_path)
    moved = tmp_path / "moved"
    for path, device, cache in (("data", "cpu", "c1"), (str(root) + "/", "auto", str(tmp_path / "c2"))):
        _, log = _logged(Pipeline(config.load(None, [*base, f'data.path="{path}"', f'run.device="{device}"',
                                                     f'model.cache_dir="{cache}"'])).run, ("data",))
        assert "computing it again" not in log
    shutil.move(root, moved)  # the data folder moved (modification times kept)
    _, log = _logged(Pipeline(config.load(None, [*base, 'data.path="moved"'])).run, ("data",))
    assert "computing it again" not in log
    (moved / "a" / "0.png").unlink()  # other data: named, recomputed
    _, log = _logged(Pipeline(config.load(None, [*base, 'data.path="moved"'])).run, ("data",))
    assert "data: the data changed" in log


def test_drift_version_is_in_every_fingerprint_and_versions_are_recorded(tmp_path, monkeypatch):
    import timm

    args = [*SYNTHETIC, f'run.out="{tmp_path}"']
    Pipeline(config.load(None, args)).run(("data",))
    r = open_archive(tmp_path / "archive.h5")
    (entry,) = r.commits
    from drift.rundir import drift_version

    assert entry["inputs"]["drift"] == drift_version() and entry["versions"]["torch"] == torch.__version__
    assert entry["versions"]["drift"] == drift_version() and entry["versions"]["timm"] == timm.__version__
    old = drift_version()
    monkeypatch.setattr("drift.pipeline.drift_version", lambda: "99.0+feedface")
    monkeypatch.setattr("drift.rundir.drift_version", lambda: "99.0+feedface")
    _, log = _logged(Pipeline(config.load(None, args)).run, ("data",))
    assert f"data: drift changed ({old} -> 99.0+feedface) since it was computed; computing it again" in log
    r = open_archive(tmp_path / "archive.h5")
    assert r.commits[0]["versions"]["drift"] == "99.0+feedface"
    assert json.loads(r.attrs["versions"])["drift"] == "99.0+feedface"  # the root provenance follows
    from drift.report.document import Run
    from drift.report.provenance import sections

    (table,) = [b for s in sections(Run.open(r.path)) for b in s.blocks if getattr(b, "id", "") == "tbl-commits"]
    assert table.header[-1] == "computed by" and "drift 99.0+feedface" in table.rows[0][-1]
    assert math.isfinite(float(table.rows[0][1]))


@pytest.fixture(scope="module", autouse=True)
def _torch_references(reference_kernels):
    """Every test here, module fixtures included, on the kernels' torch references (tests/conftest.py)."""
