"""Nothing silently wrong: odd names, stale resumes, changed data, bad settings and hostile output folders either
work or stop with one line naming the key, file or folder (rc 2). See docs/reliability.md."""

import contextlib
import errno
import io
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from drift import config
from drift.archive import ArchiveError, OutputError, open_archive
from drift.cli import main
from drift.data import DataError
from drift.pipeline import Pipeline

SYNTHETIC = [
    'run.archs=["resnet10t"]', "run.progress=false", "data.image_size=64", "data.n_train=12", "data.n_val=6",
    "data.n_test=6", "model.weights=none", "train.transfer.epochs=1", "train.finetune.epochs=1",
    "train.transfer.batch_size=6", "train.finetune.batch_size=6", 'metrics.sample_set="all"',
    'metrics.ranking_sample_set="all"', "metrics.n_boot=10", "metrics.min_per_class=1", "fisher.enabled=false",
    "report.enabled=false",
]

# Class folders a demanding user has: typographic dash and diacritics, matplotlib mathtext that does not parse,
# and an HTML payload.
CLASSES = ("Pleural effusion – ünïcode", r"tb $\undefinedsymbol$", "<img src=x onerror=alert(1)>")


def _folder_args(root: Path, out: Path) -> list[str]:
    return [*SYNTHETIC, 'data.source="folder"', f'data.path="{root}"', "data.val_fraction=0.3",
            "data.test_fraction=0.3", "report.enabled=true", f'run.out="{out}"']


def _sets(args: list[str]) -> list[str]:
    return [x for a in args for x in ("--set", a)]


def _images(root: Path, cls: str, names: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / cls).mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(root / cls / name)


def _logged(fn, *args):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        result = fn(*args)
    return result, buf.getvalue()


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A folder study killed after its data step; images are then added and the run resumed to the end."""
    root, out = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("out")
    for k, cls in enumerate(CLASSES):
        _images(root, cls, [f"tb_{i:02d}_Müller.png" for i in range(5)], k)
    args = _folder_args(root, out)
    Pipeline(config.load(None, args)).run(("data",))
    for k, cls in enumerate(CLASSES):
        _images(root, cls, [f"neu_{i}_Ærø.png" for i in range(2)], 10 + k)
    path, log = _logged(Pipeline(config.load(None, args)).run)
    return root, out, args, path, log


# ---- 1, 3, 4: a folder data set with non-ASCII, mathtext and HTML class names, changed after its data step

def test_changed_data_recomputes_everything_after_the_data_step(folder_run):
    _, _, _, path, log = folder_run
    assert "data: the data changed" in log
    r = open_archive(path)
    ids = list(r.read("data/test/ids"))
    assert int(np.sum([r.read("data/counts")[s] for s in ("train", "val", "test")])) == 21
    assert any("Ærø" in i for i in ids)
    assert len(r.evaluation("resnet10t", "finetune")["logits"]) == len(ids)
    assert list(r.drift("resnet10t", "layercam")["ids"]) == ids
    data = next(s for s in r.commits if s["name"] == "data")
    assert data["inputs"]["data"] != data["inputs"]["settings"]  # the files' fingerprint, not the config's


def test_non_ascii_names_work_end_to_end(folder_run, capsys):
    _, out, args, path, _ = folder_run
    data = open_archive(path).read("data")
    assert json.loads(data["class_names"]) == sorted(CLASSES)
    assert all("Müller" in i or "Ærø" in i for i in data["test"]["ids"])
    assert any(i.startswith("Pleural effusion – ünïcode/") for i in data["test"]["ids"])
    assert main(["summary", str(path)]) == 0
    assert "resnet10t" in capsys.readouterr().out
    assert main(["report", str(path)]) == 0
    assert (out / "report" / "report.html").is_file()
    before = open_archive(path).commits
    assert main(["run", *_sets(args)]) == 0  # resume: every step is current, the report is rewritten
    assert open_archive(path).commits == before
    assert not (out / ".lock").exists()


def test_class_names_are_plain_text_in_figures_and_report(folder_run):
    from drift import figures

    _, out, _, _, _ = folder_run
    md = (out / "report" / "report.md").read_text(encoding="utf-8")
    page = (out / "report" / "report.html").read_text(encoding="utf-8")
    for text in (md, page):
        assert "<img src=x" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert r"tb \$\\undefinedsymbol\$" in md  # escaped: no TeX math, no stray backslash escape
    # The cause: mathtext would fail on the class name; inside the report's figure context it is plain text.
    fig = figures.new_figure(2, 1)
    fig.add_subplot().set_title(CLASSES[1])
    with pytest.raises(ValueError):
        figures.to_png(fig)
    with figures.plain_text():
        fig = figures.new_figure(2, 1)
        fig.add_subplot().set_title(CLASSES[1])
        assert figures.to_png(fig)[:4] == b"\x89PNG"


def test_archive_text_round_trips_unicode(tmp_path):
    from drift.archive import Archive
    from drift.h5tree import write_tree

    names = np.asarray(["Pleural effusion – ünïcode/tb_00_Müller.png", "数据/ørken.png", "emoji 🫁.png", "plain"])
    a = Archive(tmp_path / "a.h5", "seed = 1\n", "h")
    with a.commit("one") as f:
        write_tree(f, {"ids": names, "grid": names.reshape(2, 2), "name": "Ærø – $x$"})
    back = open_archive(tmp_path / "a.h5").read("/")
    assert list(back["ids"]) == list(names) and back["grid"].tolist() == names.reshape(2, 2).tolist()
    assert back["name"] == "Ærø – $x$"


# ---- 2: the environment the results depend on is part of what a resume checks

def test_thread_count_and_versions_invalidate_a_resume(tmp_path, monkeypatch):
    import timm

    import drift.pipeline as pl

    args = [*SYNTHETIC, f'run.out="{tmp_path}"']
    threads = torch.get_num_threads()
    Pipeline(config.load(None, args)).run(("data", "train"))
    calls = []
    real = pl.train_transfer
    monkeypatch.setattr(pl, "train_transfer", lambda *a, **k: calls.append(1) or real(*a, **k))
    try:
        pipe = Pipeline(config.load(None, [*args, f"run.threads={threads + 1}"]))
        assert pipe.environment["threads"] == str(threads + 1)
        _, log = _logged(pipe.run, ("data", "train"))
    finally:
        torch.set_num_threads(threads)
    assert calls and f"threads changed ({threads} -> {threads + 1})" in log
    assert "data:" not in log  # the data do not depend on threads
    inputs = open_archive(tmp_path / "archive.h5").commits[-1]["inputs"]
    assert {"threads", "device", "precision", "torch", "timm", "data", "settings"} <= set(inputs)
    assert inputs["threads"] == str(threads + 1) and inputs["device"] == "cpu"
    monkeypatch.setattr(timm, "__version__", "0.0.0-other")
    pipe = Pipeline(config.load(None, [*args, f"run.threads={threads + 1}"]))
    try:
        todo, log = _logged(pipe._todo, "models/resnet10t/transfer", "train")
    finally:
        torch.set_num_threads(threads)
        pipe.lock.release()
    assert todo and "timm changed" in log and "0.0.0-other" in log
    assert not pipe._todo("data", "data")


# ---- 6: data.classes catches label typos and fixes the class order

def test_data_classes_rejects_a_typo_and_fixes_the_order(tmp_path):
    for k, cls in enumerate(("covid", "normal", "Covid")):
        _images(tmp_path / "data", cls, [f"{i}.png" for i in range(4)], k)
    base = [*SYNTHETIC, 'data.source="folder"', f'data.path="{tmp_path / "data"}"', f'run.out="{tmp_path / "o"}"']
    pipe = Pipeline(config.load(None, [*base, 'data.classes=["normal", "covid"]']))
    with pytest.raises(DataError, match="Covid"):
        _ = pipe.splits
    pipe.lock.release()
    for p in (tmp_path / "data" / "Covid").iterdir():  # the typo fixed
        p.rename(tmp_path / "data" / "covid" / f"x{p.name}")
    (tmp_path / "data" / "Covid").rmdir()
    pipe = Pipeline(config.load(None, [*base, 'data.classes=["normal", "covid"]']))
    assert pipe.class_names == ["normal", "covid"]
    pipe.lock.release()
    rows = "path,label\n" + "".join(f"normal/{i}.png,normal\n" for i in range(4)) + "covid/0.png,Covid\n"
    (tmp_path / "data" / "m.csv").write_text(rows)
    csv = [*base, 'data.source="csv"', f'data.path="{tmp_path / "data" / "m.csv"}"']
    assert main(["run", *_sets([*csv, 'data.classes=["normal", "covid"]'])]) == 2


# ---- 8: settings are checked before any compute

@pytest.mark.parametrize("setting, named", [
    ("data.n_test=0", "data.n_test"), ("data.n_train=-1", "data.n_train"), ("data.val_fraction=0", "val_fraction"),
    ('metrics.ranking_metrics=["iou@25"]', "iou@25"), ('metrics.ranking_metrics=["pearsn"]', "pearsn"),
    ("fisher.n_components=-1", "fisher.n_components"), ("fisher.n_spectrum=-1", "fisher.n_spectrum"),
    ("fisher.eps_grid=[-0.1]", "fisher.eps_grid"), ("fisher.eps_grid=[]", "fisher.eps_grid"),
    ("fisher.alphas=[1.5]", "fisher.alphas"), ("run.threads=-2", "run.threads"),
    ('data.classes=["a", "a"]', "data.classes"), ("metrics.n_boot=0", "metrics.n_boot"),
])
def test_bad_settings_fail_before_any_compute(tmp_path, capsys, setting, named):
    assert main(["run", "--out", str(tmp_path / "o"), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert named in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_device_names_are_checked(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path), "--device", "tpu"]) == 2
    err = capsys.readouterr().err
    assert "run.device" in err and "cuda:N" in err
    ok = config.load(None, ["run.device=cpu"])
    assert ok.run.device == "cpu" and config.load(None, ['run.device="cuda:1"']).run.device == "cuda:1"
    assert config.load(None, ["metrics.ranking_metrics=[\"iou@50\"]", "metrics.fractions=[0.5]"])


# ---- 9: the edges of a run: output folder, weights file, a second run, SIGTERM, a full disk

def test_out_that_is_a_file_or_under_one(tmp_path, capsys):
    f = tmp_path / "results.txt"
    f.write_text("not a folder")
    for out in (f, f / "run"):
        assert main(["run", "--out", str(out), *_sets(SYNTHETIC)]) == 2
        err = capsys.readouterr().err
        assert str(f) in err and "is a file" in err and "Traceback" not in err
    assert f.read_text() == "not a folder"


def _deny_writes_under(monkeypatch, folder: Path) -> None:
    """Root writes through permission bits: make opening for writing under ``folder`` fail as it would for a user."""
    if os.geteuid() != 0:
        return
    real = os.open

    def guarded(path, flags, *a, **k):
        if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", guarded)


def test_read_only_output_folder(tmp_path, capsys, monkeypatch):
    import drift.report as report

    out = tmp_path / "ro"
    args = [*SYNTHETIC, f'run.out="{out}"']
    Pipeline(config.load(None, args)).run(("data",))  # a run that got somewhere
    out.chmod(0o555)
    try:
        _deny_writes_under(monkeypatch, out)
        assert main(["run", *_sets(args)]) == 2
        err = capsys.readouterr().err
        assert "not writable" in err and str(out) in err and len(err.strip().splitlines()) == 1
        if os.geteuid() == 0:
            def denied(path, data):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))

            monkeypatch.setattr(report, "write_atomic", denied)
        assert main(["report", str(out / "archive.h5"), "--out", str(out / "report")]) == 2
        err = capsys.readouterr().err
        assert "Permission denied" in err and str(out) in err and "Traceback" not in err
    finally:
        out.chmod(0o755)


def test_fake_safetensors_weights_are_named(tmp_path, capsys):
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"<html>403 Forbidden</html>")
    assert main(["run", "--out", str(tmp_path / "o"), *_sets(SYNTHETIC), "--set", f'model.weights="{fake}"']) == 2
    err = capsys.readouterr().err
    assert str(fake) in err and "safetensors" in err and len(err.strip().splitlines()) == 1


def test_a_second_run_in_one_folder_is_refused_and_a_stale_lock_recovered(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    other = subprocess.Popen(["sleep", "60"])
    try:
        (out / ".lock").write_text(f"{other.pid}\n")
        assert main(["run", "--out", str(out), *_sets(SYNTHETIC)]) == 2
        err = capsys.readouterr().err
        assert f"pid {other.pid}" in err and "another drift run" in err
        assert not (out / "archive.h5").exists()
    finally:
        other.kill()
        other.wait()
    (out / ".lock").write_text(f"{other.pid}\n")  # that process is gone: its lock is stale
    pipe = Pipeline(config.load(None, [*SYNTHETIC, f'run.out="{out}"']))
    assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    pipe.run(("data",))
    assert not (out / ".lock").exists()
    assert open_archive(out / "archive.h5").commits[0]["name"] == "data"


def test_sigterm_leaves_no_tmp_and_one_line(tmp_path, capsys, monkeypatch):
    import drift.pipeline as pl

    def killed(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(pl, "write_tree", killed)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["run", "--out", str(tmp_path), *_sets(SYNTHETIC)]) == 143
    err = capsys.readouterr().err
    assert "terminated" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "archive.h5.tmp").exists() and not (tmp_path / ".lock").exists()
    assert open_archive(tmp_path / "archive.h5").commits == []
    assert signal.getsignal(signal.SIGTERM) == before


def test_disk_full_while_saving_a_checkpoint(tmp_path, capsys, monkeypatch):
    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    assert main(["run", "--out", str(tmp_path), *_sets(SYNTHETIC)]) == 2
    err = capsys.readouterr().err
    ckpt = tmp_path / "checkpoints" / "resnet10t-transfer.pt"
    assert f"cannot write checkpoint {ckpt}: no space left on device" in err
    assert len(err.strip().splitlines()) == 1
    assert list((tmp_path / "checkpoints").iterdir()) == [] and not (tmp_path / ".lock").exists()
    with pytest.raises(OutputError):
        from drift.models import build
        from drift.weights import save_checkpoint

        save_checkpoint(build("resnet10t", 2), tmp_path / "x.pt")
    assert not (tmp_path / "x.pt.tmp").exists()


# ---- 10: a run that finished no step does not lock its folder

def test_a_run_that_finished_no_step_is_replaced(tmp_path, capsys):
    root = tmp_path / "data"
    for k, cls in enumerate(("a", "b")):
        _images(root, cls, [f"{i}.png" for i in range(5)], k)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = [*SYNTHETIC, 'data.source="folder"', f'data.path="{root}"', f'run.out="{tmp_path / "o"}"']
    assert main(["run", *_sets(args)]) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "--set data.skip_bad=true" in err
    assert open_archive(tmp_path / "o" / "archive.h5").commits == []
    path = Pipeline(config.load(None, [*args, "data.skip_bad=true"])).run(("data",))  # another config: fine
    r = open_archive(path)
    assert [s["name"] for s in r.commits] == ["data"]
    assert list(r.read("data/skipped/files")) == ["a/broken.png"]
    with pytest.raises(ArchiveError, match="other settings .*data.skip_bad: True -> False"):  # a finished step
        Pipeline(config.load(None, args))
    assert not (tmp_path / "o" / ".lock").exists()


@pytest.fixture(scope="module", autouse=True)
def _torch_references(reference_kernels):
    """Every test here, module fixtures included, on the kernels' torch references (tests/conftest.py)."""
