"""Everything a CUDA machine can tell about the kernels and the engines, in one command: ``make gpu-check``.

    python bench/gpu_check.py             # on a CUDA machine: the steps below, results under results/gpu/
    python bench/gpu_check.py --dry-run   # anywhere: list the steps, check their scripts and tests exist and import

Steps and their time budgets (seconds on one H100 / H200; whole run under 6 minutes). A step that overruns its
budget is stopped and reported as such, the next one runs, and no step starts past the overall limit:

    setup       20  python -m pip install --no-index --find-links wheels/ <what is missing> (grad-cam, ttach, asv,
                    hypothesis), and python -m pip install --no-deps -e . when drift does not import
    tests      110  TRITON_INTERPRET=0 python -m pytest tests/kernels -m gpu: the kernels compiled for the device,
                    float32 / float16 / bfloat16, against their references (tests/conftest.py skips the
                    interpreter-only tests in such a session)
    resources   50  python -m drift_kernels.compile_check --device: registers, spills and shared memory of every
                    launch the dispatch layer makes for the study's sizes, compiled for this device's capability
    kernels     70  bench/gpu_kernels.py --json results/gpu/kernels.json: kernel vs torch reference, cold L2 each
                    repeat, kernels timed through their launchers (no host-side validation in the time)
    cams        50  bench/cam_speed.py --device cuda: drift's one-pass CAM engine vs pytorch-grad-cam, DenseNet201 at
                    its native 224 px, batch 64
    ifim        45  bench/jacobian_routes.py --ifim: iFIM spectrum throughput vs one forward + C backward passes,
                    DenseNet201, 224 px, batch 16, C = 5 and 14

Writes results/gpu/summary.json and results/gpu/summary.md (device, driver, CUDA, torch, triton; one table per
step) next to each step's own output (tests.xml, resources.md, kernels.json, cam_speed.json, ifim.json, *.log).
Exit status 0 when every step passed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("results/gpu")
WHEELS = Path("wheels")
#: Whole run, seconds: the step budgets add up to this, and no step runs past it.
TOTAL_BUDGET_S = 345
#: Modules the steps import that a bare CUDA machine may lack, with the distribution that provides each.
THIRD_PARTY = {"pytorch_grad_cam": "grad-cam", "ttach": "ttach", "asv": "asv", "hypothesis": "hypothesis"}
#: Modules the CUDA machine is expected to hold already (reported, never installed).
PRESENT = ("torch", "triton", "timm", "h5py", "pytest", "scipy", "numpy")


@dataclasses.dataclass
class Step:
    """One step: a command run from the repository root with a time budget.

    Attributes:
        name: short name (the summary's key).
        what: one line saying what the step measures.
        cmd: the command, ``python`` standing for this interpreter.
        budget_s: seconds it may run before it is stopped.
        paths: repository paths the command names (checked by ``--dry-run``).
        env: extra environment variables.
        output: file under results/gpu/ the step writes (or that its stdout is saved to).
    """

    name: str
    what: str
    cmd: list[str]
    budget_s: int
    paths: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    output: str = ""

    def shell(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return (env + " " if env else "") + " ".join(self.cmd)


def steps() -> list[Step]:
    """The measuring steps, in order (setup runs before them)."""
    compiled = {"TRITON_INTERPRET": "0"}
    # pytest: pyproject's addopts are dropped (its --benchmark-disable needs pytest-benchmark, not used here).
    pytest = f"python -m pytest -q -o addopts=-ra -p no:cacheprovider tests/kernels -m gpu --junitxml={OUT}/tests.xml"
    resources = "python -m drift_kernels.compile_check --device --markdown --workers 8"
    kernels = f"python bench/gpu_kernels.py --json {OUT}/kernels.json"
    cams = f"python bench/cam_speed.py --device cuda --size 224 --batch 64 --repeats 3 --json {OUT}/cam_speed.json"
    ifim = (
        "python bench/jacobian_routes.py --device cuda --size 224 --batch 16 --models densenet201 --classes 5 14 "
        f"--routes loop --repeats 3 --ifim --no-check --json {OUT}/ifim.json"
    )
    return [
        Step(
            "tests",
            "compiled kernels vs references, float32 / float16 / bfloat16 (pytest -m gpu)",
            pytest.split(),
            110,
            ["tests/kernels", "tests/conftest.py", "tests/kernels/conftest.py"],
            compiled,
            "tests.xml",
        ),
        Step(
            "resources",
            "registers, spills, shared memory of the dispatch layer's launches, compiled for this device",
            resources.split(),
            50,
            ["kernels/compile_check.py"],
            compiled,
            "resources.md",
        ),
        Step(
            "kernels",
            "Triton kernels vs torch references: time (cold L2), bandwidth, error",
            kernels.split(),
            70,
            ["bench/gpu_kernels.py"],
            compiled,
            "kernels.json",
        ),
        Step(
            "cams",
            "CAM engine (one pass) vs pytorch-grad-cam, DenseNet201, 224 px, batch 64",
            cams.split(),
            50,
            ["bench/cam_speed.py"],
            compiled,
            "cam_speed.json",
        ),
        Step(
            "ifim",
            "iFIM throughput vs one forward + C backward passes, DenseNet201, 224 px, batch 16",
            ifim.split(),
            45,
            ["bench/jacobian_routes.py"],
            compiled,
            "ifim.json",
        ),
    ]


SETUP_BUDGET_S = TOTAL_BUDGET_S - sum(s.budget_s for s in steps())


# --------------------------------------------------------------------------------------------------------------
# Setup: third-party modules from wheels/, drift importable
# --------------------------------------------------------------------------------------------------------------


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_distributions() -> list[str]:
    """Distributions of :data:`THIRD_PARTY` whose module does not import here."""
    return [dist for mod, dist in THIRD_PARTY.items() if not _has(mod)]


def _wheel_for(dist: str) -> Path | None:
    """A wheel (or sdist) of dist in wheels/, or None."""
    if not WHEELS.is_dir():
        return None
    stem = re.sub(r"[-_.]+", "_", dist).lower()
    for f in sorted(WHEELS.iterdir()):
        if re.sub(r"[-_.]+", "_", f.name).lower().startswith(stem + "_"):
            return f
    return None


def _drift_imports(env: dict[str, str]) -> bool:
    """Whether a fresh interpreter started from bench/ (as the steps are) imports drift and drift_kernels."""
    code = "import drift, drift_kernels.compile_check"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "bench", env=env, capture_output=True)
    return done.returncode == 0


def _pip(cmd: list[str], log) -> bool:
    """Run a pip command (local files only, so it is quick), its output to the log; True when it succeeded."""
    log(f"$ {' '.join(cmd)}")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3 * SETUP_BUDGET_S)
    except subprocess.TimeoutExpired:
        log(f"stopped after {3 * SETUP_BUDGET_S} s")
        return False
    log(done.stdout + done.stderr)
    return done.returncode == 0


def setup(env: dict[str, str], log) -> tuple[bool, list[str]]:
    """Install what is missing; returns (ok, notes). env gains PYTHONPATH entries if drift needs them."""
    notes = []
    ok = True
    missing = missing_distributions()
    if missing:
        done = _pip([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(WHEELS), *missing], log)
        notes.append(f"pip install from {WHEELS}/: {' '.join(missing)}: {'ok' if done else 'FAILED'}")
        ok &= done
    else:
        notes.append("third-party modules present: " + ", ".join(THIRD_PARTY.values()))
    if not _drift_imports(env):
        editable = ["install", "--no-deps", "--no-index", "--no-build-isolation", "-e", "."]
        done = _pip([sys.executable, "-m", "pip", *editable], log)
        notes.append(f"pip install --no-deps -e .: {'ok' if done else 'failed'}")
        if not _drift_imports(env):
            # The package maps drift_kernels to kernels/: a link to it and the repository root on PYTHONPATH.
            shim = Path(tempfile.mkdtemp(prefix="drift-path-"))
            (shim / "drift_kernels").symlink_to(ROOT / "kernels", target_is_directory=True)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(shim), env.get("PYTHONPATH", "")]))
            notes.append(f"drift imported through PYTHONPATH ({ROOT}, {shim}/drift_kernels -> kernels/)")
            ok &= _drift_imports(env)
    return ok, notes


# --------------------------------------------------------------------------------------------------------------
# Running a step under its budget
# --------------------------------------------------------------------------------------------------------------


def run_step(step: Step, env: dict[str, str], timeout_s: float) -> dict:
    """Run step with its output shown and saved to results/gpu/<name>.log; stopped after timeout_s."""
    cmd = [sys.executable if c == "python" else c for c in step.cmd]
    log_path = ROOT / OUT / f"{step.name}.log"
    print(f"\n=== {step.name} (budget {step.budget_s} s): {step.shell()}", flush=True)
    t0 = time.monotonic()
    lines: list[str] = []
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env={**env, **step.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip

        def pump() -> None:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
                lines.append(line)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)  # the step's own process group (pytest and its compile workers)
            rc = proc.wait()
            status = f"stopped after {timeout_s:.0f} s"
        reader.join(timeout=5)
    seconds = time.monotonic() - t0
    if step.output == "resources.md":  # the step prints its table: keep it as Markdown
        table = [ln for ln in lines if ln.startswith("|")]
        (ROOT / OUT / step.output).write_text("".join(table))
    print(f"=== {step.name}: {status} ({seconds:.0f} s)", flush=True)
    return dict(name=step.name, what=step.what, command=step.shell(), status=status, rc=rc, seconds=seconds,
                budget_s=step.budget_s, output=str(OUT / step.output))  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------------------


def machine() -> dict:
    """Device, driver, CUDA, torch and triton of this machine."""
    import torch

    info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda)
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gb=round(props.total_memory / 2**30, 1))  # fmt: skip
    smi = shutil.which("nvidia-smi")
    if smi:
        done = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True)  # fmt: skip
        info["driver"] = done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    return info


def _load(name: str):
    path = ROOT / OUT / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _test_counts() -> dict | None:
    try:
        root = ET.parse(ROOT / OUT / "tests.xml").getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return total


def _md_table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    return out + ["| " + " | ".join("-" if v is None else str(v) for v in row) + " |" for row in rows]


def _f(v, fmt: str) -> str | None:
    return None if v is None else format(v, fmt)


def summary_markdown(summary: dict) -> str:
    """results/gpu/summary.md: where it ran, then one table per step."""
    m = summary["machine"]
    lines = [
        "# GPU check",
        "",
        f"Device {m.get('device')} (capability {m.get('capability')}, {m.get('sms')} SMs, {m.get('memory_gb')} GB), "
        f"driver {m.get('driver')}, CUDA {m.get('cuda')}, torch {m.get('torch')}, triton {m.get('triton')}, "
        f"Python {m.get('python')}; {summary['started']} UTC, {summary['seconds']:.0f} s.",
        "",
    ]
    lines += _md_table(
        ["step", "what", "status", "s", "budget s"],
        [[s["name"], s["what"], s["status"], f"{s['seconds']:.0f}", s["budget_s"]] for s in summary["steps"]],
    )
    tests = summary.get("tests")
    if tests:
        lines += ["", f"Compiled-kernel tests: {tests['passed']} passed, {tests['failures']} failed, "
                      f"{tests['errors']} errors, {tests['skipped']} skipped."]  # fmt: skip
    kernels = summary.get("kernels") or []
    if kernels:
        lines += ["", "## Kernels (cold L2, median of repeats)", ""]
        lines += _md_table(
            ["op", "dtype", "B/N", "C", "kernel ms", "reference ms", "speed-up", "GB/s", "of copy", "err kernel",
             "err reference", "goals"],
            [[r["op"], r["dtype"], r["B"], r["C"], _f(r["kernel_ms"], ".3f"), _f(r["reference_ms"], ".3f"),
              _f(r["speedup"], ".2f"), _f(r["gbps"], ".0f"), _f(r["copy_fraction"], ".0%"), _f(r["err_kernel"], ".2e"),
              _f(r["err_reference"], ".2e"), "yes" if r["ok"] else "no"] for r in kernels],
        )  # fmt: skip
    cam = summary.get("cams")
    if cam:
        lines += ["", f"## CAMs: {cam['model']}, {cam['size']} px, batch {cam['batch']}", ""]
        lines += _md_table(
            ["engine", "images/s", "s a batch"],
            [["drift (one pass, Grad-CAM++ + LayerCAM)", _f(cam["drift_images_per_s"], ".1f"),
              _f(cam["drift_s_per_batch"], ".3f")],
             ["pytorch-grad-cam (a pass per method)", _f(cam["reference_images_per_s"], ".1f"),
              _f(cam["reference_s_per_batch"], ".3f")]],
        )  # fmt: skip
        diff = cam["max_abs_diff_minmax"]
        lines += ["", f"Speed-up {cam['speedup']:.2f}x; max |difference| after min-max normalisation {diff:.1e}."]
    ifim = [r for r in summary.get("ifim") or [] if r.get("route") == "ifim"]
    if ifim:
        lines += ["", "## iFIM throughput", ""]
        lines += _md_table(
            ["model", "C", "batch", "iFIM images/s", "forward + C backward images/s", "iFIM / Jacobian time"],
            [[r["model"], r["C"], r["batch"], _f(r.get("images_per_s"), ".1f"),
              _f(r.get("jacobian_images_per_s"), ".1f"), _f(r.get("ratio_to_jacobian"), ".2f")] for r in ifim],
        )  # fmt: skip
    resources = ROOT / OUT / "resources.md"
    if resources.exists() and resources.stat().st_size:
        lines += ["", "## Kernel resources on this device", "", resources.read_text().rstrip()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------------
# Dry run
# --------------------------------------------------------------------------------------------------------------


def dry_run() -> int:
    """Print the steps; check that every path they name exists and every script / module / test imports."""
    problems: list[str] = []
    print(f"GPU check, dry run: the steps it runs on a CUDA machine (budget {TOTAL_BUDGET_S} s in all)\n")
    missing = missing_distributions()
    setup_cmd = f"python -m pip install --no-index --find-links {WHEELS}/ <missing: {' '.join(missing) or 'none here'}>"
    print(f"  setup      {SETUP_BUDGET_S:>4} s  {setup_cmd}")
    print(f"  {'':<10} {'':>6}  python -m pip install --no-deps -e . when drift does not import")
    for step in steps():
        print(f"  {step.name:<10} {step.budget_s:>4} s  {step.shell()}")
        print(f"  {'':<10} {'':>6}  {step.what}")
    print()
    for step in steps():
        for rel in step.paths:
            if not (ROOT / rel).exists():
                problems.append(f"{step.name}: {rel} does not exist")
    # The scripts import (their main does not run: each guards it with __name__ == "__main__").
    for step in steps():
        for rel in step.paths:
            if rel.endswith(".py") and rel.startswith("bench/"):
                spec = importlib.util.spec_from_file_location(f"_gpu_check_{step.name}", ROOT / rel)
                try:
                    spec.loader.exec_module(importlib.util.module_from_spec(spec))
                    print(f"  imports: {rel}")
                except Exception as err:  # reported, the other checks still run
                    problems.append(f"{step.name}: {rel} does not import: {type(err).__name__}: {err}")
    for module in ("drift", "drift_kernels.compile_check", "drift.attribution", "drift.fisher"):
        try:
            importlib.import_module(module)
            print(f"  imports: {module}")
        except Exception as err:
            problems.append(f"{module} does not import: {type(err).__name__}: {err}")
    # The compiled-kernel tests collect (their modules import) in a TRITON_INTERPRET=0 session.
    tests = steps()[0]
    cmd = [sys.executable if c == "python" else c for c in tests.cmd if not c.startswith("--junitxml")]
    done = subprocess.run(
        [*cmd, "--collect-only"], cwd=ROOT, env={**os.environ, **tests.env}, capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    collected = [ln for ln in done.stdout.splitlines() if "::" in ln]
    if done.returncode != 0 or not collected:
        problems.append(f"tests: collection failed (rc {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    else:
        print(f"  collects: {len(collected)} compiled-kernel tests in tests/kernels (-m gpu, TRITON_INTERPRET=0)")
    for mod in PRESENT:
        print(f"  {'present' if _has(mod) else 'absent '}: {mod}")
    for mod, dist in THIRD_PARTY.items():
        wheel = _wheel_for(dist)
        state = "present" if _has(mod) else "absent "
        print(f"  {state}: {mod} ({dist}; in {WHEELS}/: {wheel.name if wheel else 'no'})")
    print()
    for p in problems:
        print(f"PROBLEM: {p}")
    print("dry run: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def _importable_here() -> None:
    """Let the dry run import drift and drift_kernels from the source tree when they are not installed."""
    if not _has("drift"):
        sys.path.insert(0, str(ROOT))
    if not _has("drift_kernels"):
        spec = importlib.util.spec_from_file_location(
            "drift_kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["drift_kernels"] = module
        spec.loader.exec_module(module)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list the steps and check them; no CUDA needed")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    if args.dry_run:
        _importable_here()
        return dry_run()

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the steps on this machine", file=sys.stderr)
        return 2
    (ROOT / OUT).mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    print(f"=== setup (budget {SETUP_BUDGET_S} s)", flush=True)
    with open(ROOT / OUT / "setup.log", "w") as setup_log:
        ok, notes = setup(env, lambda text: setup_log.write(text + "\n"))
    for note in notes:
        print(f"  {note}")
    results = [dict(name="setup", what="; ".join(notes), command="pip install (wheels/)", status="passed" if ok else
                    "failed", rc=0 if ok else 1, seconds=time.monotonic() - t0, budget_s=SETUP_BUDGET_S)]  # fmt: skip
    for step in steps():
        left = TOTAL_BUDGET_S - (time.monotonic() - t0)
        if left < 5:
            results.append(dict(name=step.name, what=step.what, command=step.shell(), status="not run: over budget",
                                rc=None, seconds=0.0, budget_s=step.budget_s))  # fmt: skip
            continue
        results.append(run_step(step, env, min(step.budget_s, left)))
    summary = dict(
        started=started, seconds=time.monotonic() - t0, machine=machine(), steps=results, tests=_test_counts(),
        kernels=_load("kernels.json"), cams=_load("cam_speed.json"), ifim=_load("ifim.json"),
    )  # fmt: skip
    (ROOT / OUT / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    md = summary_markdown(summary)
    (ROOT / OUT / "summary.md").write_text(md)
    print("\n" + md)
    print(f"written: {OUT}/summary.json, {OUT}/summary.md")
    return 0 if all(s["status"] == "passed" for s in results) else 1


if __name__ == "__main__":
    sys.exit(main())
