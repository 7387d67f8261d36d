"""CUDA graphs of decode steps (shard/paged/graphs.py), with their padding and buckets checked on the CPU:
``capture=False`` runs the very step a graph would record, eagerly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.cuda_graphs import parse_cuda_graphs
from launcher.config import ArgumentError, LauncherConfig
from launcher.supervisor import Supervisor
from launcher.weights import ResolvedModel
from shard.backends.paged import PagedBackend
from shard.engines import make_engine
from shard.paged.graphs import DecodeGraphs
from shard.types import RequestSpec

pytestmark = pytest.mark.timeout(120)

CPU = torch.device("cpu")
PROMPTS = {1: list(range(3, 8)), 2: list(range(5, 31)), 3: list(range(40, 49))}  # 5, 26 and 9 tokens


def torch_path(model_dir: Path) -> PagedBackend:
    """The backend as a GPU runs it: the torch path, not the CPU kernels. Token 0 (the padding rows'
    token) gets a non-zero embedding, so that a padding row's K/V would show wherever it lands."""
    backend = PagedBackend(model_dir, CPU, kv_cache_bytes=2 * 2**20, block_size=4, cpu_kernels=False)
    backend.model.embed.weight[0] = torch.linspace(-1, 1, backend.spec.hidden_size)
    return backend


def run(backend: PagedBackend, steps: int) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens and log-probabilities of three requests decoding together, step by step."""
    engine = make_engine(backend)
    requests = [RequestSpec(rid, prompt, max_new_tokens=steps + 1) for rid, prompt in PROMPTS.items()]
    assert engine.add(requests) == []
    assert sorted(engine.step().request_ids) == list(PROMPTS)  # the prompts, with each first token
    tokens, logprobs = [], []
    for _ in range(steps):
        result = engine.step()
        assert result.request_ids == list(PROMPTS) and not result.failures
        tokens.append(result.token_ids)
        logprobs.append(result.logprobs)
    engine.clear()
    return tokens, logprobs


def test_buckets_round_up_to_captured_sizes_and_powers_of_two_blocks(tiny_model_dir: Path) -> None:
    backend = torch_path(tiny_model_dir)
    graphs = DecodeGraphs(backend.model, backend.cache, (8, 1, 2, 4, 2), capture=False, max_context=64)
    assert graphs.batch_sizes == (1, 2, 4, 8)
    assert graphs.max_width == 16  # 64 tokens in blocks of 4
    assert graphs.bucket(1, 1) == (1, 1)
    assert graphs.bucket(3, 5) == (4, 8)
    assert graphs.bucket(8, 16) == (8, 16)
    assert graphs.bucket(9, 1) is None  # more rows than any graph
    assert graphs.bucket(1, 17) is None  # a longer context than any graph
    # At most 1 GiB of K and V gathered per layer: here a token's K and V are 2 x 2 heads x 16 x 4 bytes.
    wide = DecodeGraphs(backend.model, backend.cache, (2**15,), capture=False)
    assert wide.token_bytes == 256
    assert wide.bucket(2**15, 32) == (2**15, 32) and wide.bucket(2**15, 33) is None
    with pytest.raises(ValueError, match="positive"):
        DecodeGraphs(backend.model, backend.cache, (0, 4))


def test_padded_graph_steps_give_the_eager_steps_tokens(tiny_model_dir: Path) -> None:
    eager = run(torch_path(tiny_model_dir), 12)
    backend = torch_path(tiny_model_dir)
    backend.graphs = DecodeGraphs(backend.model, backend.cache, (1, 2, 4), capture=False)
    tokens, logprobs = run(backend, 12)
    assert tokens == eager[0]
    assert torch.allclose(torch.tensor(logprobs), torch.tensor(eager[1]), atol=1e-5)
    # Three rows ran padded to four; the contexts (up to 38 tokens) crossed several width buckets.
    used = {key: g.steps for key, g in backend.graphs.graphs.items()}
    assert {batch for batch, _ in used} == {4} and len(used) >= 2 and sum(used.values()) == 12
    # The padding rows wrote only to the scratch block: the null block is still all zeros.
    cache = backend.cache
    null = slice(cache.null_block * 4, (cache.null_block + 1) * 4)
    assert not cache.k[:, null].any() and not cache.v[:, null].any()
    assert cache.k[:, cache.scratch_block * 4].any()


def test_steps_outside_every_bucket_run_eagerly(tiny_model_dir: Path) -> None:
    eager = run(torch_path(tiny_model_dir), 4)
    backend = torch_path(tiny_model_dir)
    backend.graphs = DecodeGraphs(backend.model, backend.cache, (1, 2), capture=False)  # 3 rows: too many
    assert run(backend, 4)[0] == eager[0]
    assert backend.graphs.graphs == {}


def test_graphs_are_off_on_the_cpu(tiny_model_dir: Path) -> None:
    assert torch_path(tiny_model_dir).graphs is None  # only a CUDA device captures graphs


def test_cuda_graphs_flag_parses_validates_and_reaches_the_shard() -> None:
    assert parse_cuda_graphs("4,1, 2,4") == (1, 2, 4)
    assert parse_cuda_graphs("0") == ()
    for bad in ("a,b", "-1", "0,4", ""):
        with pytest.raises(ValueError, match="cuda_graphs"):
            parse_cuda_graphs(bad)
    with pytest.raises(ArgumentError, match="cuda_graphs"):
        LauncherConfig(cuda_graphs="1,x").validate()
    model = ResolvedModel("m", Path("/m"), None, None, "local", "w")
    assert Supervisor(LauncherConfig(cuda_graphs="1,2,4"), model).shard_config(0).cuda_graphs == (1, 2, 4)
    assert Supervisor(LauncherConfig(), model).shard_config(0).cuda_graphs is None


def test_a_failed_capture_drops_every_graph_and_decodes_eagerly(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    eager = run(torch_path(tiny_model_dir), 6)
    backend = torch_path(tiny_model_dir)
    graphs = backend.graphs = DecodeGraphs(backend.model, backend.cache, (4,), capture=True)
    graphs.graphs[(4, 1)] = object()  # a graph captured earlier: it must go too
    calls = []

    def fail(graph) -> None:
        calls.append((graph.batch, graph.width))
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "_capture", fail)
    assert run(backend, 6)[0] == eager[0]
    assert calls == [(4, 8)] and graphs.failed and graphs.graphs == {} and graphs.pool is None
    assert graphs.logits is None
