"""Backend choice (DRIFT_KERNELS, TRITON_INTERPRET) and argument validation of the public entries."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import drift_kernels
import pytest
import torch
from drift_kernels.reference import fisher_gram_reference, fisher_project_reference, topk_iou_reference
from kernel_checks import probabilities

# Interpreter session only: skipped with TRITON_INTERPRET=0 (kernels compiled for a CUDA device).
pytestmark = pytest.mark.interpreter


@pytest.fixture
def env(monkeypatch):
    def set_env(drift_kernels_mode=None, interpret=None):
        for name, value in (("DRIFT_KERNELS", drift_kernels_mode), ("TRITON_INTERPRET", interpret)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)

    return set_env


def test_backend_modes(env):
    t = torch.zeros(2)
    env(None, "1")
    assert drift_kernels.backend(t) == "triton"
    env("auto", "0")
    assert drift_kernels.backend(t) == "reference"
    env("reference", "1")
    assert drift_kernels.backend(t) == "reference"
    env("triton", "1")
    assert drift_kernels.backend(t) == "triton"
    env("triton", "0")
    with pytest.raises(RuntimeError, match="DRIFT_KERNELS=triton but the tensor is on cpu"):
        drift_kernels.backend(t)
    env("fast", "1")
    with pytest.raises(ValueError, match="DRIFT_KERNELS must be one of auto, reference, triton; got 'fast'"):
        drift_kernels.backend(t)
    env(None, "1")
    with pytest.raises(TypeError, match="backend expects a torch.Tensor"):
        drift_kernels.backend([1.0])


def test_reference_mode_and_cpu_without_interpreter_use_the_reference_exactly(env, rng):
    J = torch.randn(2, 5, 33, generator=rng)
    p = probabilities(2, 5, "softmax", rng)
    x = torch.randn(2, 33, generator=rng)
    W = torch.randn(2, 5, 3, generator=rng)
    a, b = torch.rand(3, 6, 7, generator=rng), torch.rand(3, 6, 7, generator=rng)
    for mode, interpret in (("reference", "1"), ("auto", "0")):
        env(mode, interpret)
        K, Gx = drift_kernels.fisher_gram(J, p, x)
        K_ref, Gx_ref = fisher_gram_reference(J, p, x)
        assert torch.equal(K, K_ref) and torch.equal(Gx, Gx_ref)
        assert torch.equal(drift_kernels.fisher_project(J, p, W), fisher_project_reference(J, p, W))
        for got, want in zip(drift_kernels.topk_iou(a, b, (0.1, 0.5)), topk_iou_reference(a, b, (0.1, 0.5))):
            assert torch.equal(got, want)


def test_float64_and_many_classes_go_to_the_reference_in_auto_and_fail_when_forced(env, rng):
    env(None, "1")
    J64 = torch.randn(2, 4, 20, generator=rng, dtype=torch.float64)
    p = probabilities(2, 4, "softmax", rng).double()
    K, _ = drift_kernels.fisher_gram(J64, p)
    assert K.dtype == torch.float64 and torch.equal(K, fisher_gram_reference(J64, p)[0])
    a64 = torch.rand(2, 3, 3, generator=rng, dtype=torch.float64)
    assert torch.equal(drift_kernels.topk_iou(a64, a64, (0.5,))[0], topk_iou_reference(a64, a64, (0.5,))[0])
    C = 257
    J_big = torch.randn(1, C, 8, generator=rng)
    p_big = torch.full((1, C), 1 / C)
    torch.testing.assert_close(drift_kernels.fisher_gram(J_big, p_big)[0], fisher_gram_reference(J_big, p_big)[0])
    env("triton", "1")
    with pytest.raises(TypeError, match="float64"):
        drift_kernels.fisher_gram(J64, p)
    with pytest.raises(TypeError, match="float64"):
        drift_kernels.fisher_project(J64, p, torch.randn(2, 4, 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64"):
        drift_kernels.topk_iou(a64, a64, (0.5,))
    with pytest.raises(ValueError, match="at most C = 256 classes, got J with C = 257"):
        drift_kernels.fisher_gram(J_big, p_big)


def test_fisher_argument_errors_name_the_fault(rng):
    J = torch.randn(2, 5, 30, generator=rng)
    p = probabilities(2, 5, "softmax", rng)
    cases = [
        (TypeError, "J must be a torch.Tensor", lambda: drift_kernels.fisher_gram(J.numpy(), p)),
        (ValueError, r"J must have shape \(B, C, D\), got a 2-d tensor of shape \(5, 30\)",
         lambda: drift_kernels.fisher_gram(J[0], p)),
        (TypeError, "J must be a floating-point tensor, got dtype torch.int64",
         lambda: drift_kernels.fisher_gram(J.long(), p)),
        (ValueError, r"p must have shape \(B, C\) = \(2, 5\)", lambda: drift_kernels.fisher_gram(J, p[:, :4])),
        (ValueError, r"x must have shape \(B, D\) = \(2, 30\)",
         lambda: drift_kernels.fisher_gram(J, p, torch.randn(2, 29))),
        (ValueError, "head must be 'softmax' or 'sigmoid', got 'tanh'",
         lambda: drift_kernels.fisher_gram(J, p, head="tanh")),
        (ValueError, r"W must have shape \(B, C, m\)",
         lambda: drift_kernels.fisher_project(J, p, torch.randn(2, 5))),
        (ValueError, "x is on meta but J is on cpu",
         lambda: drift_kernels.fisher_gram(J, p, torch.empty(2, 30, device="meta"))),
        (ValueError, r"J must have B, C, D >= 1", lambda: drift_kernels.fisher_gram(J[:, :, :0], p)),
    ]  # fmt: skip
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()
    bad = p.clone()
    bad[1, 3] = 1.5
    with pytest.raises(ValueError, match=r"p\[1, 3\] = 1.5"):
        drift_kernels.fisher_gram(J, bad)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"p\[1, 3\] = nan"):
        drift_kernels.fisher_project(J, bad, torch.randn(2, 5, 1))


def test_topk_argument_errors_name_the_fault(rng):
    a = torch.rand(3, 4, 5, generator=rng)
    cases = [
        (ValueError, r"b must have the shape of a \(3, 4, 5\), got \(3, 5, 4\)",
         lambda: drift_kernels.topk_iou(a, a.transpose(1, 2), (0.5,))),
        (ValueError, r"a must have shape \(N, H, W\)", lambda: drift_kernels.topk_iou(a[0], a[0], (0.5,))),
        (TypeError, "a must be a floating-point tensor", lambda: drift_kernels.topk_iou(a.int(), a.int(), (0.5,))),
        (ValueError, "fractions must hold at least one", lambda: drift_kernels.topk_iou(a, a, [])),
        (TypeError, "fractions must be a sequence", lambda: drift_kernels.topk_iou(a, a, 0.5)),
        (TypeError, r"fractions\[0\] must be a real number", lambda: drift_kernels.topk_iou(a, a, ["0.5"])),
        (TypeError, r"fractions\[1\] must be a real number", lambda: drift_kernels.topk_iou(a, a, [0.5, True])),
        (ValueError, r"fractions\[0\] must lie in \(0, 1\], got 0.0", lambda: drift_kernels.topk_iou(a, a, [0.0])),
        (ValueError, "b is on meta but a is on cpu",
         lambda: drift_kernels.topk_iou(a, torch.empty(3, 4, 5, device="meta"), (0.5,))),
    ]  # fmt: skip
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


def test_fractions_may_be_a_float64_tensor_only(rng):
    a, b = torch.rand(2, 5, 5, generator=rng), torch.rand(2, 5, 5, generator=rng)
    got = drift_kernels.topk_iou(a, b, torch.tensor([0.2, 0.4], dtype=torch.float64))
    for g, w in zip(got, topk_iou_reference(a, b, (0.2, 0.4))):
        assert torch.equal(g, w)
    # float32(0.2) * 25 = 5.0000001: its ceiling would take 6 pixels, not 5.
    with pytest.raises(TypeError, match="fractions given as a tensor must be float64"):
        drift_kernels.topk_iou(a, b, torch.tensor([0.2, 0.4]))


def test_imports_and_falls_back_to_the_reference_without_triton():
    script = textwrap.dedent(
        """
        import os, sys
        sys.modules["triton"] = None  # as if Triton were not installed
        os.environ["TRITON_INTERPRET"] = "1"
        import torch, drift_kernels
        J = torch.randn(2, 3, 10); p = torch.softmax(torch.randn(2, 3), -1)
        assert drift_kernels.backend(J) == "reference"
        K, _ = drift_kernels.fisher_gram(J, p)
        assert torch.equal(K, drift_kernels.fisher_gram_reference(J, p)[0])
        os.environ["DRIFT_KERNELS"] = "triton"
        try:
            drift_kernels.backend(J)
        except RuntimeError as err:
            assert "triton is not installed" in str(err), err
        else:
            raise AssertionError("no error")
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "DRIFT_KERNELS"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_measured_torch_wins_send_that_case_to_the_reference(env, monkeypatch, tmp_path, rng):
    import json

    import drift_kernels.dispatch as dispatch
    import drift_kernels.fisher_gram_kernel as fg

    env(None, "1")
    wins = tmp_path / "torch_wins.json"
    wins.write_text(json.dumps([{"op": "fisher_gram", "device": "cpu", "dtype": "float32", "C": 5}]))
    monkeypatch.setattr(dispatch, "TORCH_WINS", wins)
    launched = []
    real = fg._launch
    monkeypatch.setattr(fg, "_launch", lambda *a, **k: launched.append(a[0].shape) or real(*a, **k))
    C5 = torch.randn(2, 5, 37, generator=rng)
    p5 = probabilities(2, 5, "softmax", rng)
    K, _ = drift_kernels.fisher_gram(C5, p5)
    assert launched == [] and torch.equal(K, fisher_gram_reference(C5, p5)[0])  # the measured case: torch
    C6 = torch.randn(2, 6, 37, generator=rng)
    drift_kernels.fisher_gram(C6, probabilities(2, 6, "softmax", rng))
    drift_kernels.fisher_gram(C5.to(torch.bfloat16), p5)
    assert launched == [(2, 6, 37), (2, 5, 37)]  # other C, other dtype: the kernel
    assert dispatch.torch_wins("fisher_gram", C5) and not dispatch.torch_wins("fisher_project", C5)
    env("triton", "1")
    drift_kernels.fisher_gram(C5, p5)
    assert launched[-1] == (2, 5, 37)  # DRIFT_KERNELS=triton forces the kernel
    wins.write_text('[{"op": "fisher_gram"}]')
    dispatch._load_torch_wins.cache_clear()
    with pytest.raises(ValueError, match="torch_wins.json: expected a JSON list"):
        dispatch.torch_wins("fisher_gram", C5)
    dispatch._load_torch_wins.cache_clear()


def test_torch_wins_records_come_from_rows_torch_won_at_every_batch():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "bench" / "gpu_kernels.py"
    spec = importlib.util.spec_from_file_location("gpu_kernels_wins", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def row(op, C, B, k, t, dtype="float32"):
        return dict(op=op, device="H100", dtype=dtype, C=C, B=B, kernel_ms=k, best_torch_ms=t)

    rows = [row("fisher_gram", 5, 8, 1.0, 0.5), row("fisher_gram", 5, 64, 2.0, 1.5),  # torch wins at both B
            row("fisher_gram", 14, 8, 1.0, 0.5), row("fisher_gram", 14, 64, 1.0, 3.0),  # split: kernel stays
            row("fisher_project", 5, 8, 1.0, 2.0), row("topk_iou", 4, 4096, 9.0, 1.0)]  # fmt: skip
    assert bench.torch_wins(rows) == [dict(op="fisher_gram", device="H100", dtype="float32", C=5)]
