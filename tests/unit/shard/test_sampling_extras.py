"""Sampler features the OpenAI API needs: logit_bias, min_p, min_tokens; and shared prefill for n."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shard.backends.hf import HFBackend
from shard.engine import Engine
from shard.sampling import Sampler, TokenHistory
from shard.types import RequestSpec, SamplingParams
from tests.engine_run import collect, run_engine

pytestmark = pytest.mark.timeout(60)


def history(rows: int) -> TokenHistory:
    return TokenHistory.from_prompts([[1, 2]] * rows, [4] * rows, torch.device("cpu"))


def test_logit_bias_moves_greedy_choice() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0, 0.0], [5.0, 1.0, 0.0, 0.0]])
    sampler = Sampler(
        [SamplingParams(logit_bias=((2, 10.0),)), SamplingParams()], [0, 0], torch.device("cpu")
    )
    assert sampler.choose(logits, history(2)).ids.tolist() == [2, 0]
    banned = Sampler([SamplingParams(logit_bias=((0, -100.0),))], [0], torch.device("cpu"))
    assert banned.choose(logits[:1], history(1)).ids.tolist() == [1]


def test_min_p_drops_unlikely_tokens() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    sampler = Sampler([SamplingParams(min_p=0.2, do_sample=True, seed=1)], [4], torch.device("cpu"))
    choice = sampler.choose(logits, history(1))
    probs = choice.top_logprobs.exp()[0]
    assert choice.top_ids[0, :2].tolist() == [0, 1]
    assert probs[2:].sum() == 0  # 0.05 < 0.2 * 0.6
    assert torch.allclose(probs[:2], torch.tensor([2 / 3, 1 / 3]), atol=1e-5)


def test_min_tokens_masks_end_ids_until_reached() -> None:
    logits = torch.tensor([[0.0, 9.0, 1.0, 0.0]])  # token 1 (the end id) is the favourite
    sampler = Sampler([SamplingParams()], [0], torch.device("cpu"), [2], [(1, 3)])
    h = history(1)
    picks = [sampler.choose(logits, h).ids.item() for _ in range(3)]
    assert picks == [2, 2, 1]  # masked for two steps, then free


def test_min_tokens_masks_each_rows_own_end_ids() -> None:
    logits = torch.tensor([[0.0, 9.0, 8.0, 7.0], [0.0, 9.0, 8.0, 7.0], [0.0, 9.0, 8.0, 7.0]])
    before = logits.clone()
    # row 0: ends on 1 or 2, for two steps; row 1: no minimum; row 2: ends on 1, for one step
    sampler = Sampler([SamplingParams()] * 3, [0] * 3, torch.device("cpu"), [2, 0, 1], [(1, 2), (1,), (1,)])
    h = history(3)
    picks = [sampler.choose(logits, h).ids.tolist() for _ in range(3)]
    assert picks == [[3, 1, 2], [3, 1, 1], [1, 1, 1]]
    assert torch.equal(logits, before)  # the caller's logits are never changed


def test_n_samples_share_one_prefill(tiny_model_dir: Path) -> None:
    backend = HFBackend(tiny_model_dir, torch.device("cpu"))
    calls: list[int] = []
    original = backend.prefill

    def counting(prompts, want):
        calls.append(len(prompts))
        return original(prompts, want)

    backend.prefill = counting  # type: ignore[method-assign]
    engine = Engine(backend)
    params = [SamplingParams(do_sample=True, seed=s) for s in (1, 2, 3)]
    requests = [RequestSpec(i, [5, 6, 7, 8], params[i], 6) for i in range(3)]
    requests.append(RequestSpec(9, [9, 10], SamplingParams(), 6, prefill_logprobs=True))
    assert engine.add(requests) == []
    result = engine.step()
    assert calls == [2]  # two distinct prompts, one forward each
    assert [p.request_id for p in result.prefill] == [9]
    shared: dict[int, list[int]] = {}
    collect(shared, result)
    for _ in range(4):
        collect(shared, engine.step())
    assert {rid: len(tokens) for rid, tokens in shared.items()} == {0: 5, 1: 5, 2: 5, 9: 5}
    engine.clear()
    # each copy decodes on its own: the same tokens as the same seed alone
    for i in range(3):
        lone = run_engine(engine, {0: [RequestSpec(i, [5, 6, 7, 8], params[i], 6)]})[i][:5]
        assert lone == shared[i]
