"""Data-parallel training (``torchrun``): the training sampler, the training loader and the
``DistributedDataParallel`` wrapping of one training run, all equal to the plain single-process objects when
``torch.distributed`` is not initialised (see `drift.distributed` for the process group).

Why a run of ``N`` processes trains as one process would: :class:`GlobalBatchSampler` draws the single-process
epoch order from the same generator and gives each rank an equal share of every global batch
(``train.<phase>.batch_size`` is the global batch); :class:`DataParallel` wraps the module in
``DistributedDataParallel`` and scales each rank's loss so that the averaged gradient is the gradient of the global
batch's mean loss.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler

from . import distributed


class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's share of every global batch of a shuffled epoch.

    Each epoch's order is the permutation ``RandomSampler(data, generator=generator)`` gives a single process
    (the same draws from the same generator), cut into global batches of ``batch_size``; rank ``r`` takes the
    ``r``-th of ``N`` equal slices of each (``batch_size / N`` images; the last, smaller batch is split as evenly
    as possible). A last batch with fewer images than processes is skipped on every rank. The union over ranks
    of one step's images is the single process's batch of that step.

    Raises:
        ValueError: ``batch_size`` is not a multiple of the number of processes.
    """

    def __init__(self, data: Dataset, batch_size: int, generator: torch.Generator, n_proc: int | None = None,
                 this_rank: int | None = None, where: str = "batch_size"):
        self.world = distributed.world_size() if n_proc is None else n_proc
        self.rank = distributed.rank() if this_rank is None else this_rank
        if batch_size % self.world:
            raise ValueError(f"{where} = {batch_size} (the global batch) is not divisible by the {self.world} "
                             f"processes; use a multiple of {self.world}")
        self.data, self.batch_size, self.generator = data, batch_size, generator
        self.global_size = batch_size  # images in the global batch of the step last yielded

    def __len__(self) -> int:
        n, b = len(self.data), self.batch_size
        return n // b + (n % b >= self.world)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(RandomSampler(self.data, generator=self.generator))
        for lo in range(0, len(order), self.batch_size):
            batch = order[lo:lo + self.batch_size]
            if len(batch) < self.world:
                continue
            self.global_size = len(batch)
            yield [int(i) for i in np.array_split(np.asarray(batch), self.world)[self.rank]]


def train_loader(data: Dataset, batch_size: int, generator: torch.Generator, where: str = "batch_size") -> DataLoader:
    """The shuffled training loader of :func:`drift.train.fit`: torch's one for one process, else one over
    :class:`GlobalBatchSampler` (the same generator draws, so a run is reproducible for a given N)."""
    if not distributed.active():
        return DataLoader(data, batch_size=batch_size, shuffle=True, generator=generator, drop_last=False)
    return DataLoader(data, batch_sampler=GlobalBatchSampler(data, batch_size, generator, where=where),
                      generator=generator)


class DataParallel:
    """The data-parallel side of one training run: the forward function, the loss and the epoch's loss sums.

    One process: ``forward`` and the plain mean cross-entropy, unchanged. Several: ``module`` (which must be
    what ``forward`` calls) in ``DistributedDataParallel``, with ``sync_bn`` its BatchNorm layers converted to
    ``SyncBatchNorm`` (CUDA only, statistics over the global batch); each rank's loss is its images' summed
    cross-entropy times ``N / global batch size``, so that DDP's average of the ranks' gradients is the
    gradient of the global batch's mean loss.
    """

    def __init__(self, module: nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader,
                 device: torch.device, sync_bn: bool = False, where: str = "training"):
        self.loader, self.module = loader, module
        self.forward = forward
        self.ddp = None
        self.synced = False
        if not distributed.active():
            return
        if forward is not module:
            raise ValueError(f"{where}: data-parallel training needs forward to be the trained module itself")
        if sync_bn and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
            if device.type != "cuda":
                raise ValueError(f"{where}: sync_bn needs CUDA devices (torch's SyncBatchNorm runs on GPUs only); "
                                 f"this run trains on {device.type}")
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            self.synced = True
        ids = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else None
        # static_graph: the same parameters take part in every step, and some may take none (source pretraining
        # trains through a temporary head, the classifier's own head stays out of the loss).
        self.ddp = nn.parallel.DistributedDataParallel(module, device_ids=ids, static_graph=True)
        self.forward = self.ddp

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss to back-propagate for this rank's share of the step's global batch."""
        if self.ddp is None:
            return F.cross_entropy(logits, y)
        size = self.loader.batch_sampler.global_size
        return F.cross_entropy(logits, y, reduction="sum") * (distributed.world_size() / size)

    def loss_sum(self, loss: torch.Tensor, y: torch.Tensor) -> float:
        """This rank's summed per-image loss of the step (for the epoch's mean training loss)."""
        if self.ddp is None:
            return loss.item() * len(y)
        return loss.item() * self.loader.batch_sampler.global_size / distributed.world_size()

    def epoch_sums(self, total: float, count: int) -> tuple[float, int]:
        """The epoch's loss sum and image count over every rank; buffers (BatchNorm statistics) of rank 0 are
        given to every rank, so that validation and the kept weights agree across ranks."""
        if self.ddp is None:
            return total, count
        distributed.broadcast_buffers(self.module, "broadcasting BatchNorm statistics")
        total, count = distributed.all_sum(total, count)
        return total, int(count)

    def close(self) -> None:
        """After training: SyncBatchNorm layers back to plain BatchNorm (same parameters and statistics)."""
        if self.synced:
            _plain_batchnorm(self.module)


def _plain_batchnorm(module: nn.Module) -> None:
    """Replace every ``SyncBatchNorm`` below ``module`` by a ``BatchNorm2d`` holding its state."""
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                child.track_running_stats).to(next(child.buffers()).device)
            bn.load_state_dict(child.state_dict())
            bn.train(child.training)
            if child.affine:
                bn.weight.requires_grad_(child.weight.requires_grad)
                bn.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, name, bn)
        else:
            _plain_batchnorm(child)
