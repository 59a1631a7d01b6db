"""bench/gpu_check.py: the dry run under the GPU machine's package set, step selection, packing; gpu_study's config.

The GPU machine lacks grad-cam, ttach and asv; the dry run hides them from every process it starts, installs
wheels/ into a temporary target as setup would, and imports what each step needs. It must pass with the
committed wheels and fail, naming the step, when a needed module is missing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
import gpu_study  # noqa: E402


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)  # fmt: skip


def test_wheels_hold_pure_python_grad_cam_and_ttach():
    files = gpu_check.wheel_files(ROOT / "wheels")
    assert sorted(files) == ["grad-cam", "ttach"], files
    for dist, path in files.items():
        assert path.name.endswith("-py3-none-any.whl"), path  # pure Python: installs on any CPython 3
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
        top = {"grad-cam": "pytorch_grad_cam/__init__.py", "ttach": "ttach/__init__.py"}[dist]
        assert top in names and not any(n.endswith((".so", ".pyd")) for n in names), dist


def test_dry_run_under_the_gpu_package_set_passes_and_names_every_step():
    done = _dry_run()
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "without asv, pytorch_grad_cam, ttach" in out
    assert "setup: installed from wheels/ into" in out and "grad-cam ttach" in out
    for step in gpu_check.steps():
        assert f"  {step.name}: imports: " in out, step.name
    assert "compiled-kernel tests in tests/kernels" in out and out.rstrip().endswith("dry run: ok")


def test_dry_run_fails_when_a_needed_module_is_missing(tmp_path):
    # No wheels: grad-cam and ttach stay hidden, so setup and the cams step fail and say why; timm hidden too
    # (no wheel provides it): the ifim step fails on it.
    done = _dry_run("--only", "setup", "cams", "ifim", "--wheels", str(tmp_path), "--hide", "timm")
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert f"no wheel of grad-cam in {tmp_path}/" in out and f"no wheel of ttach in {tmp_path}/" in out
    assert "PROBLEM: cams: does not import: ModuleNotFoundError: No module named 'pytorch_grad_cam'" in out
    assert "PROBLEM: ifim: does not import: ModuleNotFoundError: No module named 'timm'" in out
    assert "cams: imports:" not in out and "ifim: imports:" not in out and "dry run: ok" not in out


def test_only_and_skip_select_steps_in_order():
    assert gpu_check.select(None, None) == list(gpu_check.STEP_NAMES)
    assert gpu_check.select(["cams", "tests"], None) == ["tests", "cams"]
    assert gpu_check.select(None, ["setup", "cams"]) == ["tests", "resources", "kernels", "ifim"]
    with pytest.raises(SystemExit, match="unknown step 'camz'"):
        gpu_check.select(["camz"], None)


def test_a_step_that_fails_or_cannot_start_is_recorded_and_the_next_runs(tmp_path):
    ok = gpu_check.Step("ok", "prints", ["python", "-c", "print('fine')"], 30, [])
    bad = gpu_check.Step("bad", "fails", ["python", "-c", "raise SystemExit(3)"], 30, [])
    gone = gpu_check.Step("gone", "no program", ["/nonexistent/prog"], 30, [])
    slow = gpu_check.Step("slow", "overruns", ["python", "-c", "import time; time.sleep(30)"], 30, [])
    env = dict(os.environ)
    recs = [gpu_check.run_step(s, env, t, tmp_path) for s, t in ((bad, 30), (gone, 30), (slow, 1), (ok, 30))]
    assert [r["status"] for r in recs[:1]] == ["failed"] and recs[0]["rc"] == 3
    assert recs[1]["status"].startswith("failed: ") and "could not start" in (tmp_path / "gone.log").read_text()
    assert recs[2]["status"] == "stopped after 1 s" and recs[2]["seconds"] < 15
    assert recs[3]["status"] == "passed" and (tmp_path / "ok.log").read_text() == "fine\n"


def test_pack_writes_one_file_with_every_output(tmp_path):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    files = {"steps.json": "[]", "kernels.json": "{}", "tests.log": "x" * 1000, "sub/deep.txt": "d"}
    for name, text in files.items():
        (work / name).write_text(text)
    archive = tmp_path / "gpu-check.tar.gz"
    gpu_check.pack(work, archive)
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["gpu-check.tar.gz"]
    with tarfile.open(archive) as tar:
        got = {m.name.removeprefix("gpu-check/"): tar.extractfile(m).read().decode() for m in tar if m.isfile()}
    assert got == files


def test_gpu_study_config_has_a_budget_per_command_and_validates(tmp_path):
    text, budgets = gpu_study.split_config(ROOT / "configs/gpu-study.toml")
    assert sorted(budgets) == sorted(n for n, _ in gpu_study.COMMANDS)
    assert sum(budgets.values()) <= 8 * 60  # the study must finish within 8 minutes on one H100
    assert "gpu_study" not in text
    from drift.config import load

    (tmp_path / "c.toml").write_text(text)
    cfg = load(tmp_path / "c.toml")
    assert cfg.data.image_size == 224 and cfg.fisher.n_components == 200 and cfg.baselines.seeds >= 2
    assert list(cfg.run.archs) == ["densenet201", "resnetv2_50", "inception_v3"]
    bad = (ROOT / "configs/gpu-study.toml").read_text().replace("fisher = 60", "fisher = -1")
    (tmp_path / "bad.toml").write_text(bad)
    with pytest.raises(ValueError, match="gpu_study.budget_s.fisher must be a positive number"):
        gpu_study.split_config(tmp_path / "bad.toml")
