"""The kernels compile for sm_80, sm_89 and sm_90a without spills and within each target's shared memory.

The launches are the ones the dispatch layer makes on a GPU (recorded from the launchers on fake CUDA tensors,
see :mod:`drift_kernels.compile_check`), for the study's problem sizes. No GPU is needed, only the ptxas of the
Triton wheel. Options are covered pairwise (every dtype with both heads, with and without x) rather than as a
full product, and every compilation is made once per process, so the module runs in well under a minute.
"""

from __future__ import annotations

import os

import pytest
import torch
from drift_kernels import compile_check as cc

if cc.ptxas_path() is None:
    pytest.skip("ptxas not found (Triton's NVIDIA backend is not installed)", allow_module_level=True)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

#: Every pair of (dtype, head, x) options appears at least once.
PAIRWISE = [
    (F32, "softmax", True),
    (F32, "sigmoid", False),
    (F16, "softmax", False),
    (F16, "sigmoid", True),
    (BF16, "softmax", True),
    (BF16, "sigmoid", False),
]
#: fisher_project: the study's m = 4, a single column, and the tl.dot path (m > 16).
PROJECT_SMALL_C = [(F32, "softmax", 4), (F16, "sigmoid", 1), (BF16, "softmax", 40)]
PROJECT_LARGE_C = [(F32, "sigmoid", 4), (BF16, "softmax", 40)]

#: fisher_project with m = C - 1 (every eigenvector of a rank C - 1 softmax Fisher matrix) at the study's C.
PROJECT_ALL_EIGEN = [(F32, "softmax"), (BF16, "sigmoid")]
#: The odd D of InceptionV3's 299 px inputs: rows of J not 16-byte aligned, no vector loads, more registers.
ODD = cc.STUDY_D_ODD

CASES = (
    [cc.Case("fisher_gram", C, dt, head, x) for C in (5, 14) for dt, head, x in PAIRWISE]
    + [cc.Case("fisher_gram", C, dt, head, x) for C in (100, 200) for dt, head, x in PAIRWISE[::2]]
    + [cc.Case("fisher_gram", C, F32, "softmax", True, D=ODD) for C in (5, 14, 100, 200)]
    + [cc.Case("fisher_project", C, dt, head, m=m) for C in (5, 14) for dt, head, m in PROJECT_SMALL_C]
    + [cc.Case("fisher_project", C, dt, head, m=m) for C in (100, 200) for dt, head, m in PROJECT_LARGE_C]
    + [cc.Case("fisher_project", 14, dt, head, m=13, D=D) for dt, head in PROJECT_ALL_EIGEN for D in (cc.STUDY_D, ODD)]
    + [cc.Case("fisher_project", 14, F32, "softmax", m=4, D=ODD)]
    + [cc.Case("topk_iou", dtype=dt, ties=ties) for dt in (F32, F16, BF16) for ties in ("fractional", "index")]
)

TARGETS = tuple(cc.TARGETS)


@pytest.fixture(scope="module")
def rows() -> dict[tuple[cc.Case, str], list[cc.Row]]:
    """Every launch of every case compiled for every target (in parallel, once)."""
    out: dict[tuple[cc.Case, str], list[cc.Row]] = {}
    for row in cc.check(CASES, TARGETS):
        out.setdefault((row.case, row.report.target), []).append(row)
    return out


def _id(case: cc.Case) -> str:
    return f"{case.op}-{case.describe().replace(' ', '-')}"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_compiles_without_spills_within_shared_limit(case, target, rows):
    launches = rows[(case, target)]
    assert launches, f"{case.describe()}: the launcher made no kernel launch"
    for row in launches:
        rep = row.report
        what = f"{rep.kernel} [{row.launch.describe()}] for {target} ({case.describe()})"
        assert not rep.error, f"{what} does not compile: {rep.error}"
        assert rep.spills == 0, f"{what} spills {rep.spill_stores} B stored / {rep.spill_loads} B loaded a thread"
        assert rep.fits_shared, f"{what} needs {rep.shared} B of shared memory, over the {rep.shared_limit} B limit"


def test_fisher_kernels_fit_the_smallest_shared_memory(rows):
    # sm_86 / sm_89 (99 KB a block) must run every Fisher launch, not only the H100 / H200 (227 KB).
    for (case, _), launches in rows.items():
        if case.op != "topk_iou":
            for row in launches:
                assert row.report.shared <= cc.TARGETS["sm_89"].shared_limit, (case.describe(), row.report)


def test_fisher_gram_grid_is_one_wave_of_resident_programs(rows):
    # The split of D launches programs_per_sm programs an SM; each SM must hold that many at once (registers,
    # warps, shared memory of the compiled kernel), or the last programs run as a second, mostly idle wave.
    import drift_kernels.fisher_gram_kernel as fg

    seen = 0
    for (case, target), launches in rows.items():
        if case.op != "fisher_gram":
            continue
        partial = next(r for r in launches if r.report.kernel == "_fisher_gram_partial_kernel")
        cfg = fg._config(case.C, case.D, on_gpu=True)
        resident = cc.occupancy(partial.report, target)
        what = f"{case.describe()} on {target}: {partial.report.registers} registers, w{partial.report.num_warps}"
        assert resident >= cfg.programs_per_sm, f"{what}: {resident} programs an SM, grid assumes {cfg.programs_per_sm}"
        n_programs = partial.launch.grid[0] * partial.launch.grid[1] * partial.launch.grid[2]
        assert n_programs <= cfg.programs_per_sm * cc.TARGETS[target].n_sm + case.B * partial.launch.grid[0], what
        seen += 1
    assert seen >= 3 * len(TARGETS)


def test_occupancy_follows_the_register_warp_and_shared_limits():
    rep = cc.CompileReport("k", "sm_90a", 8, 80, 0, 0, 0, 14336, 232448)
    # 80 registers -> 2560 a warp, 20480 a block of 8 warps: 3 blocks in 65536.
    assert cc.occupancy(rep, "sm_90a") == 3
    assert cc.occupancy(cc.CompileReport("k", "sm_89", 4, 32, 0, 0, 0, 0, 101376), "sm_89") == 12  # 48 warps
    assert cc.occupancy(cc.CompileReport("k", "sm_89", 1, 16, 0, 0, 0, 40000, 101376), "sm_89") == 2  # shared
    assert cc.occupancy(cc.CompileReport("k", "sm_80", 8, 255, 0, 0, 0, 0, 166912), "sm_80") == 1


def test_small_class_counts_use_the_broadcast_path_without_tensor_cores():
    # C <= 16 (the study): fp32 FMA on independent lanes, never a 16 x 16 tl.dot replicated over the warps.
    for C in (1, 5, 14, 16):
        (partial, _reduce) = cc.dispatch_launches(cc.Case("fisher_gram", C, F32, "softmax", True), "sm_90a")
        assert partial.meta["USE_DOT"] is False, C
        per_thread = partial.meta["C_PAD"] ** 2 * partial.meta["BLOCK_D"] // (32 * partial.meta["num_warps"])
        assert partial.meta["C_PAD"] <= 16 and per_thread <= 32, (C, partial.describe())
    (partial, _reduce) = cc.dispatch_launches(cc.Case("fisher_gram", 17, F32, "softmax", True), "sm_90a")
    assert partial.meta["USE_DOT"] is True and partial.meta["PRECISION"] == "ieee"


def test_recorded_launch_matches_the_dispatch_configuration():
    import drift_kernels.fisher_gram_kernel as fg

    case = cc.Case("fisher_gram", 5, BF16, "sigmoid", False, B=8, D=cc.STUDY_D)
    partial, reduce = cc.dispatch_launches(case, "sm_90a")
    cfg = fg._config(5, cc.STUDY_D, on_gpu=True)
    assert partial.meta["BLOCK_D"] == cfg.block_d and partial.meta["num_warps"] == cfg.num_warps
    assert partial.meta["HAS_X"] is False and partial.meta["SOFTMAX"] is False
    assert isinstance(partial.args[0], cc.TensorArg) and partial.args[0].dtype == BF16
    n_split = partial.grid[1]
    assert partial.grid == (1, n_split, 8) and 1 < n_split <= cfg.programs_per_sm * cc.TARGETS["sm_90a"].n_sm
    assert partial.meta["NUM_STAGES"] == cfg.num_stages == partial.meta["num_stages"] == fg.BROADCAST_STAGES >= 2
    assert reduce.name == "_fisher_gram_reduce_kernel"


def test_recording_and_compiling_leave_triton_and_the_modules_as_they_were(rng):
    import drift_kernels.fisher_gram_kernel as fg
    from drift_kernels import _common
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    kernel, launch_device, sm_count = fg._fisher_gram_partial_kernel, _common.launch_device, _common.sm_count
    env, interpret, active = os.environ.get("TRITON_INTERPRET"), knobs.runtime.interpret, driver._active
    cc.dispatch_launches(cc.Case("fisher_gram", 14, F16, "softmax", True), "sm_80")
    with cc._compiling_for(GPUTarget("cuda", 89, 32)):
        assert driver.active.get_current_target().arch == 89
        assert knobs.runtime.interpret is False
    assert fg._fisher_gram_partial_kernel is kernel
    assert _common.launch_device is launch_device and _common.sm_count is sm_count
    assert os.environ.get("TRITON_INTERPRET") == env and knobs.runtime.interpret == interpret
    assert driver._active is active
    # The interpreter still runs the kernels in this process.
    J = torch.randn(2, 5, 64, generator=rng)
    p = torch.softmax(torch.randn(2, 5, generator=rng), -1)
    if env == "1":
        K, _ = fg.fisher_gram_triton(J, p)
        assert torch.isfinite(K).all()


def test_compile_kernel_reports_resources_for_explicit_arguments():
    import drift_kernels.fisher_gram_kernel as fg

    kp = cc.TensorArg(torch.float32)
    rep = cc.compile_kernel(
        fg._fisher_gram_reduce_kernel, (kp, kp, kp, kp, 7, 8, 14), dict(HAS_X=True, BLOCK=256, num_warps=4), "sm_80"
    )
    assert not rep.error and rep.target == "sm_80" and rep.num_warps == 4
    assert 0 < rep.registers <= 255 and rep.spills == 0 and rep.ok


def test_table_lists_every_row(rows):
    some = [r for launches in list(rows.values())[:3] for r in launches]
    table = cc.format_table(some)
    assert len(table.splitlines()) == 2 + len(some)
    md = cc.format_table(some, markdown=True)
    assert md.startswith("| kernel |") and len(md.splitlines()) == 2 + len(some)
