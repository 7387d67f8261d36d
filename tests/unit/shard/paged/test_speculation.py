"""Speculative decoding by n-gram lookup (shard/speculation.py) in the paged engine: the output is what
decoding without speculation gives, token for token, greedy or seeded, alone or in a batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shard.backends.paged import PagedBackend
from shard.chunked import ChunkedEngine, StepCosts
from shard.core import EngineCore
from shard.engines import make_engine
from shard.speculation import Acceptance, NgramIndex, pays
from shard.types import RequestSpec, SamplingParams
from tests.engine_run import run_engine

CPU = "cpu"


class FixedCosts(StepCosts):
    """Step costs that say a step's decodes cost as much as ``step_tokens`` prompt tokens, whatever the
    timings (the engine's drafting policy is tested on its own below; here drafting must happen)."""

    def __init__(self, step_tokens: int) -> None:
        super().__init__(free_tokens=16)
        self.decode_s, self.token_s = step_tokens * 1e-3, 1e-3

    def observe(self, seconds: float, decoding: int, prompt_tokens: int) -> None:
        pass


def engine(model: Path, speculate: int) -> ChunkedEngine:
    backend = PagedBackend(model, torch.device(CPU), kv_cache_bytes=8 * 2**20, block_size=16)
    made = make_engine(backend, speculate=speculate)
    assert isinstance(made, ChunkedEngine)
    made.costs = FixedCosts(step_tokens=64)
    return made


# Prompts that repeat themselves, so that the text offers drafts from the first step.
PROMPTS = [
    [5, 6, 7, 8, 9] * 6,
    [11, 12, 13] * 9 + [40, 41],
    list(range(20, 44)) + list(range(20, 30)),
]


def requests(params: SamplingParams | None = None, max_new_tokens: int = 40) -> list[RequestSpec]:
    return [RequestSpec(i + 1, p, params or SamplingParams(), max_new_tokens) for i, p in enumerate(PROMPTS)]


def test_ngram_index_proposes_what_followed_the_latest_earlier_occurrence() -> None:
    index = NgramIndex([1, 2, 3, 4, 9, 2, 3, 5, 6, 2, 3])
    assert index.propose(3) == [5, 6, 2]  # "2 3" last seen before the end at 5, 6, 2, ...
    index.extend([5])
    assert index.propose(2) == [6, 2]  # the longer suffix "2 3 5" decides
    assert NgramIndex([1, 2, 3]).propose(4) == []  # nothing repeats
    assert NgramIndex([7, 7, 7]).propose(4) == [7]  # the suffix itself is never its own source


def test_drafting_pays_only_where_an_accepted_token_saves_more_than_it_costs() -> None:
    assert pays(0.5, rows=1, step_tokens=8)  # one stream: a step costs 8 prompt tokens' worth
    assert not pays(0.5, rows=32, step_tokens=40)  # a big batch spreads the step over its rows
    assert not pays(0.1, rows=1, step_tokens=8)  # a row whose drafts are rarely taken
    rate = Acceptance(0.1)
    for _ in range(100):
        rate.rest()
    assert rate.rate > 0.4  # it tries again later


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(do_sample=True, temperature=0.9,
                                                                     top_k=20, seed=7)])  # fmt: skip
def test_speculation_gives_the_tokens_plain_decoding_gives(
    tiny_model_dir: Path, params: SamplingParams
) -> None:
    plain = run_engine(engine(tiny_model_dir, speculate=0), {0: requests(params)})
    fast = engine(tiny_model_dir, speculate=4)
    drafted = run_engine(fast, {0: requests(params)[:1], 3: requests(params)[1:]})
    assert drafted == plain
    assert fast.drafted > 0 and fast.accepted > 0
    assert fast.stats()["speculative_accepted"] == fast.accepted
    # Every block is back in the pool (free, or cached for later prompts).
    allocator = fast.backend.cache.allocator
    assert allocator.num_free == allocator.num_blocks


@pytest.mark.parametrize("max_new_tokens", [40, 27])
def test_fewer_steps_than_tokens_and_never_past_max_new_tokens(
    tiny_model_dir: Path, max_new_tokens: int
) -> None:
    fast = engine(tiny_model_dir, speculate=4)
    fast.add([RequestSpec(1, PROMPTS[0], max_new_tokens=max_new_tokens)])
    tokens, steps = [], 0
    while len(tokens) < max_new_tokens:
        tokens += fast.step().token_ids
        steps += 1
    assert len(tokens) == max_new_tokens and steps < max_new_tokens - 2


def test_rows_after_a_stop_token_are_not_sent(tiny_model_dir: Path) -> None:
    """A draft the model accepts may hold a stop token: the core ends the request there and drops the
    step's later rows of it."""
    plain = run_engine(engine(tiny_model_dir, speculate=0), {0: requests()[:1]})[1]
    stop = plain[6]
    core = EngineCore(engine(tiny_model_dir, speculate=4))
    core.add([RequestSpec(1, PROMPTS[0], max_new_tokens=40, stop_token_ids=(stop,), ignore_eos=True)])
    out: list[int] = []
    while core.live:
        step = core.step()
        out += step.result.token_ids
    assert out == plain[: plain.index(stop) + 1]


def test_a_number_of_draft_tokens_is_refused_by_an_engine_that_cannot_draft(tiny_model_dir: Path) -> None:
    from shard.backends.hf import HFBackend
    from shard.config import ConfigError

    backend = HFBackend(tiny_model_dir, torch.device(CPU))
    with pytest.raises(
        ConfigError, match=r"`--speculate 3` needs the paged backend; this model is served by HFBackend"
    ):
        make_engine(backend, speculate=3)
    make_engine(backend, speculate=0)
    make_engine(backend)


def test_int8_and_int4_weights_do_not_draft_unless_asked(tiny_model_dir: Path) -> None:
    """Their int8 activation rounding could turn a drafted step's last-bit differences into other tokens,
    and whether a step drafts depends on timings: by default they do not draft, so seeds repeat."""
    backend = PagedBackend(
        tiny_model_dir, torch.device(CPU), kv_cache_bytes=2**20, block_size=16, quantize="int8"
    )
    assert isinstance(quiet := make_engine(backend), ChunkedEngine) and quiet.speculate == 0
    assert isinstance(asked := make_engine(backend, speculate=3), ChunkedEngine) and asked.speculate == 3
    plain = PagedBackend(tiny_model_dir, torch.device(CPU), kv_cache_bytes=2**20, block_size=16)
    assert isinstance(default := make_engine(plain), ChunkedEngine) and default.speculate == 8
