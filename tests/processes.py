"""Runs a test's ranks as real processes (spawned, as torch.distributed wants them): each calls
``target(rank, *args, queue)`` and reports what it found with ``queue.put((rank, value))``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def run_ranks(
    target: Callable[..., None], world: int, args: tuple[Any, ...], reporting: int, timeout: float = 180
) -> dict[int, Any]:
    """Starts ``world`` processes of ``target``; returns the first ``reporting`` reports by rank (a rank
    that reports twice keeps its last), then kills every process still alive."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    processes = [ctx.Process(target=target, args=(r, *args, queue)) for r in range(world)]
    for p in processes:
        p.start()
    results: dict[int, Any] = {}
    try:
        for _ in range(reporting):
            rank, value = queue.get(timeout=timeout)
            results[rank] = value
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
            p.join(10)
    return results
