"""Logits processors on the shard (shard/processors/): the chain's contract through the real engine on
both backends, and the built-in watermark with its detector."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from shard.backends.base import Backend
from shard.backends.paged import PagedBackend
from shard.engine import StepEngine
from shard.engines import make_engine
from shard.processors import (
    LogitsProcessor,
    ProcessorArgumentError,
    ProcessorContext,
    Processors,
    load_processors,
)
from shard.processors.watermark import Watermark, detect, is_green
from shard.types import RequestSpec, SamplingParams
from tests.engine_run import collect, run_engine

pytestmark = pytest.mark.timeout(120)


class BanFirstChoice(LogitsProcessor):
    """Test processor: bans the token ids given as its argument (comma-separated) and records every
    token its rows chose, so the test can check states travel with their rows."""

    name = "ban"
    order = 10

    def new_state(self, argument: str | None, prompt_ids: list[int]) -> Any:
        if argument is None or not argument.replace(",", "").isdigit():
            raise ProcessorArgumentError("`ban` wants comma-separated token ids")
        return {"banned": [int(x) for x in argument.split(",")], "seen": []}

    def apply(self, scores: torch.Tensor, states: list[Any], last_ids: torch.Tensor) -> torch.Tensor:
        for row, state in enumerate(states):
            scores[row, state["banned"]] = float("-inf")
        return scores

    def advance(self, states: list[Any], ids: list[int]) -> None:
        for state, token in zip(states, ids, strict=True):
            state["seen"].append(token)


@pytest.fixture(scope="module", params=["transformers", "paged"])
def backend(request: pytest.FixtureRequest, tiny_model_dir: Path) -> Backend:
    if request.param == "transformers":
        from shard.backends.hf import HFBackend

        return HFBackend(tiny_model_dir, torch.device("cpu"))
    return PagedBackend(tiny_model_dir, torch.device("cpu"), kv_cache_bytes=8 * 2**20)


def generate(engine: StepEngine, specs: list[RequestSpec], steps: int) -> dict[int, list[int]]:
    engine.clear()
    out = run_engine(engine, {0: [replace(s, max_new_tokens=steps) for s in specs]})
    engine.clear()
    return out


def spec(rid: int, processors: tuple[tuple[str, str], ...] = (), **params: Any) -> RequestSpec:
    return RequestSpec(rid, [1, 5, 9, 13, 2 + rid], SamplingParams(processors=processors, **params), 64)


def test_a_processor_changes_only_the_rows_that_use_it(backend: Backend) -> None:
    processor = BanFirstChoice()
    engine = make_engine(backend, processors=Processors([processor]))
    plain = generate(engine, [spec(1), spec(2)], 8)
    banned = ",".join(str(t) for t in sorted(set(plain[2])))
    mixed = generate(engine, [spec(1), spec(2, (("ban", banned),))], 8)
    assert mixed[1] == plain[1]  # the batch-mate is untouched
    assert not set(mixed[2]) & set(plain[2])


def test_states_follow_their_rows_when_requests_leave_and_join(backend: Backend) -> None:
    processor = BanFirstChoice()
    seen: dict[int, dict[str, Any]] = {}  # by request id (the last state made for it is the row's)
    original = processor.new_state

    def record(argument: str | None, prompt_ids: list[int]) -> Any:
        seen[prompt_ids[-1] - 2] = original(argument, prompt_ids)
        return seen[prompt_ids[-1] - 2]

    processor.new_state = record  # type: ignore[method-assign]
    engine = make_engine(backend, processors=Processors([processor]))
    tokens: dict[int, list[int]] = {}
    engine.add([spec(1, (("ban", "3"),)), spec(2), spec(3, (("ban", "4"),))])
    collect(tokens, engine.step())  # first tokens
    collect(tokens, engine.step())
    engine.remove([1, 2])  # 1 and 2 leave
    collect(tokens, engine.step())
    engine.add([spec(4, (("ban", "5"),))])  # joins the running batch (paged: its prompt runs beside 3)
    for _ in range(3):
        collect(tokens, engine.step())
    engine.clear()
    first, third, fourth = seen[1], seen[3], seen[4]
    assert first["seen"] == tokens[1] and len(tokens[1]) == 2  # prefill + one decode, then it left
    assert third["seen"] == tokens[3] and len(tokens[3]) == 6
    assert fourth["seen"] == tokens[4] and len(tokens[4]) >= 3
    assert 4 not in third["seen"] and 5 not in fourth["seen"]


def test_unknown_processor_or_bad_argument_is_an_error() -> None:
    processors = Processors([BanFirstChoice()])
    with pytest.raises(ProcessorArgumentError, match="no logits processor `nope`"):
        processors.new_states({"nope": ""}, [1])
    with pytest.raises(ProcessorArgumentError, match="comma-separated"):
        processors.new_states({"ban": "x"}, [1])
    with pytest.raises(ValueError, match="no logits processor named 'other'"):
        Processors([BanFirstChoice()], always=("other",))


def test_builtin_processors_load_from_their_entry_points(tiny_model_dir: Path) -> None:
    context = ProcessorContext(tiny_model_dir, 128, (2,), torch.device("cpu"), {"watermark_gamma": 0.25})
    processors = load_processors((), context)
    assert processors.names[0] == "watermark" and "grammar" in processors.names
    assert processors.always == ()
    assert processors.by_name["watermark"].gamma == 0.25  # type: ignore[attr-defined]


def test_green_lists_split_the_vocabulary_by_gamma() -> None:
    vocab = torch.arange(50_000)
    for gamma in (0.25, 0.5):
        fractions = [float(is_green(torch.tensor(p), vocab, gamma).float().mean()) for p in (0, 7, 1234)]
        assert all(abs(f - gamma) < 0.01 for f in fractions)
    a, b = is_green(torch.tensor(7), vocab, 0.5), is_green(torch.tensor(8), vocab, 0.5)
    assert 0.45 < float((a == b).float().mean()) < 0.55  # each previous token draws its own list


def test_watermarked_text_is_detected_and_plain_text_is_not(backend: Backend, tiny_model_dir: Path) -> None:
    watermark = Watermark()
    context = ProcessorContext(tiny_model_dir, backend.info.vocab_size, (), torch.device("cpu"), {})
    watermark.setup(context)
    engine = make_engine(backend, processors=Processors([watermark]))
    specs = [spec(1, do_sample=True, seed=11), spec(2, (("watermark", ""),), do_sample=True, seed=11)]
    out = generate(engine, specs, 120)
    plain, marked = detect(out[1], prompt_last_id=3), detect(out[2], prompt_last_id=3)
    assert marked.watermarked and marked.z_score > 4, marked
    assert not plain.watermarked and abs(plain.z_score) < 3, plain
    assert marked.green_fraction > 0.7


def test_detector_rejects_too_little_text() -> None:
    with pytest.raises(ValueError, match="at least one"):
        detect([5])
    assert detect(list(range(200))).scored_tokens == 199


def test_a_refused_argument_fails_its_request_alone(backend: Backend) -> None:
    engine = make_engine(backend, processors=Processors([BanFirstChoice()]))
    alone = generate(engine, [spec(1)], 3)
    refused = engine.add([spec(1), spec(2, (("ban", "not-ids"),))])
    assert [f.request_id for f in refused] == [2] and "comma-separated" in refused[0].message
    tokens: list[int] = []
    for _ in range(3):
        step = engine.step()
        assert step.request_ids == [1] and not step.failures
        tokens += step.token_ids
    assert tokens == alone[1]
    assert engine.batch is not None and engine.batch.request_ids == [1]
    engine.clear()
