"""Several processes (gloo on the CPU, started here the way torchrun starts them) against one process.

Every run uses configs/smoke.toml with one backbone, one CPU thread per process and fp32 training. The
single-process reference is computed in this module, fresh, from the same config; nothing is stored.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from drift.archive import ArchiveReader
from drift.ddp import GlobalBatchSampler
from drift.h5tree import read_tree
from drift.integrity import root_digest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"
ARCH = "resnet10t"
# Dropout 0 and frozen BatchNorm in the finetune phase: the two places where several processes draw other random numbers
# (dropout masks per process) or see other batches (BatchNorm statistics of each process's share) than one
# process; with them off, distributed training differs from single-process training only in the order in which
# gradients are summed. The finetune phase uses SGD: Adam's first steps move each weight by about lr times the sign
# of its gradient, so where a gradient is ~0 (inactive units) float32 summation-order differences of ~1e-7 decide a
# step of +-lr, and the smoke run's test logits then differ by ~1e-3 -- noise of the optimiser, not of the data split.
SETTINGS = [f'run.archs=["{ARCH}"]', "run.threads=1", "model.dropout=0.0", "train.finetune.bn_frozen=true",
            'train.finetune.optimizer="sgd"',
            'train.transfer.precision="fp32"', 'train.finetune.precision="fp32"', "report.enabled=false",
            "data.n_train=35", "data.n_val=12"]  # 35 = 2 x 16 + 3: the last global batch splits 2 / 1

# Runs `drift` as one rank. DRIFT_TEST_FAIL="kill|raise:<step prefix>:<call>" makes rank 1 die (SIGKILL) or raise
# at its <call>-th call of Pipeline.test_images (one per batch of images) in a step whose name starts so.
RUNNER = """
import os, signal, sys
fail = os.environ.get("DRIFT_TEST_FAIL", "")
if fail and os.environ.get("RANK") == "1":
    from drift import distributed
    from drift.pipeline import Pipeline
    how, prefix, at = fail.split(":")
    original, calls = Pipeline.test_images, [0]
    def hook(self, *args, **kwargs):
        if distributed._work.startswith(prefix):
            calls[0] += 1
            if calls[0] == int(at):
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)
    Pipeline.test_images = hook
from drift.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, *extra: str, nproc: int = 2, fail: str = "", command: str = "run",
           timeout: float = 180) -> list[tuple[int, str]]:
    """Run ``drift <command>`` on the smoke config as ``nproc`` ranks (gloo on 127.0.0.1, the environment torchrun
    sets; one process: none of it); returns each rank's (exit code, stderr + stdout)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DRIFT_TEST_FAIL=fail)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the loopback interface, whatever the host name resolves to
    port = str(_free_port())
    args = [command, "--config", str(SMOKE), "--out", str(out), "--no-progress",
            *[a for s in SETTINGS for a in ("--set", s)], *extra]
    procs, logs = [], []
    log_dir = out.parent / f"{out.name}-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    for r in range(nproc):
        e = dict(env)
        if nproc > 1:
            e.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = open(log_dir / f"rank{r}-{len(list(log_dir.iterdir()))}.log", "w+")  # noqa: SIM115
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-c", RUNNER, *args], cwd=ROOT, env=e, stdout=log,
                                      stderr=subprocess.STDOUT))
    results = []
    try:
        for p, log in zip(procs, logs):
            code = p.wait(timeout=timeout)
            log.seek(0)
            results.append((code, log.read()))
    finally:
        for p in procs:  # only the processes started here
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    return results


def ok(results: list[tuple[int, str]]) -> None:
    for r, (code, text) in enumerate(results):
        assert code == 0, f"rank {r} exited with {code}:\n{text[-3000:]}"


def commit_names(path: Path) -> list[str]:
    return [s["name"] for s in ArchiveReader(path).commits]


def assert_same_tree(a, b, where: str = "") -> None:
    """Exact equality of two read_tree trees (NaN equals NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{where}: members {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The whole smoke study in one process."""
    out = tmp_path_factory.mktemp("single") / "run"
    ok(launch(out, nproc=1))
    return out / "archive.h5"


# ---------------------------------------------------------------------------------------------- in one process
def test_global_batches_are_the_single_process_batches_split_over_ranks():
    """Each step's global batch, over ranks, is the single-process DataLoader's batch of that step (two epochs,
    the same generator draws), every rank's share equal, and a global batch the ranks cannot share is refused."""
    for n, batch, world in ((60, 16, 2), (61, 16, 4), (47, 12, 3), (33, 16, 2)):
        data = TensorDataset(torch.arange(n), torch.zeros(n))
        seed = int.from_bytes(os.urandom(4), "little")
        single = DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
        expected = [[ids.tolist() for ids, _ in single] for _ in range(2)]
        shares = []
        for r in range(world):
            gen = torch.Generator().manual_seed(seed)
            sampler = GlobalBatchSampler(data, batch, gen, n_proc=world, this_rank=r)
            loader = DataLoader(data, batch_sampler=sampler, generator=gen)
            shares.append([[ids.tolist() for ids, _ in loader] for _ in range(2)])
            assert len(loader) == len(single) - (n % batch and n % batch < world)
        for epoch in range(2):
            for step, want in enumerate(expected[epoch]):
                if len(want) < world:  # a last batch smaller than the process count is skipped
                    assert step == len(expected[epoch]) - 1 and all(len(s[epoch]) == step for s in shares)
                    continue
                got = [s[epoch][step] for s in shares]
                assert sum(got, []) == want, (n, batch, world, epoch, step)
                assert max(map(len, got)) - min(map(len, got)) <= 1
                if len(want) == batch:
                    assert all(len(g) == batch // world for g in got)
    data = TensorDataset(torch.arange(10), torch.zeros(10))
    with pytest.raises(ValueError, match=r"train\.finetune\.batch_size = 15 .*not divisible by the 2 processes"):
        GlobalBatchSampler(data, 15, torch.Generator(), n_proc=2, this_rank=0, where="train.finetune.batch_size")


# ---------------------------------------------------------------------------------------------- two processes
def test_sharded_maps_metrics_and_ifim_equal_single_process_exactly(single, tmp_path):
    """(a) From the single-process run's checkpoints, two processes compute CAMs, drift metrics, iFIM and the
    statistics again: every array and attribute in the archive equals the single-process one bit for bit."""
    out = tmp_path / "run"
    shutil.copytree(single.parent, out)
    with h5py.File(out / "archive.h5", "a") as f:  # keep the data and the trained models only
        commits = json.loads(f.attrs["commits"])
        kept = [s for s in commits if s["name"] == "data" or s["name"].startswith("models/")]
        assert len(kept) == 3 and len(commits) > len(kept)
        f.attrs["commits"] = json.dumps(kept)
        for group in list(f):
            if group not in ("data", "models"):
                del f[group]
        f.attrs["digest"] = root_digest(f)  # this surgery is deliberate, not damage
    ok(launch(out))
    with h5py.File(single) as a, h5py.File(out / "archive.h5") as b:
        assert commit_names(single) == commit_names(out / "archive.h5")
        for s_a, s_b in zip(json.loads(a.attrs["commits"]), json.loads(b.attrs["commits"])):
            if s_a["name"] == "data" or s_a["name"].startswith("models/"):
                assert s_a == s_b  # not recomputed: the same checkpoints
        assert {"attributions", "drift", "fisher", "stats"} <= set(a)
        assert sorted(a) == sorted(b)
        for group in a:
            assert_same_tree(read_tree(a[group]), read_tree(b[group]), group)


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    """A two-process run from scratch: rank 1 killed in the CAM step; resumed, rank 1 raising in the iFIM
    step; resumed again to the end. The three runs' results and the archive after each."""
    out = tmp_path_factory.mktemp("distributed") / "run"
    path = out / "archive.h5"
    killed = launch(out, fail="kill:attributions/:2")
    after_kill = commit_names(path)
    raised = launch(out, fail="raise:fisher/:1")
    after_raise = commit_names(path)
    final = launch(out)
    return {"killed": killed, "after_kill": after_kill, "raised": raised, "after_raise": after_raise,
            "final": final, "path": path}


def test_training_on_two_processes_gives_the_single_process_logits(single, distributed_run):
    """(b) The same global batches, split over two processes (DDP averaging each rank's share, the last batch of
    3 images split 2 / 1): the test logits of both checkpoints equal the single-process ones to 1e-4 (absolute, on
    logits of order 1). Only the order in which gradients are summed differs (float32 rounding, ~1e-7 relative
    per step); over the smoke run's steps that moves the logits by ~1e-7 (transfer phase, Adam on the head) and ~1e-5
    (finetune phase, SGD with momentum), so 1e-4 leaves a margin of ten, while a gradient weighted wrongly (each rank's
    mean loss, so that the share of 1 image of the partial batch weighs as much as the share of 2) shifts them by
    ~7e-2. Epoch training losses agree to 1e-5 relative."""
    ok(distributed_run["final"])
    one, two = ArchiveReader(single), ArchiveReader(distributed_run["path"])
    for phase in ("transfer", "finetune"):
        a, b = one.evaluation(ARCH, phase), two.evaluation(ARCH, phase)
        np.testing.assert_allclose(b["logits"], a["logits"], rtol=0, atol=1e-4)
        np.testing.assert_array_equal(b["labels"], a["labels"])
        np.testing.assert_allclose(two.history(ARCH, phase)["train_loss"], one.history(ARCH, phase)["train_loss"],
                                   rtol=1e-5)
        meta = two.read(f"models/{ARCH}/{phase}")
        assert meta["processes"] == 2 and one.read(f"models/{ARCH}/{phase}")["processes"] == 1
        assert meta["batch_size"] == 16  # the global batch, as configured


def test_a_killed_rank_leaves_a_valid_archive_and_the_rerun_finishes(distributed_run):
    """(c) Rank 1 killed (SIGKILL) mid-way through the CAM step: rank 0 stops with a message naming itself and
    the step, the archive holds the finished steps only; the rerun resumes from there (the checkpoints are not
    trained again) and commits every step."""
    killed = distributed_run["killed"]
    assert killed[1][0] == -9
    code, text = killed[0]
    assert code == 2, text[-3000:]
    assert "rank 0 lost contact with another rank" in text and f"during attributions/{ARCH}" in text, text[-3000:]
    assert distributed_run["after_kill"] == ["data", f"models/{ARCH}/transfer", f"models/{ARCH}/finetune"]
    ok(distributed_run["final"])
    names = commit_names(distributed_run["path"])
    assert names[:3] == distributed_run["after_kill"]
    assert {f"attributions/{ARCH}", f"drift/{ARCH}", f"fisher/{ARCH}", "stats"} <= set(names)
    assert not distributed_run["path"].with_name("archive.h5.tmp").exists()
    assert "computing it again" not in distributed_run["final"][0][1]  # nothing committed is recomputed


def test_a_failing_rank_stops_every_rank_with_one_message(distributed_run):
    """A rank raising in the iFIM step: both ranks exit with the same one-line error naming rank 1, the step and
    the cause; the steps finished before it are committed and kept."""
    lines = []
    for code, text in distributed_run["raised"]:
        assert code == 2, text[-3000:]
        errors = [line for line in text.splitlines() if line.startswith("drift run: error:")]
        assert len(errors) == 1, text[-3000:]
        lines.append(errors[0])
    assert lines[0] == lines[1] == (f"drift run: error: rank 1 failed during fisher/{ARCH}: "
                                    "RuntimeError: injected failure")
    assert distributed_run["after_raise"] == [*distributed_run["after_kill"], f"attributions/{ARCH}", f"drift/{ARCH}"]


def test_a_global_batch_the_processes_cannot_share_is_refused(tmp_path):
    """(d) train.finetune.batch_size = 15 on two processes: every rank exits before any compute with one message
    naming the setting, 15 and 2; nothing is written."""
    results = launch(tmp_path / "run", "--set", "train.finetune.batch_size=15")
    for code, text in results:
        assert code == 2, text[-3000:]
        assert (f"drift run: error: train.finetune.batch_size (for {ARCH}) = 15 is the global batch and is not "
                "divisible by the 2 processes; use a multiple of 2") in text, text[-3000:]
    assert not (tmp_path / "run" / "archive.h5").exists()


def test_nproc_runs_the_same_command_under_torchrun(monkeypatch, capsys):
    """`drift run --nproc N ...` starts `torchrun --standalone --nproc_per_node N -m drift run ...` without --nproc
    (both spellings), and refuses to nest inside a torchrun process."""
    from drift.cli import main

    seen = []
    monkeypatch.setattr(subprocess, "run", lambda cmd: seen.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rest = ["--config", "configs/smoke.toml", "--set", "run.threads=1"]
    assert main(["run", "--nproc", "3", *rest]) == 0
    assert main(["run", *rest, "--nproc=2"]) == 0
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert seen == [[*head, "--nproc_per_node=3", "-m", "drift", "run", *rest],
                    [*head, "--nproc_per_node=2", "-m", "drift", "run", *rest]]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "--nproc", "2", *rest]) == 2
    assert "--nproc inside a torchrun process" in capsys.readouterr().err
    assert len(seen) == 2


@pytest.fixture(scope="module", autouse=True)
def _torch_references(reference_kernels):
    """Every test here, module fixtures included, on the kernels' torch references (tests/conftest.py)."""
