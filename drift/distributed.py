"""Running the pipeline on several processes (``torchrun``): world size, rank, gathers, barriers, the sharing of
evaluation work, and the archive as each rank sees it.

Every function here is a no-op (or the plain single-process object) when ``torch.distributed`` is not
initialised, so the pipeline has one code path. Under ``torchrun`` (or any launcher that sets ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) :func:`init` joins the process group: NCCL when
the run's device is CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on the CPU.

How the work is split, and why the results equal a single process's:

* Evaluation, CAMs and iFIM spectra: the single-process batch schedule is kept and its batches are dealt out
  round-robin (batch ``b`` to rank ``b mod N``, :func:`my_batches`); every rank computes whole batches exactly
  as one process would, and :func:`gather_batches` puts them back in batch order on every rank. Same
  checkpoints, same thread count: bit-identical arrays.
* Drift metrics: the per-image metrics of contiguous image ranges (:func:`by_images`), then the summaries over
  all images on every rank.
* Training: :class:`drift.ddp.GlobalBatchSampler` draws the single-process epoch order from the same generator
  and gives each rank an equal share of every global batch (``train.<phase>.batch_size`` is the global batch,
  checked by :func:`check_batch_sizes`); :class:`drift.ddp.DataParallel` wraps the module in
  ``DistributedDataParallel`` and scales each rank's loss so that the averaged gradient is the gradient of the
  global batch's mean loss.
* Archive and checkpoints: only rank 0 writes (:func:`open_archive`); the other ranks read the committed
  archive and write their copy of each commit into memory. Every commit ends with a barrier, and whether a unit of
  work runs is decided by rank 0 and broadcast (:func:`decided_by_rank0`), so the ranks never disagree about it.
* Failures: :func:`guard` turns an exception on any rank into :class:`RankFailed` on every rank, naming the
  rank and the work (the commit name) during which it began (posted in the process group's key-value store).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .archive import Archive
from .config import PHASES

#: What the pipeline is computing, by the name it will commit under (set by :func:`decided_by_rank0`), named by
#: failure messages.
_work = "start-up"
_FAILED_KEY = "drift/failed"


class RankFailed(RuntimeError):
    """A rank of a multi-process run failed; the message names the rank, the work and the cause."""


# ---------------------------------------------------------------------------------------------- process group
def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 without ``torch.distributed``)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without ``torch.distributed``)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes the archive, the checkpoints and the log (rank 0)."""
    return rank() == 0


def init(device: str = "auto", timeout_s: float = 1800.0) -> bool:
    """Join the process group described by the launcher's environment (``WORLD_SIZE`` > 1); returns whether
    this process is one of several.

    NCCL when ``device`` is (or ``auto`` resolves to) CUDA, with ``cuda:LOCAL_RANK`` made the current device;
    gloo otherwise. Idempotent: a second call, or a call in an already initialised group, changes nothing.
    """
    if dist.is_available() and dist.is_initialized():
        return active()
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={n} but this torch build has no torch.distributed")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"rank {os.environ.get('RANK', '?')}: LOCAL_RANK {local} but only "
                               f"{torch.cuda.device_count()} CUDA devices are visible; start at most that many "
                               "processes per machine (torchrun --nproc_per_node)")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return active()


def shutdown() -> None:
    """Leave the process group (at the end of a command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for a CUDA run of several processes, else ``device``."""
    if device.type == "cuda" and active():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _collective(what: str, fn: Callable[[], Any]) -> Any:
    """Run one collective; a broken group (a rank died) becomes :class:`RankFailed` naming the work."""
    try:
        return fn()
    except RankFailed:
        raise
    except Exception as exc:
        raise RankFailed(_posted() or f"rank {rank()} lost contact with another rank ({what}, during {_work}): "
                                      f"{_first_line(exc)}") from exc


def barrier(what: str = "") -> None:
    """Wait for every rank (no-op for one process)."""
    if active():
        _collective(what or f"barrier after {_work}", dist.barrier)


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object; unchanged for one process)."""
    if not active():
        return value
    box = [value]
    _collective("broadcast", lambda: dist.broadcast_object_list(box, src=0))
    return box[0]


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not active():
        return [value]
    out: list[Any] = [None] * world_size()
    _collective("gather", lambda: dist.all_gather_object(out, value))
    return out


def all_sum(*values: float) -> tuple[float, ...]:
    """Sums over ranks of floats (float64)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64,
                     device=torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                     else "cpu")
    _collective("sum", lambda: dist.all_reduce(t))
    return tuple(t.cpu().tolist())


def broadcast_buffers(module: nn.Module, what: str = "broadcasting buffers") -> None:
    """Overwrite every buffer of ``module`` (BatchNorm statistics) with rank 0's, in place (no-op for one
    process); ``what`` names the step in failure messages."""
    if not active():
        return
    for b in module.buffers():
        _collective(what, functools.partial(dist.broadcast, b, 0))


def decided_by_rank0(method: Callable[..., bool]) -> Callable[..., bool]:
    """Decorate a pipeline method ``(self, name, ...) -> bool`` deciding whether the work ``name`` runs: rank 0
    decides (and logs why) and broadcasts the answer, so every rank takes the same path. Work that runs
    becomes the current work of failure messages."""
    @functools.wraps(method)
    def wrapper(self, name: str, *args, **kwargs) -> bool:
        global _work
        if not active():
            todo = method(self, name, *args, **kwargs)
        else:
            todo = bool(broadcast(method(self, name, *args, **kwargs) if is_main() else None))
        if todo:
            _work = name
        return todo
    return wrapper


# ---------------------------------------------------------------------------------------------- failures
def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no group, or a backend without one
        return None


def _posted() -> str | None:
    """The failure message a rank posted, if any (and the store is still reachable)."""
    store = _store()
    if store is None:
        return None
    try:
        if store.check([_FAILED_KEY]):
            return store.get(_FAILED_KEY).decode()
    except Exception:
        return None
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Make a failure on one rank a failure of every rank, with one message naming where it began.

    The rank where an exception starts posts ``rank R failed during W: <error>`` to the process group's store
    and raises :class:`RankFailed` with it; a rank that then loses contact with it (its collectives break when
    the failed process exits or is stopped by the launcher) raises the same message. A rank killed outright
    posts nothing; the others then name themselves and the work during which they lost contact. No-op for one
    process.
    """
    try:
        yield
    except BaseException as exc:
        if not active() or isinstance(exc, RankFailed):
            raise
        posted = _posted()
        if posted is not None:  # another rank failed first: its message, not our broken collective
            raise RankFailed(posted) from exc
        if isinstance(exc, KeyboardInterrupt):
            raise
        if isinstance(exc, getattr(dist, "DistError", ())):  # e.g. DDP's gradient exchange with a dead rank
            message = f"rank {rank()} lost contact with another rank (during {_work}): {_first_line(exc)}"
        else:
            message = f"rank {rank()} failed during {_work}: {_first_line(exc)}"
        store = _store()
        if store is not None:
            with contextlib.suppress(Exception):
                store.set(_FAILED_KEY, message)
        raise RankFailed(message) from exc


# ---------------------------------------------------------------------------------------------- sharding
def my_batches(batches: Sequence[Any]) -> list[Any]:
    """This rank's share of a batch schedule: batches ``rank, rank + N, rank + 2N, ...``."""
    return list(batches)[rank()::world_size()]


def gather_batches(parts: Any) -> Any:
    """Reassemble per-batch results computed over :func:`my_batches` into the full schedule's order.

    ``parts`` is this rank's list (one entry per batch it computed), a dict of such lists, or a tuple of them;
    returns the same structure holding every batch in schedule order, on every rank.
    """
    if not active():
        return parts
    every = all_gather(parts)
    n = world_size()

    def merge(lists: list[list]) -> list:
        total = sum(len(x) for x in lists)
        return [lists[b % n][b // n] for b in range(total)]

    if isinstance(parts, dict):  # a rank without batches has no keys
        keys = dict.fromkeys(k for r in every for k in r)
        return {k: merge([r.get(k, []) for r in every]) for k in keys}
    if isinstance(parts, tuple):
        return tuple(merge([r[i] for r in every]) for i in range(len(parts)))
    return merge(every)


def image_range(n: int) -> slice:
    """This rank's contiguous share of ``n`` images (sizes differ by at most one)."""
    bounds = np.linspace(0, n, world_size() + 1).round().astype(int) if n else np.zeros(world_size() + 1, int)
    k = rank()
    return slice(int(bounds[k]), int(bounds[k + 1]))


def by_images(fn: Callable[..., dict[str, torch.Tensor]], n: int, *tensors: torch.Tensor | None,
              **kwargs: Any) -> dict[str, torch.Tensor]:
    """``fn(*tensors, **kwargs)`` (a dict of per-image (n, ...) tensors), computed by each rank on its
    :func:`image_range` of every tensor (and keyword tensor) whose first dimension is ``n``, and concatenated in
    image order on every rank. One process: ``fn`` on everything."""
    if not active():
        return fn(*tensors, **kwargs)
    sl = image_range(n)

    def cut(t):
        return t[sl] if torch.is_tensor(t) and t.ndim >= 3 and t.shape[0] == n else t

    mine = fn(*(cut(t) for t in tensors), **{k: cut(v) for k, v in kwargs.items()})
    every = all_gather({k: v.cpu() for k, v in mine.items()})
    return {k: torch.cat([r[k] for r in every]) for k in mine}


class ShardedBatches(Sampler[list[int]]):
    """The batches ``[0, b), [b, 2b), ...`` of ``n`` items in order, this rank's share (:func:`my_batches`)."""

    def __init__(self, n: int, batch_size: int):
        self.batches = my_batches([list(range(lo, min(n, lo + batch_size))) for lo in range(0, n, batch_size)])

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def eval_loader(data: Dataset, batch_size: int) -> DataLoader:
    """The in-order loader of an evaluation pass: all of ``data`` for one process, else this rank's batches of
    the same schedule (reassemble with :func:`gather_batches`)."""
    if not active():
        return DataLoader(data, batch_size=batch_size)
    return DataLoader(data, batch_sampler=ShardedBatches(len(data), batch_size))


# ---------------------------------------------------------------------------------------------- training batches
def check_batch_sizes(cfg) -> None:
    """Refuse, before any compute, a global training batch that the processes cannot share equally.

    The number of processes is the process group's, or before it exists the launcher's ``WORLD_SIZE``.

    Raises:
        ValueError: naming the setting, its value and the number of processes.
    """
    n = world_size() if dist.is_available() and dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    if n == 1:
        return
    where = [(f"train.{st}", getattr(cfg.train, st).for_arch(a, f"train.{st}").batch_size, a)
             for st in PHASES for a in cfg.run.archs]
    if cfg.model.weights == "synthetic-source":
        where.append(("source", cfg.source.batch_size, None))
    for key, size, arch in where:
        if size % n:
            what = f"{key}.batch_size" + (f" (for {arch})" if arch else "")
            raise ValueError(f"{what} = {size} is the global batch and is not divisible by the {n} processes; "
                             f"use a multiple of {n}")


# ---------------------------------------------------------------------------------------------- archive
class _LeaderArchive(Archive):
    """Rank 0's archive: makes each commit, then waits for every rank at a barrier."""

    @contextlib.contextmanager
    def commit(self, name: str, *args, **kwargs) -> Iterator[h5py.File]:
        with super().commit(name, *args, **kwargs) as f:
            yield f
        barrier(f"after committing {name}")


class _FollowerArchive(Archive):
    """A non-zero rank's view: reads the archive rank 0 writes; its commits go to memory only."""

    def __init__(self, path: str | os.PathLike):  # no creation, no clean-up: rank 0 owns the file
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._config_text = ""

    @contextlib.contextmanager
    def commit(self, name: str, *args, **kwargs) -> Iterator[h5py.File]:
        with h5py.File(f"drift-rank{rank()}-{name}", "w", driver="core", backing_store=False) as f:
            yield f
        barrier(f"after committing {name}")


def open_archive(path: str | os.PathLike, config_text: str, science_hash: str, provenance: dict) -> Archive:
    """The run's :class:`~drift.archive.Archive` as this rank uses it.

    One process: the archive. Several: rank 0 opens (creates, checks, cleans up) the archive first and owns
    every write; each of its commits is followed by a barrier. The other ranks wait for it, then read the
    committed archive and write their (identical) trees into a throw-away in-memory file.
    """
    if not active():
        return Archive(path, config_text, science_hash, provenance)
    if is_main():
        try:
            archive = _LeaderArchive(path, config_text, science_hash, provenance)
        except Exception as exc:
            broadcast(str(exc))
            raise
        broadcast(None)
        return archive
    error = broadcast(None)
    if error is not None:
        raise RankFailed(f"rank 0 failed opening the archive {path}: {error}")
    return _FollowerArchive(path)
