"""The paged backend: block accounting, prefix caching, forks, eviction, and the backend choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shard.backends import load_backend
from shard.backends.hf import HFBackend
from shard.backends.paged import PagedBackend
from shard.chunked import StepCosts
from shard.config import ShardConfig
from shard.engine import Engine, StepEngine
from shard.engines import make_engine
from shard.paged.arch import model_spec
from shard.paged.kv_cache import BlockAllocator, CacheFullError, PagedKVCache, block_hash
from shard.paged.model import UnsupportedModelError
from shard.types import RequestSpec, SamplingParams
from tests.engine_run import collect, run_engine

pytestmark = pytest.mark.timeout(120)

CPU = torch.device("cpu")


@pytest.fixture()
def paged(tiny_model_dir: Path) -> PagedBackend:
    return PagedBackend(tiny_model_dir, CPU, kv_cache_bytes=2 * 2**20, block_size=4)


def free_blocks(backend: PagedBackend) -> int:
    return backend.cache.allocator.num_free


def generate(engine: StepEngine, rid: int, ids: list[int], steps: int, params: SamplingParams | None = None):
    out = run_engine(engine, {0: [RequestSpec(rid, ids, params or SamplingParams(), max_new_tokens=steps)]})
    engine.clear()
    return out[rid]


def test_blocks_come_back_when_requests_leave(paged: PagedBackend) -> None:
    total = paged.cache.allocator.num_blocks
    engine = make_engine(paged)
    engine.add([RequestSpec(1, list(range(3, 30))), RequestSpec(2, list(range(5, 12)))])
    for _ in range(7):
        engine.step()
    held = total - free_blocks(paged)
    assert held == -(-34 // 4) + -(-14 // 4)
    engine.remove([1])  # request 1 leaves: its blocks return at once
    assert total - free_blocks(paged) == -(-14 // 4)
    engine.step()
    assert total - free_blocks(paged) == -(-15 // 4)
    engine.clear()
    assert free_blocks(paged) == total


def test_prefix_cache_reuses_blocks_and_changes_nothing(paged: PagedBackend, tiny_model_dir: Path) -> None:
    system = list(range(3, 40))  # 37 tokens: 9 full blocks of 4
    cold = generate(Engine(HFBackend(tiny_model_dir, CPU)), 1, [*system, 50, 51], 8)
    engine = make_engine(paged)
    first = generate(engine, 1, [*system, 50, 51], 8)
    hits_before = paged.cache.allocator.hits
    second = generate(engine, 2, [*system, 50, 51], 8)
    other = generate(engine, 3, [*system, 60], 8)
    assert first == second == cold
    assert paged.cache.allocator.hits - hits_before >= 2 * 9
    assert other == generate(Engine(HFBackend(tiny_model_dir, CPU)), 1, [*system, 60], 8)
    assert free_blocks(paged) == paged.cache.allocator.num_blocks  # cached blocks are evictable, not held


def run_all(engine: StepEngine, requests: list[RequestSpec]) -> dict[int, list[int]]:
    """Adds ``requests`` at once and steps until each has its tokens."""
    return run_engine(engine, {0: requests})


def test_samples_of_one_prompt_share_its_blocks(paged: PagedBackend, tiny_model_dir: Path) -> None:
    prompt = list(range(3, 21))  # 18 tokens: 4 full blocks of 4 before the last token
    params = [SamplingParams(do_sample=True, temperature=1.0, seed=s) for s in (1, 2, 3)]
    solo = make_engine(PagedBackend(tiny_model_dir, CPU, kv_cache_bytes=2 * 2**20, block_size=4))
    alone = [generate(solo, 9, prompt, 6, p) for p in params]
    engine = make_engine(paged)
    requests = [RequestSpec(i, prompt, p, max_new_tokens=6, group=100) for i, p in enumerate(params)]
    out = run_all(engine, requests)
    assert [out[i] for i in range(3)] == alone
    # One sample ran the prompt; the two others found its 4 full blocks in the prefix cache.
    assert paged.cache.allocator.hits == 2 * 4
    engine.clear()
    assert free_blocks(paged) == paged.cache.allocator.num_blocks


def test_a_pool_too_small_for_everyone_preempts_and_every_request_completes(tiny_model_dir: Path) -> None:
    """64 requests needing several times the pool: the scheduler preempts (the newest give their blocks
    back and recompute later) instead of failing anyone, and greedy outputs equal solo runs."""
    prompts = [[3 + (i * 7 + j * 3) % 200 for j in range(5 + i % 20)] for i in range(64)]
    solo = make_engine(PagedBackend(tiny_model_dir, CPU, kv_cache_bytes=8 * 2**20, block_size=4))
    expected = [generate(solo, 1000 + i, p, 12) for i, p in enumerate(prompts)]
    tiny = PagedBackend(tiny_model_dir, CPU, kv_cache_bytes=2 * 2**20, block_size=4)
    per_block = 2 * 2**20 // tiny.cache.allocator.num_blocks
    small = PagedBackend(tiny_model_dir, CPU, kv_cache_bytes=40 * per_block, block_size=4)
    assert small.cache.allocator.num_blocks == 40  # 160 tokens; the requests need about 1,700
    engine = make_engine(small)
    out = run_all(engine, [RequestSpec(i, p, max_new_tokens=12) for i, p in enumerate(prompts)])
    assert [out[i] for i in range(64)] == expected
    assert engine.stats()["preemptions"] > 0
    engine.clear()
    assert free_blocks(small) == 40


def test_allocator_evicts_least_recently_used_cached_blocks() -> None:
    a = BlockAllocator(num_blocks=3, block_size=4)
    blocks = [a.allocate() for _ in range(3)]
    keys = [(None, "", (i, i, i, i)) for i in range(3)]
    digests = [block_hash(None, key[2]) for key in keys]
    for block, h, key in zip(blocks, digests, keys, strict=True):
        a.register(block, h, key)
    with pytest.raises(CacheFullError):
        a.allocate()
    for block in blocks:
        a.release(block)
    assert a.lookup(digests[0], keys[0]) == blocks[0]  # found again, and now held
    a.release(blocks[0])  # most recently used
    fresh = a.allocate()
    assert fresh == blocks[1]  # the least recently used cached block went first
    assert a.lookup(digests[1], keys[1]) is None
    assert a.lookup(digests[0], keys[0]) == blocks[0]


def test_cache_full_is_an_error_not_a_corruption(tiny_model_dir: Path) -> None:
    backend = PagedBackend(tiny_model_dir, CPU, kv_cache_bytes=1, block_size=4)  # one block
    with pytest.raises(CacheFullError):
        backend.prefill([list(range(3, 12))], [False])
    assert backend.cache.allocator.num_free == 1


def test_kv_cache_open_skips_the_last_token() -> None:
    cache = PagedKVCache(1, 8, 4, 1, 2, torch.float32, CPU)
    seq = cache.open(list(range(8)), use_prefix_cache=True)
    cache.reserve(seq, 8)
    seq.computed = 8
    cache.seal(seq)
    cache.release(seq)
    again = cache.open(list(range(8)), use_prefix_cache=True)
    assert again.computed == 4  # the second block holds the last token, whose logits must be computed


def test_backend_choice(tiny_model_dir: Path) -> None:
    assert load_backend(ShardConfig(tiny_model_dir), CPU).info.name == "paged"
    assert load_backend(ShardConfig(tiny_model_dir, backend="transformers"), CPU).info.name == "transformers"
    with pytest.raises(
        ValueError, match=r"no backends plugin named 'nope' .*installed: ct2, paged, transformers"
    ):
        load_backend(ShardConfig(tiny_model_dir, backend="nope"), CPU)


def test_unsupported_models_are_named() -> None:
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match="gpt2"):
        model_spec(GPT2Config())


def test_a_long_prompt_joins_in_chunks_while_others_stream(paged: PagedBackend, tiny_model_dir: Path) -> None:
    hf = Engine(HFBackend(tiny_model_dir, CPU))
    short, long_prompt = list(range(3, 9)), [3 + (i * 7) % 200 for i in range(150)]
    expected_long = generate(hf, 1, long_prompt, 5)
    expected_short = generate(hf, 1, short, 40)
    engine = make_engine(paged)
    out: dict[int, list[int]] = {}
    engine.add([RequestSpec(1, short, max_new_tokens=40)])
    collect(out, engine.step())
    collect(out, engine.step())
    engine.add([RequestSpec(2, long_prompt, max_new_tokens=5, prefill_logprobs=True)])
    steps_until_first = 0
    prompt_logprobs = None
    while True:
        done = [rid for rid, n in ((1, 40), (2, 5)) if len(out.get(rid, [])) == n]
        engine.remove(done)
        if len(done) == 2:
            break
        result = engine.step()
        assert 1 in result.request_ids or len(out[1]) == 40  # the stream got a token at every step
        if 2 not in out:
            steps_until_first += 1
        prompt_logprobs = prompt_logprobs or next((p for p in result.prefill if p.request_id == 2), None)
        collect(out, result)
    assert out == {1: expected_short, 2: expected_long}
    assert steps_until_first > 1  # the prompt ran in chunks, beside the stream
    hf.add([RequestSpec(7, long_prompt, prefill_logprobs=True)])
    reference = hf.step().prefill[0]
    assert prompt_logprobs is not None
    assert torch.allclose(
        torch.tensor(prompt_logprobs.logprobs[1:]), torch.tensor(reference.logprobs[1:]), atol=1e-4
    )
    engine.clear()
    assert free_blocks(paged) == paged.cache.allocator.num_blocks


def test_unwritten_cache_memory_never_leaks_into_attention(tiny_model_dir: Path) -> None:
    """Blocks may hold NaN left by an earlier owner; masked slots must not turn them into NaN outputs."""
    backend = PagedBackend(tiny_model_dir, CPU, kv_cache_bytes=2 * 2**20, block_size=16)
    null = backend.cache.null_block * 16
    backend.cache.k[:, :null].fill_(float("nan"))  # as a request with NaN K/V would leave its blocks
    backend.cache.v[:, :null].fill_(float("nan"))
    engine = make_engine(backend)
    engine.add([RequestSpec(1, list(range(3, 8))), RequestSpec(2, list(range(3, 30)))])
    assert engine.step().failures == []
    for _ in range(4):
        result = engine.step()
        assert result.failures == [] and len(result.token_ids) == 2


def test_step_costs_size_chunks_to_about_one_decode_step() -> None:
    costs = StepCosts(free_tokens=16)
    assert costs.budget(0) is None  # nobody decoding: no limit
    assert costs.budget(4) == 28  # nothing learnt yet: the token-count rule
    costs.observe(0.050, decoding=8, prompt_tokens=0)  # a decode step: 50 ms
    costs.observe(0.150, decoding=8, prompt_tokens=100)  # 100 prompt tokens added 100 ms: 1 ms each
    assert costs.budget(8) == 50  # 50 more tokens ~ one more decode step: about twice the step
    assert costs.budget(8, waiting=8) == 50  # as many waiting as running: the same
    assert costs.budget(8, waiting=32) == 200  # four times as many wait: four times the budget
    assert costs.budget(8, waiting=1000) == 400  # at most eight times
    costs.observe(0.001, decoding=8, prompt_tokens=0)
    assert costs.budget(8) >= 16  # never below the floor


def test_step_costs_follow_decodes_that_grow_dearer_under_steady_chunks() -> None:
    """Under load every step carries a chunk while contexts lengthen: the decodes' growing cost must not
    be charged to the prompt tokens (it shrank the budget to its floor and queued arriving users)."""
    costs = StepCosts(free_tokens=16)
    costs.observe(1.0, decoding=0, prompt_tokens=1000)  # the warm-up's prefill: 1 ms a prompt token
    costs.observe(0.050, decoding=8, prompt_tokens=0)  # one plain decode step while contexts are short
    for step in range(200):  # then never a step without a chunk, and decodes grow to 400 ms
        decode = 0.050 + 0.350 * min(step / 100, 1.0)
        costs.observe(decode + 0.001 * 16, decoding=40, prompt_tokens=16)
    assert costs.budget(40) == pytest.approx(400, rel=0.05)  # a chunk as dear as the decodes: 400 tokens
