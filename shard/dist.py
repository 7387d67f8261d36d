"""Where this shard runs: its rank in the tensor-parallel group and its device."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


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
