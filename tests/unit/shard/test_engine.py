"""The shard's engine on a tiny random Llama, on every backend: continuous batching must not change
anyone's tokens, and every backend gives the tokens transformers' own ``generate`` gives."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from shard.backends.base import Backend
from shard.backends.hf import HFBackend
from shard.backends.paged import PagedBackend
from shard.engine import Engine, StepEngine
from shard.engines import make_engine
from shard.types import RequestSpec, SamplingParams
from tests.engine_run import run_engine

pytestmark = pytest.mark.timeout(120)

TEXTS = [
    "Hello world",
    "The capital of France is",
    "def add(a, b):",
    "café 🤗 東京",
    "Continuous batching lets",
]


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path) -> HFBackend:
    return HFBackend(tiny_model_dir, torch.device("cpu"))


@pytest.fixture(scope="module", params=["transformers", "paged"])
def backend(request: pytest.FixtureRequest, tiny_model_dir: Path, hf: HFBackend) -> Backend:
    if request.param == "transformers":
        return hf
    return PagedBackend(tiny_model_dir, torch.device("cpu"), kv_cache_bytes=8 * 2**20)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [tokenizer.encode(t) for t in TEXTS]


def run_alone(
    engine: StepEngine, ids: list[int], steps: int, params: SamplingParams | None = None
) -> list[int]:
    spec = RequestSpec(7, ids, params or SamplingParams(), max_new_tokens=steps)
    return run_engine(engine, {0: [spec]})[7]


def test_greedy_matches_transformers_generate(
    backend: Backend, hf: HFBackend, prompts: list[list[int]]
) -> None:
    engine = make_engine(backend)
    for ids in prompts:
        expected = hf.model.generate(
            torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False
        )[0, len(ids) :]
        assert run_alone(engine, ids, 12) == expected.tolist()


def test_requests_join_and_leave_without_changing_tokens(backend: Backend, prompts: list[list[int]]) -> None:
    engine = make_engine(backend)
    steps = {0: 12, 1: 5, 2: 9, 3: 12, 4: 3}
    seeded = SamplingParams(do_sample=True, temperature=0.8, top_k=20, seed=99)
    params = {i: (seeded if i == 3 else SamplingParams()) for i in steps}
    alone = {i: run_alone(engine, prompts[i], n, params[i]) for i, n in steps.items()}

    def spec(i: int) -> RequestSpec:
        return RequestSpec(i, prompts[i], params[i], max_new_tokens=steps[i])

    # 2 and 3 join a running batch; 4 joins after others have left.
    out = run_engine(engine, {0: [spec(0), spec(1)], 2: [spec(2), spec(3)], 7: [spec(4)]})
    assert out == alone


def test_leaving_trims_the_cache(hf: HFBackend, prompts: list[list[int]]) -> None:
    engine = Engine(hf)
    long_prompt = prompts[3] * 4
    engine.add([RequestSpec(1, long_prompt), RequestSpec(2, prompts[0])])
    engine.step()
    engine.step()
    engine.remove([1])
    engine.step()
    assert engine.batch is not None
    state = engine.batch.state
    # Only the short request's slots remain: its prompt, plus two generated tokens fed back.
    assert state.attention_mask.shape[1] == len(prompts[0]) + 2
    assert state.cache.layers[0].keys.shape[2] == len(prompts[0]) + 2


def test_prompt_logprobs_match_the_model(backend: Backend, hf: HFBackend, prompts: list[list[int]]) -> None:
    engine = make_engine(backend)
    ids = prompts[1]
    engine.add([RequestSpec(1, ids, prefill_logprobs=True), RequestSpec(2, prompts[0])])
    result = engine.step()
    assert [p.request_id for p in result.prefill] == [1]
    logits = hf.model(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    got = result.prefill[0].logprobs
    assert math.isnan(got[0])
    assert torch.allclose(torch.tensor(got[1:]), expected, atol=1e-4)


def test_top_n_tokens(backend: Backend, prompts: list[list[int]]) -> None:
    engine = make_engine(backend)
    engine.add([RequestSpec(1, prompts[0], top_n_tokens=3), RequestSpec(2, prompts[1])])
    result = engine.step()
    assert result.top_n == 3
    first = result.top_ids[:3]
    assert first[0] == result.token_ids[0]
    assert result.top_logprobs[:3] == sorted(result.top_logprobs[:3], reverse=True)


def test_removed_requests_leave_with_their_memory(backend: Backend, prompts: list[list[int]]) -> None:
    engine = make_engine(backend)
    before = engine.stats()
    engine.add([RequestSpec(1, prompts[0], max_new_tokens=50), RequestSpec(2, prompts[1], max_new_tokens=50)])
    engine.step()
    engine.step()
    engine.remove([1, 99])  # an id it does not hold is ignored
    result = engine.step()
    assert result.request_ids == [2]
    engine.remove([2])
    assert engine.step().request_ids == []
    after = engine.stats()
    if before is not None and after is not None:  # the paged pool: every block is back
        assert after["tokens_used"] == before["tokens_used"]
    engine.clear()
