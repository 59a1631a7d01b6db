"""bench/gpu_check.py --dry-run lists the GPU steps and finds every script and test it names, without CUDA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("setup", "tests", "resources", "kernels", "cams", "ifim")


def test_dry_run_lists_the_steps_and_finds_what_they_name():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.split()]
    assert all(step in listed for step in STEPS), out
    for command in (
        "TRITON_INTERPRET=0 python -m pytest",
        "python -m drift_kernels.compile_check --device",
        "python bench/gpu_kernels.py --json results/gpu/kernels.json",
        "python bench/cam_speed.py --device cuda --size 224 --batch 64",
        "python bench/jacobian_routes.py --device cuda",
    ):
        assert command in out, command
    for script in ("bench/gpu_kernels.py", "bench/cam_speed.py", "bench/jacobian_routes.py"):
        assert f"imports: {script}" in out
    assert "compiled-kernel tests in tests/kernels" in out and out.rstrip().endswith("dry run: ok")
