"""Data-parallel training on torch.distributed: the process group, batch sharding, reductions.

The training loops stay single-process code; `World` is what they ask when they need to know about
the other processes. In one process (the default) every method is a no-op, so the in-process path
is unchanged. Under `torchrun` (`World.from_env()` after `init_process_group`):

- Each global batch of `batch_size` images, drawn by the same sampler and seed as one process would
  draw it, is split into `world_size` contiguous parts, one per rank (`RankBatchSampler`): no image
  is seen twice per epoch and none is dropped; class-balanced sampling keeps its draw.
- Rank r's loss is scaled by n_r * world_size / n_global before backward, so DDP's gradient average
  equals the gradient of the mean loss over the whole global batch, also for a short last batch.
  A rank whose part of a short last batch is empty runs its forward on one image of that batch with
  weight 0 (DDP needs every rank in every step); it adds nothing to the gradient or the loss log.
- Evaluation shards the split by stride and gathers the predictions (each image scored once).
- Only rank 0 writes files (`is_main`); `barrier()` orders writes before other ranks read them.

Backends: nccl on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

__all__ = ["RankBatchSampler", "World", "batch_shares", "init_world", "shard_bounds"]


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous part of n items; the first n % world_size ranks get one more."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def batch_shares(n_items: int, batch_size: int, rank: int, world_size: int) -> list[tuple[int, int, int]]:
    """Per global batch of an epoch's order: (begin, start, end), i.e. where the global batch begins
    and this rank's slice [start, end) of it (empty when the batch has fewer images than ranks)."""
    shares = []
    for begin in range(0, n_items, batch_size):
        start, end = shard_bounds(min(batch_size, n_items - begin), rank, world_size)
        shares.append((begin, begin + start, begin + end))
    return shares


class RankBatchSampler(Sampler[list[int]]):
    """This rank's indices of every global batch drawn by `sampler` (the single-process sampler).

    The sampler is iterated lazily, on the loader's first batch, exactly as a DataLoader with
    `sampler=` would iterate it: the epoch's generator then yields the same order as in one process.
    `loss_weights[i]` is the factor for batch i's mean loss (see the module docstring)."""

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int, world_size: int) -> None:
        self.sampler = sampler
        self.shares = batch_shares(len(sampler), batch_size, rank, world_size)  # type: ignore[arg-type]
        n = len(sampler)  # type: ignore[arg-type]
        self.real_counts = [end - start for _, start, end in self.shares]
        self.loss_weights = [
            count * world_size / min(batch_size, n - begin)
            for count, (begin, _, _) in zip(self.real_counts, self.shares, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.shares)

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        for begin, start, end in self.shares:
            # an empty part of a short last batch: one image of that batch, with loss weight 0
            yield order[start:end] if end > start else [order[begin]]


@dataclass(frozen=True)
class World:
    """Where this process sits among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        """The running process group, or one process when none is initialized."""
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """DDP around `module` when distributed (gradients of trainable parameters all-reduced)."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # find_unused_parameters: heads / aggregators may leave a trainable tensor out of a step
        return DistributedDataParallel(
            module, device_ids=ids, broadcast_buffers=False, find_unused_parameters=True
        )

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, *values: float) -> tuple[float, ...]:
        """Sum of each float over all ranks (float64 on CPU through the group's backend)."""
        if not self.distributed:
            return values
        device = (
            torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
        )
        total = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(total)
        return tuple(float(v) for v in total.cpu())

    def gather_cat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's CPU tensor (rank order); the tensors may differ in length."""
        if not self.distributed:
            return tensor
        parts: list[torch.Tensor | None] = [None] * self.world_size
        dist.all_gather_object(parts, tensor.cpu())
        return torch.cat([p for p in parts if p is not None])

    def eval_indices(self, n: int) -> Sequence[int]:
        """This rank's images of an evaluation split of n (stride shard: each image on one rank)."""
        return range(self.rank, n, self.world_size)


def init_world(device_type: str, timeout_s: float = 1800.0) -> World:
    """Join the process group torchrun described in the environment (nccl on CUDA, gloo on CPU)."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"init_world needs torchrun's environment; {missing} not set. Launch with "
            "`python -m torch.distributed.run --nproc-per-node N ...` (the gpu resource's nproc_per_node)"
        )
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return World.from_env()
