"""The paper-size study on one GPU, step by step under time budgets: ``make gpu-study``.

    python bench/gpu_study.py [--config configs/gpu-study.toml] [--dry-run]

Reads the config, takes out its ``[gpu_study.budget_s]`` table (seconds per command) and writes the rest to the
work folder as the config drift runs with. Then runs, each under its budget (a command over its budget is
stopped and recorded, and the next runs on what the archive holds; the archive's commits are transactions, so
a stopped command leaves the last complete version):

    train   drift attribute   data, transfer and fine-tuning of every backbone, the raw CAMs of both checkpoints
    drift   drift metrics     per-image drift metrics in every protocol cell
    fisher  drift fisher      the iFIM of both checkpoints
    rest    drift run         statistics, baselines (seed replicas, randomisation), report

It prints the time of each command, writes results/gpu-study/summary.md (commands, status, seconds, budget, and
the run's ``drift summary``), and packs the work folder (config, logs, archive.h5, report; not the checkpoints)
into one file, results/gpu-study/gpu-study.tar.gz. ``--dry-run`` checks the config loads and validates and
prints the commands, without a GPU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("results/gpu-study")
WORK = OUT / "work"
ARCHIVE = OUT / "gpu-study.tar.gz"
#: The commands in order: name, the drift sub-command.
COMMANDS = (("train", "attribute"), ("drift", "metrics"), ("fisher", "fisher"), ("rest", "run"))


def split_config(path: Path) -> tuple[str, dict[str, float]]:
    """(the config text drift reads, the budgets in seconds by command name) of a gpu-study config.

    Raises:
        ValueError: the budget table is missing, names an unknown command, or holds a non-positive budget.
    """
    data = tomllib.loads(path.read_text())
    budgets = data.pop("gpu_study", {}).get("budget_s")
    names = [n for n, _ in COMMANDS]
    if not isinstance(budgets, dict) or sorted(budgets) != sorted(names):
        raise ValueError(f"{path}: [gpu_study.budget_s] must give seconds for exactly {', '.join(names)}")
    for name, value in budgets.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{path}: gpu_study.budget_s.{name} must be a positive number of seconds, got {value!r}")
    from drift.config import dumps_toml

    return dumps_toml(data), {k: float(v) for k, v in budgets.items()}


def commands(config: Path, out: Path) -> list[tuple[str, list[str]]]:
    """The drift command lines, in order (drift's CLI under this interpreter, whether or not drift is installed)."""
    base = [sys.executable, "-c", "import sys; from drift.cli import main; sys.exit(main())"]
    return [(name, [*base, sub, "--config", str(config), "--out", str(out), "--no-progress"]) for name, sub in COMMANDS]


def _env() -> dict[str, str]:
    """This environment with drift and drift_kernels importable from the source tree (see bench/gpu_check.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_check import DEPS, drift_path

    parts = [str(ROOT / DEPS), str(ROOT), str(drift_path()), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, parts)))


def run_one(name: str, cmd: list[str], budget: float, log_path: Path) -> dict:
    """Run one command under its budget, its output to the log and the screen; the record of what happened."""
    print(f"\n=== {name} (budget {budget:.0f} s): drift {' '.join(cmd[3:])}", flush=True)
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=budget)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the command's own process group
            rc = proc.wait()
            status = f"stopped after {budget:.0f} s"
    seconds = time.monotonic() - t0
    print(f"=== {name}: {status} ({seconds:.0f} s)", flush=True)
    return dict(name=name, command="drift " + " ".join(cmd[3:]), status=status, rc=rc, seconds=seconds, budget_s=budget)


def summary_markdown(records: Sequence[dict], run_summary: str) -> str:
    """results/gpu-study/summary.md: one row per command, the total, and the run's ``drift summary``."""
    lines = ["# GPU study (configs/gpu-study.toml)", "", "| command | status | s | budget s |", "|---|---|---|---|"]
    lines += [f"| {r['command']} | {r['status']} | {r['seconds']:.0f} | {r['budget_s']:.0f} |" for r in records]
    lines += ["", f"Total {sum(r['seconds'] for r in records):.0f} s.", "", "```", run_summary.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/gpu-study.toml"))
    parser.add_argument("--dry-run", action="store_true", help="check the config and print the commands")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    text, budgets = split_config(args.config)
    work = ROOT / WORK
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.toml"
    config.write_text(text)
    from drift.config import load

    load(config)  # loads and validates: a bad key fails here, before any GPU time is spent
    run_dir = work / "run"
    plan = commands(config.relative_to(ROOT), run_dir.relative_to(ROOT))
    if args.dry_run:
        for name, cmd in plan:
            print(f"{name:<7} {budgets[name]:>5.0f} s  drift {' '.join(cmd[3:])}")
        print(f"budget {sum(budgets.values()):.0f} s in all; config ok")
        return 0
    records = [run_one(name, cmd, budgets[name], work / f"{name}.log") for name, cmd in plan]
    done = subprocess.run([*plan[0][1][:3], "summary", str(run_dir / "archive.h5")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    md = summary_markdown(records, done.stdout + done.stderr)
    (work / "summary.md").write_text(md)
    (ROOT / OUT / "summary.md").write_text(md)
    with tarfile.open(ROOT / ARCHIVE, "w:gz") as tar:
        tar.add(work, arcname="gpu-study", filter=lambda ti: None if "/checkpoints" in ti.name else ti)
    print("\n" + md + f"\nwritten: {ARCHIVE}, {OUT}/summary.md")
    return 0 if all(r["status"] == "passed" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
