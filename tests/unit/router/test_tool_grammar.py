"""The grammars of the pythonic format (router/pythonic_grammar.py: keyword arguments as Python literals that
follow the tool's schema) and of the calls a lazy grammar triggers on without an opener (router/call_grammar.py's
``BARE_HEADS``: the pythonic ``[f(`` and Llama 3's bare ``{"name": ...`` at the start of the answer), checked
with llguidance on the tiny model's tokenizer, and the answers they allow read back token by token and at
every split."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import llguidance
import pytest

from common import grammar
from router.agent import ChatMessage, FunctionTool, OutputPlan, ToolChoice, Turn
from router.call_grammar import MAX_CALLS
from router.errors import ValidationError
from router.pythonic_grammar import arguments, callable_tool, python_literal
from router.tokenizer import Tokenizer
from router.toolcalls import ContentDelta, ParsedOutput, ToolCallDelta
from router.toolcalls.literals import python_literal as read_literal

from .test_agent import (
    THINK_TEMPLATE,
    TIME,
    WEATHER,
    agent,
    allows,
    assert_valid_calls,
    matcher_after,
    only_eos_after,
    spelled_is_text,
    walk,
    with_special_token,
)

pytestmark = pytest.mark.timeout(180)

# Every kind of value the Python literals follow, bounded (a random walk through it ends).
SEARCH = FunctionTool(
    "search",
    "Search the notes",
    {
        "type": "object",
        "properties": {
            "query": {"type": "string", "minLength": 1, "maxLength": 8},
            "limit": {"type": "integer", "minimum": 1, "maximum": 5},
            "exact": {"type": "boolean", "description": "whole words only"},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
            "where": {
                "type": "object",
                "properties": {"lang": {"type": ["string", "null"], "maxLength": 3}},
                "required": ["lang"],
                "additionalProperties": False,
            },
            "score": {"anyOf": [{"type": "number", "minimum": 0, "maximum": 1}, {"type": "null"}]},
            "mode": {"const": "fast"},
        },
        "required": ["query", "exact"],
        "additionalProperties": False,
    },
)
# A keyword the Python literals do not follow: the value is llguidance's JSON.
CODE = FunctionTool(
    "lookup",
    None,
    {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
        "required": ["code"],
        "additionalProperties": False,
    },
)
GOOD_SEARCH = '[search(query="tea", exact=True, tags=["a", "b"], where={"lang": None}, score=0.5)]'


def test_python_literals_read_back_as_the_json_values() -> None:
    value = {"a": [1, -2.5, True, None, "x\"y'\n\u00e9\U0001f680"], "b": {}, "c": False}
    assert python_literal(value) == '{"a": [1, -2.5, True, None, "x\\"y\'\\né🚀"], "b": {}, "c": False}'
    assert read_literal(python_literal(value)) == value
    assert callable_tool("get_weather", {}) and not callable_tool("get-weather", {})
    assert not callable_tool("class", {}) and not callable_tool("f", {"required": ["first-name"]})
    assert callable_tool("f", {"properties": {"first-name": {}}})  # an optional one is only left out


def test_forced_pythonic_calls_follow_the_schema(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer
) -> None:
    """``required`` with the pythonic parser: the model's own format, each value a Python literal of its
    property's schema; anything else is refused token by token."""
    pythonic = agent(tokenizer, tool_call_parser="pythonic")
    tools = (WEATHER, TIME, SEARCH)
    plan = pythonic.plan(Turn(tools, ToolChoice("required")), "prompt")
    assert plan.tool_parser is pythonic.tool_parser and plan.grammar is not None
    argument = plan.grammar
    eos = tokenizer.eos_token_id
    for text in [
        '[get_weather(city="Oslo", unit="celsius")]',
        "[get_weather(city='Oslo', unit=\"fahrenheit\"), get_time(hour=23), get_time()]",
        GOOD_SEARCH,
        '[search(query="x y", limit=5, exact=False, mode="fast")]',
    ]:
        assert only_eos_after(ll_tokenizer, argument, text, eos), text
        assert_valid_calls(plan, text, tools, MAX_CALLS)
    for bad in [
        "[get_wind(",  # an unknown function
        "[get_weather(city=3",  # a wrong type
        '[get_weather(city="Oslo", unit="kelvin"',  # not in the enum
        '[get_weather(city="Oslo")',  # a required argument missing
        '[get_weather(unit="celsius", city=',  # out of the schema's order
        "[get_time(hour=24",  # above the maximum
        '[get_time(hour="7"',
        "[get_time(minute=",  # not a parameter
        '[search(query="", ',  # minLength
        '[search(query="tea", exact=true',  # JSON's spelling, not Python's
        '[search(query="tea", exact=True, tags=["a", "b", ',  # maxItems
        '[search(query="tea", exact=True, where={"lang": "en", ',  # additionalProperties false
        '[search(query="tea", exact=True, where={}',  # where.lang required
        '[search(query="tea", exact=True, mode="slow"',  # const
        '[search(query="t\\u00e9a"',  # no \u escape: a lone surrogate could not be sent on
        "get_time()",  # a list, not a bare call
    ]:
        assert not allows(ll_tokenizer, argument, bad), bad
    for seed in range(6):  # any path is a valid call list
        assert_valid_calls(plan, walk(ll_tokenizer, argument, seed), tools, MAX_CALLS)
    named = pythonic.plan(Turn(tools, ToolChoice("function", "search")), "prompt")
    for seed in range(4):
        text = walk(ll_tokenizer, named.grammar or "", seed)
        assert [c.name for c in named.parse(text).calls] == ["search"], text
        assert_valid_calls(named, text, tools, 1)


def test_values_beyond_the_python_grammar(tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer) -> None:
    """A keyword the Python literals do not follow is enforced by llguidance's JSON: the tool is not exact,
    so ``strict`` is refused under ``auto``, and forced strict calls are decoded in hermes' format."""
    assert arguments(SEARCH.parameters, "t").exact and not arguments(CODE.parameters, "t").exact
    pythonic = agent(tokenizer, tool_call_parser="pythonic", lazy_calls=True)
    forced = pythonic.plan(Turn((CODE,), ToolChoice("required")), "prompt")
    assert allows(ll_tokenizer, forced.grammar or "", '[lookup(code="ABC")]')
    assert not allows(ll_tokenizer, forced.grammar or "", '[lookup(code="AB1')
    for seed in range(3):
        assert_valid_calls(forced, walk(ll_tokenizer, forced.grammar or "", seed), (CODE,), MAX_CALLS)
    strict = replace(CODE, strict=True)
    with pytest.raises(ValidationError, match=r"`tools\[1\]\.strict`.*as JSON") as error:
        pythonic.plan(Turn((TIME, strict)), "prompt")
    assert error.value.param == "tools"
    assert pythonic.plan(Turn((TIME, replace(SEARCH, strict=True))), "prompt").grammar is not None
    hermes = pythonic.plan(Turn((strict,), ToolChoice("required")), "prompt")
    assert hermes.tool_parser is not None and hermes.tool_parser.name == "hermes"
    assert_valid_calls(hermes, walk(ll_tokenizer, hermes.grammar or "", 0), (CODE,), MAX_CALLS)
    # a name the format cannot write: hermes' format when forced, left out of the lazy grammar
    dashed = FunctionTool("get-time", None, TIME.parameters)
    forced_dashed = pythonic.plan(Turn((dashed,), ToolChoice("required")), "p").tool_parser
    assert forced_dashed is not None and forced_dashed.name == "hermes"
    assert pythonic.plan(Turn((dashed,)), "p").grammar is None
    assert not allows(ll_tokenizer, pythonic.plan(Turn((dashed, TIME)), "p").grammar or "", "[get(")


def test_any_value_and_free_keywords(tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer) -> None:
    """A schema that says nothing of a value allows any literal; an object that declares no properties
    allows any keys (any identifiers as keyword arguments, but Python's keywords)."""
    free = FunctionTool("note", None, {"type": "object"})
    nested = FunctionTool("put", None, {"type": "object", "properties": {"v": {}, "d": {"type": "object"}}})
    plan = agent(tokenizer, tool_call_parser="pythonic").plan(
        Turn((free, nested), ToolChoice("required")), "p"
    )
    argument = plan.grammar or ""
    texts = ["[note(a=1, b_2=[True, None, {\"k\": -1.5e3}], c='it\\'s')]", '[put(v={"x": []}, d={"y": "z"})]']
    for text in texts:
        assert matcher_after(ll_tokenizer, argument, text).is_accepting(), text
        assert [json.loads(c.arguments) for c in plan.parse(text).calls]
    for bad in ["[note(class=", "[note(a=b", "[put(v=1, d=[", "[put(d={1: "]:
        assert not allows(ll_tokenizer, argument, bad), bad


def test_pythonic_auto_is_free_until_a_call_list_starts(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer
) -> None:
    """Under ``auto`` the answer is free unless it starts as a call list (``[`` and a call of a name, past
    whitespace) or writes ``<|python_start|>``; from there the calls are forced, and their list ends the
    answer."""
    lazy = agent(tokenizer, lazy_calls=True, tool_call_parser="pythonic")
    plan = lazy.plan(Turn((WEATHER, TIME)), "prompt")
    assert plan.grammar is not None and plan.grammar_field == "tools"
    argument = plan.grammar
    eos = tokenizer.eos_token_id
    for text in [
        "",
        "It is sunny.",
        "[1] a footnote",
        "[Note] (see below)",
        "A list: [get_weather(x)]",
        "[[f(x)]]",
    ]:
        assert matcher_after(ll_tokenizer, argument, text).is_accepting(), text
        assert plan.parse(text).calls == []
    for text in ["[get_time(hour=5)]", ' \n[ get_weather (city="Oslo", unit="celsius"), get_time()]']:
        assert only_eos_after(ll_tokenizer, argument, text, eos), text
        assert_valid_calls(plan, text, (WEATHER, TIME), MAX_CALLS)
    for bad in [
        "[get_wind(",  # the call of an unknown name
        "[ (get_time)(",  # a call the head does not allow
        "[\\\nget_wind(",  # past a line continuation
        "[get_wind # a comment\n(",
        "[tools . get_time(",  # a dotted name
        "  [get_weather(city=3",
        '[get_weather(city="Oslo")',
        "[get_time()] and more",  # the list ends the answer
        "Sure. <|python_start|>[get_wind(",
    ]:
        assert not allows(ll_tokenizer, argument, bad), bad
    tagged = "Sure. <|python_start|>get_time(hour=3)<|python_end|>"
    assert only_eos_after(ll_tokenizer, argument, tagged, eos)
    answer = plan.parse(tagged)
    assert answer.content == "Sure." and [c.arguments for c in answer.calls] == ['{"hour":3}']
    for seed in range(4):  # any path from the start of a call is a valid list of calls
        text = walk(ll_tokenizer, argument, seed, prefix=("[get_time(", "[get_weather(")[seed % 2])
        assert_valid_calls(plan, text, (WEATHER, TIME), MAX_CALLS)
    single = lazy.plan(Turn((WEATHER, TIME), parallel_tool_calls=False), "prompt").grammar or ""
    assert only_eos_after(ll_tokenizer, single, "[get_time()]", eos)
    assert not allows(ll_tokenizer, single, "[get_time(), ")


def test_llama3_bare_calls_are_constrained_under_auto(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer
) -> None:
    """Llama 3's call without ``<|python_tag|>``: an answer whose first key is one a call has (``name``,
    ``type``, ``parameters``, ``arguments``) is a call, forced; other JSON and other text stay free."""
    lazy = agent(tokenizer, lazy_calls=True, tool_call_parser="llama3_json")
    plan = lazy.plan(Turn((WEATHER, TIME), max_calls=2), "prompt")
    argument = plan.grammar or ""
    eos = tokenizer.eos_token_id
    for text in ["", "Hello.", '{"answer": 42}', "[1, 2]", 'Then {"name": "x"}']:
        assert matcher_after(ll_tokenizer, argument, text).is_accepting(), text
        assert plan.parse(text).calls == []
    for text in [
        '{"name": "get_time", "parameters": {"hour": 5}}',
        '\n{"type": "function", "name": "get_time", "parameters": {}}',
        '{ "name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}; '
        '{"name": "get_time", "parameters": {}}',
    ]:
        assert matcher_after(ll_tokenizer, argument, text).is_accepting(), text
        assert_valid_calls(plan, text, (WEATHER, TIME), 2)
    two = '{"name": "get_time", "parameters": {}}; {"name": "get_time", "parameters": {"hour": 0}}'
    assert only_eos_after(ll_tokenizer, argument, two, eos)  # max_calls: the answer ends
    for bad in [
        '{"name": "get_wind"',
        '{"name": "get_weather", "parameters": {"city": 3',
        '{"name": "get_weather", "arguments": ',  # Llama's key is forced
        '{"parameters": {}, ',  # the name first
        '{"n\\u0061me": ',  # an escape that json.loads reads as "name"
        '{"name": "get_time", "parameters": {}}; {"name": "get_time", "parameters": {}}; ',  # max_calls
    ]:
        assert not allows(ll_tokenizer, argument, bad), bad
    for seed in range(4):
        text = walk(ll_tokenizer, argument, seed, prefix='{"name": "get_')
        assert_valid_calls(plan, text, (WEATHER, TIME), 2)
    # <|python_tag|> still opens calls after text
    tagged = 'Sure. <|python_tag|>{"name": "get_time", "parameters": {}}'
    assert matcher_after(ll_tokenizer, argument, tagged).is_accepting()
    assert [c.name for c in plan.parse(tagged).calls] == ["get_time"]


def test_bare_calls_with_a_special_python_tag(tmp_path: Path, tiny_model_dir: Path) -> None:
    """When ``<|python_tag|>`` is a special token the free text is any text, but still not a bare call."""
    tok, ll, tag = with_special_token(tmp_path, tiny_model_dir, "<|python_tag|>")
    plan = agent(tok, tool_call_parser="llama3_json", lazy_calls=True).plan(Turn((WEATHER, TIME)), "prompt")
    argument = plan.grammar or ""
    assert f"<[{tag}]>" in grammar.parse(argument)[1]
    assert not allows(ll, argument, '{"name": "get_wind"')
    assert spelled_is_text(ll, argument, tag, ("A <|python_", "tag|> spelled out is text."))
    bare = '{"name": "get_time", "parameters": {"hour": 1}}'
    assert matcher_after(ll, argument, bare).is_accepting()
    after_tag = [*ll.tokenize_str("Sure."), tag, *ll.tokenize_str(bare)]
    assert matcher_after(ll, argument, "").consume_tokens(after_tag)
    assert [c.name for c in plan.parse(f"Sure.<|python_tag|>{bare}").calls] == ["get_time"]


# Answers the lazy grammars allow, with what the parser reads in them: (content, call names).
ANSWERS = {
    "pythonic": [
        ('[get_weather(city="Oslo", unit="celsius"), get_time(hour=7)]', "", ["get_weather", "get_time"]),
        ("  [get_time()]", "", ["get_time"]),
        (
            "[1] is a footnote, and [get_time()] is text here.",
            "[1] is a footnote, and [get_time()] is text here.",
            [],
        ),
        ("Sure. <|python_start|>[get_time(hour=3)]<|python_end|>", "Sure.", ["get_time"]),
    ],
    "llama3_json": [
        (
            '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "celsius"}}; '
            '{"name": "get_time", "parameters": {}}',
            "",
            ["get_weather", "get_time"],
        ),
        ('{"answer": {"name": "get_time"}}', '{"answer": {"name": "get_time"}}', []),
        ('Sure. <|python_tag|>{"name": "get_time", "parameters": {"hour": 3}}', "Sure.", ["get_time"]),
    ],
}


@pytest.mark.parametrize("parser", list(ANSWERS))
def test_triggered_answers_stream_token_by_token_and_at_every_split(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer, parser: str
) -> None:
    """Each answer is allowed one token at a time (as the shard's matcher consumes them), and its stream,
    fed token by token or split anywhere in two, reads what the whole answer reads."""
    lazy = agent(tokenizer, lazy_calls=True, tool_call_parser=parser)
    plan = lazy.plan(Turn((WEATHER, TIME)), "prompt")
    for text, content, names in ANSWERS[parser]:
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar.to_llguidance(plan.grammar or ""), log_level=0)
        ids = ll_tokenizer.tokenize_str(text)
        for token in ids:
            assert matcher.consume_token(token), (text, matcher.get_error())
        assert matcher.is_accepting(), text
        whole = plan.parse(text)
        assert (whole.content, [c.name for c in whole.calls]) == (content, names)
        pieces = [ll_tokenizer.decode_str(ids[: i + 1]) for i in range(len(ids))]
        by_token = [b[len(a) :] for a, b in zip(["", *pieces], pieces, strict=False)]
        assert "".join(by_token) == text
        splits = [[text[:i], text[i:]] for i in range(len(text) + 1)]
        for deltas in [by_token, *splits]:
            assert _read(plan, deltas) == (content, [(c.name, c.arguments) for c in whole.calls]), deltas


def _read(plan: OutputPlan, deltas: list[str]) -> tuple[str, list[tuple[str, str]]]:
    stream = plan.stream()
    out = [d for piece in deltas for d in stream.feed(piece)] + stream.finish()
    parsed = ParsedOutput.from_deltas([d for d in out if isinstance(d, (ContentDelta, ToolCallDelta))])
    return parsed.content, [(c.name, c.arguments) for c in parsed.calls]


@pytest.mark.parametrize(
    ("parser", "call", "unknown"),
    [
        ("pythonic", "[get_time(hour=2)]", "[get_wind("),
        ("llama3_json", '{"name": "get_time", "parameters": {}}', '{"name": "get_wind"'),
    ],
)
def test_bare_calls_after_the_reasoning(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer, parser: str, call: str, unknown: str
) -> None:
    """With a ``think`` template the bare call is read at the start of the answer, past ``</think>`` and
    whitespace; the reasoning itself may hold anything."""
    thinker = agent(tokenizer, THINK_TEMPLATE, lazy_calls=True, tool_call_parser=parser)
    prompt, _ = thinker.render([ChatMessage("user", "Weather?")], Turn())
    plan = thinker.plan(Turn((WEATHER, TIME)), prompt)
    argument = plan.grammar or ""
    for text in [f"Maybe {unknown} here.</think>\n\n{call}", f"ok</think>{call}"]:
        assert matcher_after(ll_tokenizer, argument, text).is_accepting(), text
        assert [c.name for c in plan.parse(text).calls] == ["get_time"]
    assert plan.parse(f"Maybe {unknown} here.</think>\n\n{call}").reasoning == f"Maybe {unknown} here."
    assert not allows(ll_tokenizer, argument, f"ok</think>\n\n{unknown}")
    assert matcher_after(ll_tokenizer, argument, "ok</think>\n\nJust text.").is_accepting()
