"""Mistral and Qwen2 sliding windows on the paged backend (issue 19): each layer's window as transformers
applies it, and the blocks every layer's window has passed given back to the pool, so a long sequence's
KV memory stays bounded, with greedy ids still equal to transformers' ``generate`` (chunked prompts,
prefix-cache hits, preemption, speculation's truncation, two tensor-parallel ranks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shard.backends.paged import PagedBackend
from shard.engines import make_engine
from shard.paged.arch import model_spec
from shard.paged.attention import Scores, attend, decode_meta
from shard.paged.kv_cache import PagedKVCache, Sequence, block_hash
from shard.paged.model import UnsupportedModelError
from shard.scheduler import Scheduler
from shard.types import RequestSpec
from tests.engine_run import collect, run_engine
from tests.unit.shard.paged import test_architectures as architectures
from tests.unit.shard.paged.test_architectures import NO_SPECIAL, TINY, build, reference
from tests.unit.shard.test_scheduler import FakePool, FakeWork, add, run

pytestmark = pytest.mark.timeout(300)

CPU = torch.device("cpu")
WINDOW = 8
BS = 4
# The most blocks a sequence holds once it slides: those one window and the token it runs touch.
HELD = -(-(WINDOW - 1) // BS) + 1


def mistral_config(vocab: int, window: int = WINDOW) -> Any:
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=vocab,
        num_hidden_layers=2,
        max_position_embeddings=512,
        sliding_window=window,
        tie_word_embeddings=False,
        **TINY,
        **NO_SPECIAL,
    )


def qwen2_config(vocab: int, max_window_layers: int = 1, window: int = WINDOW) -> Any:
    """Layers from ``max_window_layers`` on slide (transformers' Qwen2 rule); 1 of 3: a global layer
    first, so nothing leaves the cache; 0: every layer slides."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab,
        num_hidden_layers=3,
        max_position_embeddings=512,
        use_sliding_window=True,
        sliding_window=window,
        max_window_layers=max_window_layers,
        tie_word_embeddings=False,
        **TINY,
        **NO_SPECIAL,
    )


def qwen2_all_sliding(vocab: int) -> Any:
    return qwen2_config(vocab, max_window_layers=0)


# -- which layers get the window ------------------------------------------------------------------


def test_mistral_windows_every_layer_and_qwen2_the_layers_from_max_window_layers() -> None:
    from transformers import MistralConfig, Qwen2Config

    spec = model_spec(mistral_config(100))
    assert [layer.sliding_window for layer in spec.layers] == [WINDOW, WINDOW]
    assert spec.kv_window == WINDOW and not spec.kernel_layers
    spec = model_spec(qwen2_config(100))
    assert [layer.sliding_window for layer in spec.layers] == [None, WINDOW, WINDOW]
    assert spec.kv_window is None  # layer 0 reads every key: nothing leaves the cache
    assert model_spec(qwen2_all_sliding(100)).kv_window == WINDOW
    # No window: Mistral's null, Qwen2's use_sliding_window off, a window as long as the context.
    assert model_spec(MistralConfig(sliding_window=None)).kv_window is None
    off = model_spec(Qwen2Config(sliding_window=16, use_sliding_window=False, max_window_layers=0))
    assert all(layer.sliding_window is None for layer in off.layers)
    long = model_spec(MistralConfig(sliding_window=64, max_position_embeddings=64))
    assert long.kv_window is None and long.kernel_layers


def test_qwen2_layer_types_outside_the_two_kinds_are_refused_by_name() -> None:
    from transformers import Qwen2Config

    config = Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=8)
    config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(UnsupportedModelError, match="chunked_attention"):
        model_spec(config)


# -- the cache alone -------------------------------------------------------------------------------


def cache(blocks: int, window: int | None = WINDOW) -> PagedKVCache:
    return PagedKVCache(1, blocks, BS, 1, 4, torch.float32, CPU, window)


def grow(kv: PagedKVCache, seq: Sequence, tokens: int) -> None:
    """``tokens`` more tokens computed, as a step leaves them: blocks reserved, full ones sealed; then the
    window slides as the scheduler makes it before the next step."""
    seq.tokens += [7] * tokens
    kv.reserve(seq, len(seq.tokens))
    seq.computed = len(seq.tokens)
    kv.seal(seq)
    kv.slide(seq)


def test_blocks_behind_the_window_go_back_and_none_a_query_reads() -> None:
    kv = cache(8)
    seq = kv.open([1, 2, 3], use_prefix_cache=True)
    held = []
    for _ in range(200):
        grow(kv, seq, 1)
        # The next query (position computed) reads keys from computed - WINDOW + 1 on: all still held.
        first_read = max(seq.computed - WINDOW + 1, 0)
        assert seq.dropped * BS <= first_read
        assert all(b != kv.null_block and kv.allocator.refs[b] == 1 for b in seq.blocks[seq.dropped :])
        assert seq.blocks[: seq.dropped] == [kv.null_block] * seq.dropped
        # Every block wholly before it is back in the pool.
        assert seq.dropped == first_read // BS
        held.append(kv.tokens_in_use() // BS)
    assert max(held) <= HELD
    assert len(seq.blocks) == -(-len(seq.tokens) // BS)  # the table keeps every position
    assert len(seq.hashes) == seq.computed // BS
    kv.release(seq)
    assert kv.allocator.num_free == 8


def test_without_a_window_nothing_leaves_a_live_sequence() -> None:
    kv = cache(64, window=None)
    seq = kv.open([1, 2, 3], use_prefix_cache=True)
    grow(kv, seq, 100)
    assert seq.dropped == 0 and kv.tokens_in_use() == len(seq.blocks) * BS


def test_a_prefix_hit_takes_the_window_it_needs_even_when_earlier_blocks_were_evicted() -> None:
    kv = cache(16)
    prompt = [3 + i % 50 for i in range(64)]
    seq = Sequence(list(prompt))
    for _ in range(64 // BS):  # in chunks of a block, each step sliding
        kv.reserve(seq, seq.computed + BS)
        seq.computed += BS
        kv.seal(seq)
        kv.slide(seq)
    kv.release(seq)
    # Evict the least recently used cached blocks: the conversation's first ones (released first).
    taken = [kv.allocator.allocate() for _ in range(kv.allocator.num_free - 4)]
    assert len(kv.allocator.evictable) == 4
    hits = kv.allocator.hits
    again = kv.open([*prompt, 9, 9], use_prefix_cache=True)
    # Its 16 full blocks, short of the last token: 64 tokens computed, though blocks 0..11 are gone.
    assert again.computed == 64 and again.dropped == kv.kept_from(64)
    assert kv.allocator.hits - hits == 16
    assert all(kv.allocator.refs[b] == 1 for b in again.blocks[again.dropped :])
    # Without a window the same cache finds nothing (its first block is gone).
    plain = PagedKVCache(1, 16, BS, 1, 4, torch.float32, CPU)
    plain.allocator = kv.allocator
    kv.release(again)
    assert plain.open([*prompt, 9, 9], use_prefix_cache=True).computed == 0
    for block in taken:
        kv.allocator.release(block)


def test_truncating_drafts_keeps_what_the_window_holds() -> None:
    """Speculation cuts rejected drafts off after a step; the window slid at the step's start, so what
    is cut is never below it (``truncate`` refuses to cut a dropped block)."""
    kv = cache(16)
    seq = kv.open([1], use_prefix_cache=False)
    grow(kv, seq, 40)
    start = seq.computed
    seq.tokens += [5] * 9  # the next token and 8 drafts
    kv.reserve(seq, len(seq.tokens))
    seq.computed = len(seq.tokens)
    kv.truncate(seq, start + 2)  # one draft accepted
    kv.seal(seq)
    kv.slide(seq)
    assert seq.computed == start + 2 and len(seq.blocks) == -(-(start + 2) // BS)
    assert seq.dropped == kv.kept_from(start + 2)
    assert kv.tokens_in_use() == (len(seq.blocks) - seq.dropped) * BS
    with pytest.raises(AssertionError, match="cannot be truncated"):
        kv.truncate(seq, 0)


def test_slots_refuse_a_block_the_window_has_passed() -> None:
    kv = cache(8)
    seq = kv.open([1], use_prefix_cache=False)
    for _ in range(40):
        grow(kv, seq, 1)
    with pytest.raises(ValueError, match="window has passed"):
        kv.slots(seq, 0, seq.computed)


def test_decode_attention_from_the_first_kept_block_equals_the_whole_table() -> None:
    """A decode row whose first 4 blocks were given back attends from its 5th (``starts``) exactly as over
    its whole table with the null block in their place (masked by the window), beside a row without."""
    torch.manual_seed(0)
    kv_heads, d, null = 2, 8, 12
    k_pool, v_pool = torch.randn(2, (null + 1) * BS, kv_heads, d)
    k_pool[null * BS :] = 0
    v_pool[null * BS :] = 0
    q = torch.randn(2, 4, d)
    lengths = torch.tensor([30, 11])
    scores = Scores(window=12)  # row 0 sees positions 18..29: all past its 4 given-back blocks
    whole = [[null] * 4 + [0, 1, 2, 3], [4, 5, 6, null, null, null, null, null]]
    _, meta = decode_meta(torch.tensor(whole), lengths, BS, 30)
    want = attend(q, k_pool, v_pool, meta, scores)
    kept = [[0, 1, 2, 3], [4, 5, 6, null]]
    _, rel = decode_meta(torch.tensor(kept), lengths, BS, 14, torch.tensor([16, 0]))
    assert torch.equal(rel.write_slots, meta.write_slots)
    torch.testing.assert_close(attend(q, k_pool, v_pool, rel, scores), want)


# -- the scheduler ---------------------------------------------------------------------------------


def test_a_prompt_longer_than_the_pool_runs_in_chunks_as_the_window_slides() -> None:
    """A pool of 4 blocks (16 tokens) and a 30-token prompt: each step first gives back what the window
    passed, so the prompt runs in chunks the free blocks hold and then decodes on, holding at most a
    window's blocks. Without a window it can never fit, and fails."""
    pool = FakePool(4, window=WINDOW)
    s: Scheduler[FakeWork] = Scheduler(pool, 4)
    work = add(s, "a", 30, group=1)
    chunks = []
    for _ in range(40):
        plan = s.schedule(None)
        assert not plan.failed and not plan.preempted
        chunks += [take for w, take in plan.chunks if w is work]
        decoding = work.running
        run(s, plan)
        assert work.blocks - work.dropped + pool.free == 4
        if decoding:  # a decode step: its window's blocks and the token it ran
            assert work.blocks - work.dropped <= HELD
    assert chunks == [16, 8, 6] and work.running and work.computed == 30 + 40 - len(chunks)
    plain = FakePool(4)
    s = Scheduler(plain, 4)
    add(s, "a", 30, group=1)
    assert [w.name for w in s.schedule(None).failed] == ["a"]


def test_work_fails_only_when_one_window_is_more_than_the_pool() -> None:
    pool = FakePool(2, window=WINDOW)  # a window of 8 tokens and the next one touch 3 blocks of 4
    s: Scheduler[FakeWork] = Scheduler(pool, 2)
    add(s, "a", 30, group=1)
    assert [w.name for w in s.schedule(None).failed] == ["a"]
    s = Scheduler(FakePool(2, window=WINDOW), 2)
    add(s, "b", 8, group=1)  # its 8 tokens fit 2 blocks
    assert not s.schedule(None).failed


# -- through the engine, against transformers ------------------------------------------------------


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    return build(tmp_path_factory.mktemp("mistral"), tiny_model_dir, mistral_config)


def long_prompts() -> list[list[int]]:
    """A 45-token prompt (several windows, run in chunks), one sharing its first 40 tokens (prefix-cache
    hits), and a short one."""
    long_prompt = [3 + (i * 7) % 250 for i in range(45)]
    return [long_prompt, [*long_prompt[:40], 17, 23, 99], list(range(3, 12))]


def run_bounded(
    backend: PagedBackend, prompts: list[list[int]], new_tokens: int
) -> tuple[list[list[int]], int]:
    """Each prompt through the chunked engine (16 prompt tokens a step), one after another; returns the
    tokens and the most KV tokens in use after any step."""
    engine = make_engine(backend, prefill_tokens=16)
    out: list[list[int]] = []
    peak = 0
    for i, prompt in enumerate(prompts):
        tokens: dict[int, list[int]] = {}
        engine.add([RequestSpec(i, prompt, max_new_tokens=new_tokens, ignore_eos=True)])
        while len(tokens.get(i, [])) < new_tokens:
            result = engine.step()
            assert not result.failures, result.failures
            collect(tokens, result)
            peak = max(peak, backend.cache.tokens_in_use())
        engine.remove([i])
        out.append(tokens[i])
    engine.clear()
    return out, peak


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_mistral_greedy_ids_equal_transformers_with_bounded_kv(mistral_dir: Path, cpu_kernels: bool) -> None:
    asked = long_prompts()
    new_tokens = 120
    expected = reference(mistral_dir, asked, new_tokens)
    backend = PagedBackend(mistral_dir, CPU, kv_cache_bytes=2**20, block_size=BS, cpu_kernels=cpu_kernels)
    assert backend.cache.window == WINDOW
    hits = backend.cache.allocator.hits
    got, peak = run_bounded(backend, asked, new_tokens)
    assert got == expected
    assert backend.cache.allocator.hits - hits >= 10  # the second prompt's shared prefix
    # One sequence at a time: its window's blocks, and a prompt chunk's (16 tokens) while it runs.
    assert peak <= (HELD + 16 // BS) * BS < len(asked[0]) + new_tokens
    assert backend.cache.allocator.num_free == backend.cache.allocator.num_blocks


@pytest.mark.parametrize("make_config", [qwen2_config, qwen2_all_sliding], ids=["mixed", "all-sliding"])
def test_qwen2_greedy_ids_equal_transformers(tiny_model_dir: Path, tmp_path: Path, make_config: Any) -> None:
    path = build(tmp_path / "qwen2", tiny_model_dir, make_config)
    asked = long_prompts()
    expected = reference(path, asked, 60)
    backend = PagedBackend(path, CPU, kv_cache_bytes=2**20, block_size=BS)
    got, peak = run_bounded(backend, asked, 60)
    assert got == expected
    if backend.spec.kv_window is None:  # a global layer: the whole sequence stays (its last token unfed)
        assert peak >= len(asked[0]) + 60 - 1
    else:
        assert peak <= (HELD + 16 // BS) * BS


def test_a_sequence_longer_than_the_pool_runs_and_a_hit_past_evicted_blocks_is_right(
    mistral_dir: Path,
) -> None:
    """A pool of 12 blocks (48 tokens): a 45-token prompt and 60 new tokens go through it by sliding;
    sent again with more tokens, the prompt's first blocks have been evicted and its last ones are found,
    and the continuation is still transformers'."""
    prompt = [3 + (i * 7) % 250 for i in range(45)]
    backend = PagedBackend(mistral_dir, CPU, kv_cache_tokens=48, block_size=BS)
    first, _ = run_bounded(backend, [prompt], 60)  # 105 tokens through a pool of 48
    longer = [*prompt, *first[0][:50]]
    assert block_hash(None, tuple(longer[:BS])) not in backend.cache.allocator.by_hash  # evicted
    hits = backend.cache.allocator.hits
    second, _ = run_bounded(backend, [longer], 40)
    assert backend.cache.allocator.hits - hits >= 20  # of its 23 full blocks: found past the evicted ones
    assert first == reference(mistral_dir, [prompt], 60)
    assert second == reference(mistral_dir, [longer], 40)


def test_preemption_and_speculation_keep_transformers_ids(mistral_dir: Path) -> None:
    """Two long requests side by side in a pool that cannot hold both windows and their chunks: the one
    of lower priority is preempted and recomputes (from the prefix cache where it can). Repetitive prompts
    make the n-gram drafter feed drafts, which the windowed sequences truncate."""
    prompts = [[5, 6, 7, 8] * 10, [9, 10, 11, 12, 13] * 8]
    expected = reference(mistral_dir, prompts, 80)
    backend = PagedBackend(mistral_dir, CPU, kv_cache_tokens=5 * BS, block_size=BS)
    engine = make_engine(backend, prefill_tokens=16)
    specs = [RequestSpec(i, p, max_new_tokens=80, ignore_eos=True) for i, p in enumerate(prompts)]
    out = run_engine(engine, {0: specs})
    assert [out[0], out[1]] == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.drafted > 0
    assert backend.cache.allocator.num_free == backend.cache.allocator.num_blocks


def test_two_ranks_slide_alike_and_equal_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two tensor-parallel ranks free the same blocks (the decision follows token counts only) and give
    one rank's tokens: the architectures' two-rank test on the windowed Mistral (a 30-token prompt, 40
    new tokens, an 8-token window)."""
    architectures.test_two_ranks_equal_one(tiny_model_dir, tmp_path, mistral_config)
