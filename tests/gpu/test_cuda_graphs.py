"""CUDA graphs of decode steps on a real GPU: captured, replayed, and the same greedy tokens as eager steps.

Marked ``gpu``: skipped without CUDA (tests/unit/test_graphs.py checks the padding on the CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shard.backends.paged import PagedBackend
from shard.engine import make_engine
from shard.types import RequestSpec

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PROMPTS = {1: list(range(3, 8)), 2: list(range(5, 31)), 3: list(range(40, 49))}


def greedy(backend: PagedBackend, steps: int) -> list[list[int]]:
    engine = make_engine(backend)
    engine.prefill(1, [RequestSpec(rid, p, max_new_tokens=steps + 1) for rid, p in PROMPTS.items()], 999)
    out = [engine.decode([(1, list(PROMPTS))])[0].token_ids for _ in range(steps)]
    engine.clear()
    return out


def test_graph_steps_replay_the_eager_steps(tiny_model_dir: Path) -> None:
    cuda = torch.device("cuda")
    kwargs = {"dtype": "float32", "kv_cache_bytes": 8 * 2**20, "block_size": 4}
    eager = greedy(PagedBackend(tiny_model_dir, cuda, cuda_graphs=(), **kwargs), 20)
    backend = PagedBackend(tiny_model_dir, cuda, cuda_graphs=(1, 2, 4), **kwargs)
    assert backend.graphs is not None
    assert greedy(backend, 20) == eager
    graphs = backend.graphs.graphs
    assert graphs and all(g.graph is not None for g in graphs.values()), "every bucket was captured"
    assert sum(g.steps for g in graphs.values()) == 20
