"""bench/gpu_kernels.py runs end to end in its CPU dry-run mode and reports sound rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

# Interpreter session only: skipped with TRITON_INTERPRET=0 (kernels compiled for a CUDA device).
pytestmark = pytest.mark.interpreter

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_kernels.py"


def test_dry_run_prints_the_table_last_and_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_kernels_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.json"
    rows = bench.main(["--dry-run", "--json", str(out)])
    printed = capsys.readouterr().out.strip().splitlines()
    title_at = next(i for i, line in enumerate(printed) if line.startswith("CPU dry run -- not a measurement"))
    assert len(printed) == title_at + 3 + len(rows)  # title, header, rule, one line per row: the table is last
    assert json.loads(out.read_text()) == rows
    ops = {(r["op"], r["dtype"], r["C"]) for r in rows}
    assert {("fisher_gram", "float32", 5), ("fisher_project", "bfloat16", 14), ("topk_iou", "float32", 4)} <= ops
    for r in rows:
        assert r["dry_run"] and r["kernel_ms"] > 0 and r["reference_ms"] > 0
        if r["op"] == "topk_iou":
            assert r["err_kernel"] == 0  # mismatched counts
        else:
            # Relative errors against float64: the kernel's at most twice the reference's, or a few float32 ulps.
            assert r["err_kernel"] <= max(2 * r["err_reference"], bench.ULPS)
            assert 0 <= r["err_reference"] < 0.05
