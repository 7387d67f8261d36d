"""The ``grammar`` logits processor (shard/processors/grammar.py) on scores directly and through the real
engine on a tiny random model, and the canonical argument (common/grammar.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from common import grammar
from shard.backends.paged import PagedBackend
from shard.engine import StepEngine
from shard.engines import make_engine
from shard.processors import ProcessorArgumentError, ProcessorContext, Processors
from shard.processors.grammar import Grammar, unpack_bitmask
from shard.types import RequestSpec, SamplingParams
from tests.engine_run import collect

jsonschema = pytest.importorskip("jsonschema")
pytestmark = pytest.mark.timeout(120)

EXTRA = 40  # the model's output is wider than the tokenizer's vocabulary by this many ids


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


@pytest.fixture(scope="module")
def eos(tokenizer: Any) -> int:
    return tokenizer.token_to_id("<|im_end|>")


@pytest.fixture(scope="module")
def processor(tiny_model_dir: Path, tokenizer: Any, eos: int) -> Grammar:
    p = Grammar()
    p.setup(ProcessorContext(tiny_model_dir, tokenizer.get_vocab_size() + EXTRA, (eos,), torch.device("cpu")))
    return p


def allowed(processor: Grammar, states: list[Any]) -> list[set[int]]:
    width = processor.vocab_size
    scores = torch.zeros((len(states), width))
    out = processor.apply(scores, states, torch.zeros(len(states), dtype=torch.long))
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in out]


def test_canonical_arguments_round_trip_and_keep_the_schema_key_order() -> None:
    schema = {"type": "object", "properties": {"z": {"type": "integer"}, "a": {"type": "string"}}}
    argument = grammar.canonical("json", schema)
    assert list(json.loads(argument)["value"]["properties"]) == ["z", "a"]
    assert grammar.parse(argument) == ("json", schema)
    assert grammar.parse(grammar.canonical("json_object")) == ("json_object", None)
    assert grammar.check(grammar.canonical("regex", r"\d+")) == ""
    assert "unclosed" in grammar.check(grammar.canonical("regex", "[a-"))
    assert "not" in grammar.check(grammar.canonical("json", {"not": {"type": "string"}}))
    for bad in ("nope", '{"type": "yaml"}', '{"type": "json", "value": 3}', '{"type": "regex"}'):
        with pytest.raises(grammar.GrammarError):
            grammar.parse(bad)


def test_the_mask_allows_only_what_the_regex_can_continue_with(
    processor: Grammar, tokenizer: Any, eos: int
) -> None:
    state = processor.new_state(grammar.canonical("regex", "[0-9]{3}-ok"), [1, 2])
    (first,) = allowed(processor, [state])
    assert first and all(re.fullmatch(r"[0-9]{1,3}(-(o(k)?)?)?", tokenizer.decode([t])) for t in first)
    vocab = tokenizer.get_vocab_size()
    assert all(t < vocab for t in first)  # the padding ids beyond the tokenizer are never allowed
    assert eos not in first


def test_a_complete_output_allows_only_eos(processor: Grammar, tokenizer: Any, eos: int) -> None:
    state = processor.new_state(grammar.canonical("regex", "yes|no"), [1])
    for token in tokenizer.encode("yes").ids:
        assert token in allowed(processor, [state])[0]
        processor.advance([state], [token])
    assert allowed(processor, [state]) == [{eos}]
    processor.advance([state], [eos])  # the stopped matcher still answers, with EOS only
    assert allowed(processor, [state]) == [{eos}]


def test_an_accepting_but_extendable_output_allows_eos_and_more(
    processor: Grammar, tokenizer: Any, eos: int
) -> None:
    state = processor.new_state(grammar.canonical("regex", "[0-9]+"), [1])
    processor.advance([state], tokenizer.encode("4").ids)
    (mask,) = allowed(processor, [state])
    assert eos in mask and len(mask) > 1


def test_bad_arguments_are_refused(processor: Grammar) -> None:
    for argument in ("{", '{"type": "regex", "value": "(a"}', grammar.canonical("json", {"type": "strin"})):
        with pytest.raises(ProcessorArgumentError, match="grammar is not valid"):
            processor.new_state(argument, [1])
    assert processor.new_state(None, [1]) is None


def test_compiled_grammars_are_cached_in_a_bounded_lru(tiny_model_dir: Path, eos: int) -> None:
    p = Grammar()
    p.cache_size = 2
    p.setup(ProcessorContext(tiny_model_dir, 600, (eos,), torch.device("cpu")))
    arguments = [grammar.canonical("regex", f"a{{{n}}}") for n in (1, 2, 3)]
    p.new_state(arguments[0], [1])
    template = p._cache[arguments[0]]
    p.new_state(arguments[0], [1])
    assert p._cache[arguments[0]] is template  # compiled once
    for argument in arguments[1:]:
        p.new_state(argument, [1])
    assert list(p._cache) == arguments[1:]


def test_unpack_bitmask_reads_bits_low_first() -> None:
    bitmask = torch.tensor([[0b101, -(2**31)], [0, 1]], dtype=torch.int32)
    out = unpack_bitmask(bitmask, 64)
    assert out[0].nonzero().flatten().tolist() == [0, 2, 63]
    assert out[1].nonzero().flatten().tolist() == [32]


# ---------------------------------------------------------------------------------------------------------
# Through the engine: batched rows with different grammars, and unconstrained rows untouched

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "level": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green"]},
    },
    "required": ["name", "level", "ok", "color"],
    "additionalProperties": False,
}
SCHEMA_2 = {
    "type": "object",
    "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3}},
    "required": ["tags"],
    "additionalProperties": False,
}
REGEX = r"[A-Z]{2}-[0-9]{2}"


def run(engine: StepEngine, specs: list[RequestSpec], eos: int, steps: int) -> dict[int, list[int]]:
    """Greedy generation; a row leaves after its EOS, as the router makes it."""
    engine.clear()
    out: dict[int, list[int]] = {s.id: [] for s in specs}
    assert engine.add(specs) == []
    live = set(out)
    for _ in range(steps):
        result = engine.step()
        assert not result.failures, result.failures
        collect(out, result)
        done = {rid for rid in live if out[rid] and (out[rid][-1] == eos or len(out[rid]) >= steps)}
        engine.remove(done)
        live -= done
        if not live:
            break
    engine.clear()
    return out


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, processor: Grammar) -> StepEngine:
    backend = PagedBackend(tiny_model_dir, torch.device("cpu"), kv_cache_bytes=8 * 2**20)
    return make_engine(backend, processors=Processors([processor]))


def spec(rid: int, constraint: str | None = None, **params: Any) -> RequestSpec:
    processors = (("grammar", constraint),) if constraint else ()
    return RequestSpec(rid, [1, 5, 9, 13, 2 + rid], SamplingParams(processors=processors, **params), 400)


@pytest.mark.parametrize("sampled", [False, True])
def test_batched_grammars_give_valid_output_and_leave_other_rows_alone(
    engine: StepEngine, tokenizer: Any, eos: int, sampled: bool
) -> None:
    params = {"do_sample": True, "seed": 5, "temperature": 1.5} if sampled else {}
    solo = run(engine, [spec(1, **params), spec(4, **params)], eos, 30)
    specs = [
        spec(1, **params),
        spec(2, grammar.canonical("json", SCHEMA), **params),
        spec(3, grammar.canonical("regex", REGEX), **params),
        spec(4, **params),
        spec(5, grammar.canonical("json", SCHEMA_2), **params),
    ]
    out = run(engine, specs, eos, 120)
    for rid in (1, 4):  # (an unconstrained row stops early only at its own EOS)
        n = min(len(out[rid]), len(solo[rid]))
        assert out[rid][:n] == solo[rid][:n] and n >= min(30, len(solo[rid]))
    for rid in (2, 3, 5):
        assert out[rid][-1] == eos, (rid, tokenizer.decode(out[rid]))
    text = {rid: tokenizer.decode(out[rid][:-1]) for rid in (2, 3, 5)}
    jsonschema.validate(json.loads(text[2]), SCHEMA)
    assert re.fullmatch(REGEX, text[3]), text[3]
    jsonschema.validate(json.loads(text[5]), SCHEMA_2)


def test_json_object_starts_an_object(engine: StepEngine, processor: Grammar, tokenizer: Any) -> None:
    state = processor.new_state(grammar.canonical("json_object"), [1])
    (mask,) = allowed(processor, [state])
    assert mask and all(tokenizer.decode([t]).startswith("{") for t in mask)
