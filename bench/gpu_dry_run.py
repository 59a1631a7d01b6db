"""The dry run of ``make gpu-check``: every step's modules imported under the GPU machine's package set.

``python bench/gpu_check.py --dry-run [--only STEP ...] [--hide MODULE ...] [--wheels DIR]`` (see
bench/gpu_check.py's docstring): hides :data:`gpu_check.GPU_LACKS` and the ``--hide`` modules from every Python
process it starts (a ``sitecustomize.py`` first on PYTHONPATH), runs setup into a temporary target, imports each
step's modules and scripts in one fresh interpreter, and collects the compiled-kernel tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

from gpu_check import (
    DEPS,
    GPU_LACKS,
    PRESENT,
    ROOT,
    SETUP_BUDGET_S,
    TOTAL_BUDGET_S,
    WHEELS,
    Step,
    _has,
    _python_path,
    drift_path,
    import_errors,
    setup,
    steps,
)

_HIDER = """
import importlib.abc, importlib.machinery, sys
_HIDDEN = set({hidden!r})
_ALLOWED = {allowed!r}

class _Hide(importlib.abc.MetaPathFinder):
    # Modules the GPU machine lacks: found only in the wheels' install target, as there.
    def find_spec(self, name, path=None, target=None):
        if name in _HIDDEN:
            spec = importlib.machinery.PathFinder.find_spec(name, _ALLOWED)
            if spec is None:
                raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU machine)", name=name)
            return spec
        return None

sys.meta_path.insert(0, _Hide())
"""


def hiding_env(hidden: Sequence[str], allowed: Sequence[Path], env: dict[str, str]) -> tuple[dict[str, str], Path]:
    """env whose Python processes cannot import the top-level modules hidden, except from the folders allowed.

    A ``sitecustomize.py`` in a fresh folder put first on PYTHONPATH installs the finder at start-up, so every
    process the steps start (pytest, compile workers, scripts) sees the same package set. Returns (env, folder).
    """
    folder = Path(tempfile.mkdtemp(prefix="gpu-dry-"))
    text = _HIDER.format(hidden=sorted(hidden), allowed=[str(p) for p in allowed])
    (folder / "sitecustomize.py").write_text(textwrap.dedent(text))
    return {**env, "PYTHONPATH": _python_path(env, folder)}, folder


def dry_run(selected: Sequence[str], hide: Sequence[str], wheels: Path) -> int:
    """Check the selected steps under the GPU machine's package set (see the module docstring); 0 when all pass."""
    problems: list[str] = []
    hidden = sorted({*GPU_LACKS, *hide})
    print(f"GPU check, dry run: the steps it runs on a CUDA machine (budget {TOTAL_BUDGET_S} s in all)")
    print(f"package set: this interpreter's, without {', '.join(hidden)}\n")
    print(f"  setup      {SETUP_BUDGET_S:>4} s  python -m pip install --no-index --no-deps --target {DEPS} "
          f"{WHEELS}/<missing wheels>")  # fmt: skip
    for step in steps():
        print(f"  {step.name:<10} {step.budget_s:>4} s  {step.shell()}")
        print(f"  {'':<10} {'':>6}  {step.what}")
    print()
    with tempfile.TemporaryDirectory(prefix="gpu-deps-") as deps:
        env, folder = hiding_env(hidden, [Path(deps)], dict(os.environ))
        try:
            env.pop("TRITON_INTERPRET", None)
            if "setup" in selected:
                ok, notes = setup(env, lambda text: None, wheels=wheels, target=Path(deps))
                for note in notes:
                    print(f"  setup: {note}")
                if not ok:
                    problems.append("setup: " + "; ".join(notes))
            else:
                env["PYTHONPATH"] = _python_path(env, ROOT, drift_path())
            chosen = [step for step in steps() if step.name in selected]
            plan = {st.name: [*st.modules, *(p for p in st.paths if p.startswith("bench/") and p.endswith(".py"))]
                    for st in chosen}  # fmt: skip
            errors = import_errors(plan, env)
            for step in chosen:
                problems += [f"{step.name}: {rel} does not exist" for rel in step.paths if not (ROOT / rel).exists()]
                problems += [f"{step.name}: does not import: {err}" for err in errors[step.name].values()]
                if not errors[step.name]:
                    print(f"  {step.name}: imports: {', '.join(plan[step.name])}")
                if step.name == "tests":
                    problems += _collect_tests(step, env)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    for mod in PRESENT:
        print(f"  {'present' if _has(mod) and mod not in hidden else 'absent '}: {mod}")
    print()
    for p in problems:
        print(f"PROBLEM: {p}")
    print("dry run: " + ("ok" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def _collect_tests(step: Step, env: dict[str, str]) -> list[str]:
    """The compiled-kernel tests collect (their modules import) in a TRITON_INTERPRET=0 session."""
    cmd = [sys.executable if c == "python" else c for c in step.cmd if not c.startswith("--junitxml")]
    done = subprocess.run([*cmd, "--collect-only"], cwd=ROOT, env={**env, **step.env}, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    collected = [ln for ln in done.stdout.splitlines() if "::" in ln]
    if done.returncode != 0 or not collected:
        return [f"tests: collection failed (rc {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"]
    print(f"  tests: collects {len(collected)} compiled-kernel tests in tests/kernels (-m gpu, TRITON_INTERPRET=0)")
    return []
