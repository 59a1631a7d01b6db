"""Everything a CUDA machine can tell about the kernels and the engines, in one command: ``make gpu-check``.

    python bench/gpu_check.py                      # on a CUDA machine: every step, results packed under results/gpu/
    python bench/gpu_check.py --only kernels cams  # rerun some steps (their records replace the earlier ones)
    python bench/gpu_check.py --skip cams          # every step but these
    python bench/gpu_check.py --dry-run            # anywhere: each step's modules imported under the GPU
                                                   # machine's package set (see below); no CUDA needed

Steps and their time budgets (seconds on one H100 / H200; whole run under 6 minutes). Every step is independent:
a step that fails, or overruns its budget and is stopped, is recorded with its error and the next one runs; no
step starts past the overall limit:

    setup       20  the pure-Python wheels of wheels/ (grad-cam, ttach) installed with
                    pip install --no-index --no-deps --target .gpu-deps when their modules are missing (nothing
                    from the network; asv is not needed on the GPU machine), and drift importable from the source
                    tree through PYTHONPATH when it is not installed
    tests       95  TRITON_INTERPRET=0 python -m pytest tests/kernels -m gpu: the kernels compiled for the device,
                    float32 / float16 / bfloat16, against their references (tests/conftest.py skips the
                    interpreter-only tests in such a session)
    resources   50  python -m drift_kernels.compile_check --device: registers, spills and shared memory of every
                    launch the dispatch layer makes for the study's sizes, compiled for this device's capability
    kernels     95  bench/gpu_kernels.py --json kernels.json: kernels vs the best torch paths and a device copy
                    measured in the same run, cold L2 each repeat
    cams        45  bench/cam_speed.py --device cuda: drift's one-pass CAM engine vs pytorch-grad-cam, DenseNet201 at
                    its native 224 px, batch 64
    ifim        40  bench/jacobian_routes.py --ifim: iFIM spectrum throughput vs one forward + C backward passes,
                    DenseNet201, 224 px, batch 16, C = 5 and 14

Outputs: every step writes into results/gpu/work/ (its log, its own output file, the step records
``steps.json``); at the end the work folder is packed into one file, results/gpu/gpu-check.tar.gz, and
results/gpu/summary.md is written beside it (device, driver, CUDA, torch, triton; one table per step). Those two
files are all a lent machine has to return. Exit status 0 when every step run passed.

The GPU machine's package set: the machine this is written for has torch, triton, numpy, timm, h5py, pytest,
pytest-benchmark, hypothesis, scipy, matplotlib, tqdm and scikit-learn, and lacks grad-cam, ttach and asv
(:data:`GPU_LACKS`). ``--dry-run`` hides those modules (plus any named with ``--hide``) from every Python process
it starts, installs wheels/ into a temporary target as setup would, and then, per step, imports the modules the
step needs, imports its script, and for the tests step collects the tests; a step whose module is missing there
fails the dry run. grad-cam imports OpenCV (cv2), a binary wheel that is not in wheels/: where the machine lacks
it, the dry run's cams step says so (``--hide cv2`` shows it here).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_summary import load, machine, summary_markdown, test_counts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("results/gpu")
WORK = OUT / "work"
ARCHIVE = OUT / "gpu-check.tar.gz"
WHEELS = Path("wheels")
#: Where setup installs the wheels of wheels/ (``pip install --target``); put first on the steps' PYTHONPATH.
DEPS = Path(".gpu-deps")
#: Whole run, seconds: the step budgets add up to this, and no step runs past it.
TOTAL_BUDGET_S = 345
#: Modules the steps import that the GPU machine lacks and wheels/ provides, with their distribution.
THIRD_PARTY = {"pytorch_grad_cam": "grad-cam", "ttach": "ttach"}
#: Modules the GPU machine lacks (hidden by ``--dry-run``): the wheels' modules, and asv, which no step needs.
GPU_LACKS = ("pytorch_grad_cam", "ttach", "asv")
#: Modules the CUDA machine is expected to hold already (reported, never installed).
PRESENT = ("torch", "triton", "timm", "h5py", "pytest", "hypothesis", "scipy", "numpy", "sklearn", "matplotlib")


@dataclasses.dataclass
class Step:
    """One step: a command run from the repository root with a time budget.

    Attributes:
        name: short name (the summary's key, and the name for ``--only`` / ``--skip``).
        what: one line saying what the step measures.
        cmd: the command, ``python`` standing for this interpreter.
        budget_s: seconds it may run before it is stopped.
        paths: repository paths the command names (checked by ``--dry-run``).
        env: extra environment variables.
        output: file of the work folder the step writes (or that its stdout is saved to).
        modules: modules the step imports (``--dry-run`` imports each under the GPU machine's package set).
    """

    name: str
    what: str
    cmd: list[str]
    budget_s: int
    paths: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    output: str = ""
    modules: list[str] = dataclasses.field(default_factory=list)

    def shell(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env.items())
        return (env + " " if env else "") + " ".join(self.cmd)


def steps() -> list[Step]:
    """The measuring steps, in order (setup, the first step, is not among them: see :func:`setup`)."""
    compiled = {"TRITON_INTERPRET": "0"}
    # pytest: pyproject's addopts are dropped (its --benchmark-disable needs pytest-benchmark, not used here).
    pytest = f"python -m pytest -q -o addopts=-ra -p no:cacheprovider tests/kernels -m gpu --junitxml={WORK}/tests.xml"
    resources = (
        "python -m drift_kernels.compile_check --device --markdown --workers 8 --dtypes float32 bfloat16 "
        "--heads softmax --with-x yes --m 4 13 --dims 150528 268203"
    )
    kernels = f"python bench/gpu_kernels.py --json {WORK}/kernels.json --torch-wins {WORK}/torch_wins.json"
    cams = f"python bench/cam_speed.py --device cuda --size 224 --batch 64 --repeats 3 --json {WORK}/cam_speed.json"
    ifim = (
        "python bench/jacobian_routes.py --device cuda --size 224 --batch 16 --models densenet201 --classes 5 14 "
        f"--routes loop --repeats 3 --ifim --no-check --json {WORK}/ifim.json"
    )
    return [
        Step(
            "tests",
            "compiled kernels vs references, float32 / float16 / bfloat16 (pytest -m gpu)",
            pytest.split(),
            95,
            ["tests/kernels", "tests/conftest.py", "tests/kernels/conftest.py"],
            compiled,
            "tests.xml",
            ["pytest", "hypothesis", "torch", "triton", "drift_kernels"],
        ),
        Step(
            "resources",
            "registers, spills, shared memory of the dispatch layer's launches, compiled for this device",
            resources.split(),
            50,
            ["kernels/compile_check.py"],
            compiled,
            "resources.md",
            ["drift_kernels.compile_check", "triton.backends.nvidia.compiler"],
        ),
        Step(
            "kernels",
            "Triton kernels vs torch references: time (cold L2), bandwidth, error",
            kernels.split(),
            95,
            ["bench/gpu_kernels.py"],
            compiled,
            "kernels.json",
            [f"drift_kernels.{k}_kernel" for k in ("fisher_gram", "fisher_project", "topk_iou")],
        ),
        Step(
            "cams",
            "CAM engine (one pass) vs pytorch-grad-cam, DenseNet201, 224 px, batch 64",
            cams.split(),
            45,
            ["bench/cam_speed.py"],
            compiled,
            "cam_speed.json",
            ["drift.attribution", "timm", "pytorch_grad_cam", "pytorch_grad_cam.utils.model_targets", "ttach"],
        ),
        Step(
            "ifim",
            "iFIM throughput vs one forward + C backward passes, DenseNet201, 224 px, batch 16",
            ifim.split(),
            40,
            ["bench/jacobian_routes.py"],
            compiled,
            "ifim.json",
            ["drift.fisher", "drift.jacobian", "timm"],
        ),
    ]


SETUP_BUDGET_S = TOTAL_BUDGET_S - sum(s.budget_s for s in steps())
STEP_NAMES = ("setup", *(s.name for s in steps()))


# --------------------------------------------------------------------------------------------------------------
# Setup: the wheels' modules from wheels/, drift importable
# --------------------------------------------------------------------------------------------------------------


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def wheel_files(wheels: Path = WHEELS) -> dict[str, Path]:
    """The wheel of each distribution of :data:`THIRD_PARTY` found in wheels (distribution -> file)."""
    found = {}
    if wheels.is_dir():
        for dist in THIRD_PARTY.values():
            stem = dist.replace("-", "_").lower() + "-"
            hits = sorted(f for f in wheels.iterdir() if f.name.lower().startswith(stem) and f.suffix == ".whl")
            if hits:
                found[dist] = hits[-1]
    return found


def install_wheels(dists: Sequence[str], target: Path, wheels: Path, log) -> list[str]:
    """Install the wheels of dists into target, no index, no dependencies; returns problems (empty when done).

    pip installs them (``--no-index --no-deps --target``); without pip, the pure-Python wheels are unpacked into
    target, which is all such an install does for importing.
    """
    files = wheel_files(wheels)
    problems = [f"no wheel of {d} in {wheels}/" for d in dists if d not in files]
    todo = [files[d] for d in dists if d in files]
    if not todo:
        return problems
    target.mkdir(parents=True, exist_ok=True)
    if _has("pip"):
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--upgrade", "--target", str(target)]
        log("$ " + " ".join(cmd + [str(f) for f in todo]))
        done = subprocess.run(cmd + [str(f) for f in todo], capture_output=True, text=True, cwd=ROOT, timeout=120)
        log(done.stdout + done.stderr)
        if done.returncode != 0:
            problems.append(f"pip install --target {target} failed (rc {done.returncode}): {done.stderr[-500:]}")
        return problems
    for f in todo:
        log(f"unpacking {f} into {target} (no pip here)")
        with zipfile.ZipFile(ROOT / f) as z:
            z.extractall(target)
    return problems


def drift_path() -> Path:
    """A folder holding ``drift_kernels -> kernels/`` (the package maps that name to kernels/), made once."""
    shim = Path(tempfile.gettempdir()) / f"drift-path-{os.getuid()}-{abs(hash(str(ROOT)))}"
    link = shim / "drift_kernels"
    if not link.exists():
        shim.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            link.symlink_to(ROOT / "kernels", target_is_directory=True)
    return shim


def _python_path(env: dict[str, str], *front: Path | str) -> str:
    return os.pathsep.join(filter(None, [*(str(p) for p in front), env.get("PYTHONPATH", "")]))


def setup(env: dict[str, str], log, wheels: Path = WHEELS, target: Path = DEPS) -> tuple[bool, list[str]]:
    """Install what is missing from wheels/ into target and make drift importable; returns (ok, notes).

    env gains PYTHONPATH entries: target (always, so that an install of an earlier run is used), and the
    repository root with a ``drift_kernels`` link when drift does not import otherwise.
    """
    target = ROOT / target
    env["PYTHONPATH"] = _python_path(env, target)
    needed = [*THIRD_PARTY, "drift", "drift_kernels.compile_check"]
    errors = import_errors({"setup": needed}, env)["setup"]
    missing = [dist for mod, dist in THIRD_PARTY.items() if mod in errors]
    notes = []
    problems = install_wheels(missing, target, wheels, log) if missing else []
    if missing:
        notes.append(f"installed from {wheels}/ into {target.name}/: {' '.join(missing)}")
    else:
        notes.append("present: " + ", ".join(THIRD_PARTY.values()))
    if "drift" in errors or "drift_kernels.compile_check" in errors:
        env["PYTHONPATH"] = _python_path(env, ROOT, drift_path())
        notes.append("drift imported from the source tree through PYTHONPATH")
    if missing or errors:
        errors = import_errors({"setup": needed}, env)["setup"]
        problems += [f"{mod} does not import after setup: {err}" for mod, err in errors.items()]
    notes += problems
    return not problems, notes


_IMPORTER = """
import importlib, importlib.util, json, sys
plan = json.loads(sys.argv[1])
out = {}
for group, names in plan.items():
    out[group] = {}
    for name in names:
        try:
            if name.endswith(".py"):
                spec = importlib.util.spec_from_file_location("_dry_" + str(abs(hash(name))), name)
                module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except BaseException as err:
            out[group][name] = f"{type(err).__name__}: {err}"
print("@@" + json.dumps(out))
"""


def import_errors(plan: dict[str, list[str]], env: dict[str, str]) -> dict[str, dict[str, str]]:
    """Import every module (or script path, ``*.py``) of each group in one fresh interpreter with env.

    Run from bench/ (as the scripts run); returns {group: {name: error}} with only the names that failed.
    """
    plan = {g: [str(ROOT / n) if n.endswith(".py") else n for n in names] for g, names in plan.items()}
    done = subprocess.run([sys.executable, "-c", _IMPORTER, json.dumps(plan)], cwd=ROOT / "bench", env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("@@")]
    if not lines:
        why = (done.stderr.strip().splitlines() or [f"rc {done.returncode}"])[-1]
        return {g: {n: f"the import check died: {why}" for n in names} for g, names in plan.items()}
    found = json.loads(lines[-1][2:])
    root = str(ROOT) + os.sep
    return {g: {n.removeprefix(root): e for n, e in errs.items()} for g, errs in found.items()}


# --------------------------------------------------------------------------------------------------------------
# Running a step under its budget
# --------------------------------------------------------------------------------------------------------------


def run_step(step: Step, env: dict[str, str], timeout_s: float, work: Path) -> dict:
    """Run step with its output shown and saved to <work>/<name>.log; stopped after timeout_s.

    A step that cannot start (its program missing) is recorded as failed with the error, like one that fails.
    """
    cmd = [sys.executable if c == "python" else c for c in step.cmd]
    log_path = work / f"{step.name}.log"
    print(f"\n=== {step.name} (budget {step.budget_s} s): {step.shell()}", flush=True)
    t0 = time.monotonic()
    lines: list[str] = []
    with open(log_path, "w") as log:
        try:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env={**env, **step.env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                start_new_session=True,
            )  # fmt: skip
        except OSError as err:
            log.write(f"could not start: {err}\n")
            return dict(name=step.name, what=step.what, command=step.shell(), status=f"failed: {err}", rc=None,
                        seconds=time.monotonic() - t0, budget_s=step.budget_s, output=step.output)  # fmt: skip

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
        (work / step.output).write_text("".join(table))
    print(f"=== {step.name}: {status} ({seconds:.0f} s)", flush=True)
    return dict(name=step.name, what=step.what, command=step.shell(), status=status, rc=rc, seconds=seconds,
                budget_s=step.budget_s, output=step.output)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


def select(only: Sequence[str] | None, skip: Sequence[str] | None) -> list[str]:
    """The step names to run: ``--only`` (in pipeline order) or every step, minus ``--skip``."""
    for name in [*(only or []), *(skip or [])]:
        if name not in STEP_NAMES:
            raise SystemExit(f"unknown step {name!r}; the steps are {', '.join(STEP_NAMES)}")
    chosen = [n for n in STEP_NAMES if not only or n in only]
    return [n for n in chosen if n not in (skip or [])]


def pack(work: Path, archive: Path) -> None:
    """Pack the work folder into one gzipped tar file (written beside, then renamed over archive)."""
    tmp = archive.with_name(archive.name + ".part")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(work, arcname="gpu-check")
    os.replace(tmp, archive)


def run(selected: Sequence[str]) -> int:
    """Run the selected steps; the records of steps not run this time are kept from the last run."""
    work = ROOT / WORK
    work.mkdir(parents=True, exist_ok=True)
    previous = {r["name"]: r for r in (load(work, "steps.json") or [])}
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    records: dict[str, dict] = {}
    if "setup" in selected:
        print(f"=== setup (budget {SETUP_BUDGET_S} s)", flush=True)
        with open(work / "setup.log", "w") as setup_log:
            try:
                ok, notes = setup(env, lambda text: setup_log.write(text + "\n"))
            except Exception as err:  # recorded; the measuring steps still run
                ok, notes = False, [f"{type(err).__name__}: {err}"]
        for note in notes:
            print(f"  {note}")
        records["setup"] = dict(name="setup", what="; ".join(notes), command="pip install --no-deps --target",
                                status="passed" if ok else "failed", rc=0 if ok else 1,
                                seconds=time.monotonic() - t0, budget_s=SETUP_BUDGET_S, output="setup.log")  # fmt: skip
    else:
        env["PYTHONPATH"] = _python_path(env, ROOT / DEPS, ROOT, drift_path())
    for step in steps():
        if step.name not in selected:
            continue
        left = TOTAL_BUDGET_S - (time.monotonic() - t0)
        if left < 5:
            records[step.name] = dict(name=step.name, what=step.what, command=step.shell(),
                                      status="not run: over budget", rc=None, seconds=0.0, budget_s=step.budget_s,
                                      output=step.output)  # fmt: skip
            continue
        records[step.name] = run_step(step, env, min(step.budget_s, left), work)
    merged = [records.get(n) or previous.get(n) for n in STEP_NAMES]
    merged = [r for r in merged if r]
    (work / "steps.json").write_text(json.dumps(merged, indent=1) + "\n")
    summary = dict(
        started=started, seconds=time.monotonic() - t0, machine=machine(), steps=merged, tests=test_counts(work),
        kernels=load(work, "kernels.json"), cams=load(work, "cam_speed.json"), ifim=load(work, "ifim.json"),
    )  # fmt: skip
    (work / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    md = summary_markdown(summary, work)
    (work / "summary.md").write_text(md)
    (ROOT / OUT / "summary.md").write_text(md)
    pack(work, ROOT / ARCHIVE)
    print("\n" + md)
    print(f"written: {ARCHIVE} (every output), {OUT}/summary.md")
    return 0 if all(r["status"] == "passed" for r in records.values()) else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="check every step under the GPU package set")
    parser.add_argument("--only", nargs="+", metavar="STEP", help=f"run only these steps ({', '.join(STEP_NAMES)})")
    parser.add_argument("--skip", nargs="+", metavar="STEP", help="run every step but these")
    parser.add_argument("--hide", nargs="+", default=[], metavar="MODULE",
                        help="dry run: hide these top-level modules too")  # fmt: skip
    parser.add_argument("--wheels", type=Path, default=WHEELS, help="dry run: the wheels folder to install from")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    selected = select(args.only, args.skip)
    if args.dry_run:
        from gpu_dry_run import dry_run

        return dry_run(selected, args.hide, args.wheels)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the steps on this machine", file=sys.stderr)
        return 2
    return run(selected)


if __name__ == "__main__":
    sys.exit(main())
