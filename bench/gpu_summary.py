"""The summary of ``make gpu-check``: results/gpu/summary.md from the step records and the steps' outputs.

Reads the files the steps wrote into the work folder (tests.xml, kernels.json, cam_speed.json, ifim.json,
resources.md) and formats one table per step; nothing is computed here beyond counting test outcomes.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path


def load(work: Path, name: str):
    """The JSON file name of the work folder, or None when it is missing or unreadable."""
    path = work / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def test_counts(work: Path) -> dict | None:
    """Tests, failures, errors, skipped and passed of the junit XML of the tests step, or None."""
    try:
        root = ET.parse(work / "tests.xml").getroot()
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


def summary_markdown(summary: dict, work: Path) -> str:
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
        copy = kernels[0].get("copy_gbps")
        lines += ["", "## Kernels (cold L2, median of repeats)", "",
                  f"Device-to-device copy measured in the same run: {_f(copy, '.0f')} GB/s (read + write).", ""]
        lines += _md_table(
            ["op", "dtype", "B/N", "C", "kernel ms", "reference ms", "3-pass ms", "compiled ms", "best torch",
             "vs best", "GB/s", "of copy", "err kernel", "err reference", "goals"],
            [[r["op"], r["dtype"], r["B"], r["C"], _f(r["kernel_ms"], ".3f"), _f(r["reference_ms"], ".3f"),
              _f(r.get("three_pass_ms"), ".3f"), _f(r.get("compiled_ms"), ".3f"), r.get("best_torch"),
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
    resources = work / "resources.md"
    if resources.exists() and resources.stat().st_size:
        lines += ["", "## Kernel resources on this device", "", resources.read_text().rstrip()]
    return "\n".join(lines) + "\n"


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
