"""Timed scaling on the CPU: one training epoch (finetune phase, DistributedDataParallel over gloo) and the CAM step's
computation (batches dealt out over ranks and gathered), each with 1 and 2 processes.

The processes are started once per process count (one torch thread each, the environment torchrun sets) and
kept waiting for commands, so that a timed call is the work alone: the parent sends the command to every rank
and waits for every rank's answer. Each test checks what it ran (every image trained on or mapped once, in
order, finite maps, and the same maps with 1 and 2 processes).
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WORKER = r"""
import hashlib, os, sys, time
import numpy as np
import torch
torch.set_num_threads(1)
from drift import distributed
distributed.init("cpu")
from drift.attribution import cams_multi
from drift.config import PhaseConfig
from drift.data import load_synthetic
from drift.models import build, unfreeze
from drift.train import fit

splits = load_synthetic(64, 8, 24, 64, 0)
torch.manual_seed(0)
model = build("resnet10t", 5)
cfg = PhaseConfig(epochs=1, batch_size=16, bn_frozen=False, precision="fp32")
device = torch.device("cpu")

def epoch():
    unfreeze(model, bn_frozen=False)
    res = fit(model, model, splits.train, None, cfg, device, 0, progress=False)
    return f"loss={res.history['train_loss'][0]:.6f}"

def cam_step():
    model.eval()
    test = splits.test
    n, maps = len(test), {}
    for lo in distributed.my_batches(range(0, n, 6)):
        idx = np.arange(lo, min(n, lo + 6))
        res = cams_multi(model, test.images(idx), torch.as_tensor(test.labels[idx]),
                         methods=("gradcam++", "layercam"), layers=("block", "last-conv"), scores=("logit",))
        for (layer, score), by_method in res.items():
            for m, v in by_method.items():
                maps.setdefault(f"{layer}/{m}", []).append(v.float())
    maps = {k: torch.cat(v) for k, v in distributed.gather_batches(maps).items()}
    assert all(v.shape[0] == n and torch.isfinite(v).all() for v in maps.values())
    h = hashlib.sha256(b"".join(maps[k].numpy().tobytes() for k in sorted(maps))).hexdigest()[:16]
    return f"rows={n} sha={h}"

model.eval()
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "quit":
        break
    t0 = time.perf_counter()
    out = epoch() if cmd == "epoch" else cam_step()
    distributed.barrier()
    print(f"@@ {time.perf_counter() - t0:.4f} {out}", flush=True)
distributed.shutdown()
"""


class Pool:
    """``n`` worker processes (ranks of one gloo group when n > 1) waiting for commands on stdin."""

    def __init__(self, n: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        self.procs = []
        for r in range(n):
            e = dict(env)
            if n > 1:
                e.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=port)
            self.procs.append(subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, env=e, text=True,
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE))

    def __call__(self, cmd: str) -> list[str]:
        """Run ``cmd`` on every rank; each rank's answer (seconds inside the rank, then what it computed)."""
        for p in self.procs:
            p.stdin.write(cmd + "\n")
            p.stdin.flush()
        answers = []
        for r, p in enumerate(self.procs):
            while True:
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError(f"benchmark worker rank {r} exited with {p.wait()} during {cmd!r}")
                if line.startswith("@@ "):
                    answers.append(line[3:].strip())
                    break
        return answers

    def close(self) -> None:
        for p in self.procs:  # only the processes started here
            if p.poll() is None:
                try:
                    p.stdin.write("quit\n")
                    p.stdin.close()
                    p.wait(timeout=30)
                except (OSError, subprocess.TimeoutExpired):
                    p.kill()
                    p.wait()


@pytest.fixture(scope="module")
def pools():
    started: dict[int, Pool] = {}

    def get(n: int) -> Pool:
        if n not in started:
            started[n] = Pool(n)
        return started[n]

    yield get
    for pool in started.values():
        pool.close()


_maps: dict[int, str] = {}


@pytest.mark.parametrize("nproc", [1, 2])
def test_cam_step_scaling(benchmark, pools, nproc):
    pool = pools(nproc)
    answers = benchmark.pedantic(pool, args=("cams",), rounds=3, warmup_rounds=1)
    what = {a.split(" ", 1)[1] for a in answers}
    assert len(what) == 1 and what.pop().startswith("rows=24 ")  # every rank gathered all 24 maps, in order
    _maps[nproc] = answers[0].split("sha=")[1]
    if len(_maps) == 2:
        assert _maps[1] == _maps[2], "the maps of 1 and 2 processes differ"
    benchmark.extra_info.update(processes=nproc, images=24, rank_seconds=[float(a.split()[0]) for a in answers])


@pytest.mark.parametrize("nproc", [1, 2])
def test_training_epoch_scaling(benchmark, pools, nproc):
    pool = pools(nproc)
    answers = benchmark.pedantic(pool, args=("epoch",), rounds=3, warmup_rounds=1)
    losses = {a.split(" ", 1)[1] for a in answers}
    assert len(losses) == 1  # every rank reports the same (all-reduced) epoch loss
    loss = float(losses.pop().split("=")[1])
    assert 0 < loss < 10
    benchmark.extra_info.update(processes=nproc, images=64, global_batch=16,
                                rank_seconds=[float(a.split()[0]) for a in answers])

