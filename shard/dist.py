"""Where this shard runs: its rank in the tensor-parallel group and its device."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

AllReduce = Callable[[torch.Tensor], torch.Tensor]


def no_all_reduce(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class Parallel:
    """This rank's place in the tensor-parallel group and how it sums partial results."""

    rank: int = 0
    world_size: int = 1
    # Sums a tensor over the ranks (in place or not); concatenates the ranks' last dimensions.
    all_reduce: AllReduce = no_all_reduce
    all_gather: AllReduce = no_all_reduce
    # The minimum of an int over the ranks: for choices every rank must make alike (pool size, chunks).
    agree: Callable[[int], int] = int

    def split(self, size: int, what: str) -> tuple[int, int]:
        """This rank's [start, end) of ``size`` items split evenly (refused when it does not divide)."""
        if size % self.world_size:
            raise ValueError(f"{what} ({size}) is not divisible by the number of shards ({self.world_size})")
        part = size // self.world_size
        return self.rank * part, (self.rank + 1) * part


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistInfo:
        """Reads RANK, WORLD_SIZE and LOCAL_RANK, which the launcher sets for every shard."""
        return cls(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0"))),
        )


def select_device(dist: DistInfo) -> torch.device:
    """This rank's GPU when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank)
        return torch.device("cuda", dist.local_rank)
    return torch.device("cpu")


def init_parallel(dist: DistInfo, device: torch.device, timeout_s: float = 120.0) -> Parallel:
    """Joins the tensor-parallel group (NCCL on CUDA, gloo on CPU) and returns this rank's ``Parallel``:
    how the paged layers sum partial results and gather the vocabulary slices. One rank: no group."""
    from datetime import timedelta

    import torch.distributed as td

    if dist.world_size == 1:
        return Parallel()
    td.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        rank=dist.rank,
        world_size=dist.world_size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )

    def all_reduce(x: torch.Tensor) -> torch.Tensor:
        td.all_reduce(x)
        return x

    def all_gather(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.world_size)]
        td.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def agree(value: int) -> int:
        """The smallest of every rank's ``value``: decisions that must be identical on all ranks."""
        t = torch.tensor([value], dtype=torch.long, device=device)
        td.all_reduce(t, op=td.ReduceOp.MIN)
        return int(t.item())

    return Parallel(dist.rank, dist.world_size, all_reduce, all_gather, agree)
