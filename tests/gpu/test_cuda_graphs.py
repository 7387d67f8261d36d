"""CUDA graphs of decode steps on a real GPU: captured, replayed, and the logits of eager steps.

Marked ``gpu``: skipped without CUDA (tests/unit/shard/paged/test_graphs.py checks the padding on the CPU).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shard.backends.paged import PagedBackend

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PROMPTS = [list(range(3, 8)), list(range(5, 31)), list(range(40, 49))]


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_graph_steps_give_the_eager_steps_logits(tiny_model_dir: Path, dtype: str, tolerance: float) -> None:
    """Both backends decode in lockstep on the same tokens (the eager one's greedy choices). A row leaves
    at step 4 (a smaller bucket replays after a larger one was captured into the shared pool) and a new
    one joins at step 8 (the larger bucket replays again)."""
    cuda = torch.device("cuda")
    kwargs = {"dtype": dtype, "kv_cache_bytes": 8 * 2**20, "block_size": 4}
    eager = PagedBackend(tiny_model_dir, cuda, cuda_graphs=(), **kwargs)
    graphed = PagedBackend(tiny_model_dir, cuda, cuda_graphs=(1, 2, 4), **kwargs)
    assert eager.graphs is None and graphed.graphs is not None
    first = [b.prefill(PROMPTS, [False] * 3) for b in (eager, graphed)]
    states = [out.state for out in first]
    ids = first[0].logits.argmax(-1)
    for step in range(16):
        if step == 4:
            states = [
                b.select(s, torch.tensor([0, 2])) for b, s in zip((eager, graphed), states, strict=True)
            ]
            ids = ids[[0, 2]]
        if step == 8:
            joined = [b.prefill([list(range(60, 70))], [False]) for b in (eager, graphed)]
            states = [
                b.concatenate([s, j.state]) for b, s, j in zip((eager, graphed), states, joined, strict=True)
            ]
            ids = torch.cat([ids, joined[0].logits.argmax(-1)])
        want, got = (b.decode(s, ids).float() for b, s in zip((eager, graphed), states, strict=True))
        scale = want.abs().max()
        assert (got - want).abs().max() <= tolerance * scale, f"step {step}"
        ids = want.argmax(-1)
    graphs = graphed.graphs.graphs
    assert {batch for batch, _ in graphs} == {2, 4}
    assert all(g.graph is not None for g in graphs.values()), "every bucket was captured"
    assert sum(g.steps for g in graphs.values()) == 16
