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


def _torch_routes():
    import sys

    sys.path.insert(0, str(SCRIPT.parent))
    from benchmarks import _torch_routes

    return _torch_routes


@pytest.mark.parametrize("C, D, sharp", [(5, 301, 1.0), (14, 777, 9.0), (3, 64, 30.0)])
def test_three_pass_gram_matches_float64_and_is_as_accurate_as_the_reference(C, D, sharp, rng):
    # The three-pass torch route, the comparator of the benchmark: exact algebra, float32 arithmetic.
    import torch
    from drift_kernels.reference import fisher_gram_reference

    routes = _torch_routes()
    J = torch.randn(3, C, D, generator=rng)
    p = torch.softmax(sharp * torch.randn(3, C, generator=rng, dtype=torch.float64), 1).float()  # sum p != 1
    exact, _ = fisher_gram_reference(J.double(), p.double(), compute_dtype=torch.float64)
    K = routes.gram_three_pass(J, p)
    ref, _ = fisher_gram_reference(J, p)
    assert K.dtype == torch.float32 and K.shape == (3, C, C)
    scale = exact.abs().amax()
    err, err_ref = (K.double() - exact).abs().amax() / scale, (ref.double() - exact).abs().amax() / scale
    assert err <= max(2 * err_ref, 8 * torch.finfo(torch.float32).eps), (err, err_ref)
    # float64 in, float64 arithmetic: agrees with the float64 reference to rounding. The rounding of entry (i, j) is
    # a few float64 ulps of its largest term, sqrt(p_i p_j) |A_i| |M| |A_j| <= sqrt(p_i p_j) 4 D (2 max|J|)^2: at a
    # margin of 30 an entry of 1e-18 beside a largest entry of 1e-11 carries errors of 1e-21, far above 1e-12 of
    # the largest entry and far below its own term bound.
    K64 = routes.gram_three_pass(J.double(), p.double())
    sp = p.double().sqrt()
    terms = sp[:, :, None] * sp[:, None, :] * 4 * D * (2 * J.double().abs().amax()) ** 2
    bound = 1e-12 * scale + 64 * torch.finfo(torch.float64).eps * terms
    assert K64.dtype == torch.float64 and bool(((K64 - exact).abs() <= bound).all())
