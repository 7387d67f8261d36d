"""The tensor-parallel path on NCCL: N ranks on N GPUs give the greedy tokens one GPU gives.

Marked ``gpu``/``multigpu``: skipped without CUDA or with fewer than two devices.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.multigpu,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
    ),
]

PROMPTS = [[3 + (i * 13 + j * 7) % 300 for j in range(5 + 3 * i)] for i in range(6)]
STEPS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, path: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from shard.backends.paged import PagedBackend
    from shard.dist import DistInfo, init_parallel, select_device
    from shard.engines import make_engine
    from shard.types import RequestSpec
    from tests.engine_run import run_engine

    dist = DistInfo(rank, world, rank)
    device = select_device(dist)
    backend = PagedBackend(path, device, "float32", init_parallel(dist, device), kv_cache_bytes=256 * 2**20)
    engine = make_engine(backend)
    requests = [RequestSpec(i, p, max_new_tokens=STEPS) for i, p in enumerate(PROMPTS)]
    tokens = run_engine(engine, {0: requests})  # each request's STEPS tokens
    queue.put((rank, tokens))


def _run(world: int, path: Path) -> list[tuple[int, dict]]:
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    processes = [ctx.Process(target=_rank, args=(r, world, port, str(path), queue)) for r in range(world)]
    for p in processes:
        p.start()
    results = sorted(queue.get(timeout=300) for _ in processes)
    for p in processes:
        p.join(60)
        assert p.exitcode == 0
    return results


def test_two_gpus_answer_as_one(tiny_model_dir: Path) -> None:
    [(_, one)] = _run(1, tiny_model_dir)
    two = _run(2, tiny_model_dir)
    assert [tokens for _, tokens in two] == [one, one]
