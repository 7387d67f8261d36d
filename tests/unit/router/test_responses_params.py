"""POST /v1/responses bodies -> the neutral values (router/agent.py) and the chat route's Options: input
items, tools, tool_choice, text.format, sampling, and every other field honoured or refused by name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from common import grammar
from router.agent import ChatMessage, FunctionTool, ToolChoice
from router.errors import ValidationError
from router.responses_params import normalize_input, normalize_output, parse_request, to_messages
from router.tokenizer import Tokenizer
from router.toolcalls import ToolCall
from router.validation import Validator

from .test_validation import make_config

pytestmark = pytest.mark.timeout(60)

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}


@pytest.fixture(scope="module")
def infer(tiny_model_dir: Path) -> Iterator[SimpleNamespace]:
    tokenizer = Tokenizer(tiny_model_dir)
    validator = Validator(make_config(tiny_model_dir), tokenizer)
    yield SimpleNamespace(
        config=validator.config, info=SimpleNamespace(vocab_size=0), tokenizer=tokenizer, validator=validator
    )
    validator.close()


def parse(infer: SimpleNamespace, **body: Any):
    return parse_request({"model": "tiny", "input": "Hi", **body}, infer)  # type: ignore[arg-type]


def refused(infer: SimpleNamespace, field: str, **body: Any) -> str:
    with pytest.raises(ValidationError) as error:
        parse(infer, **body)
    assert error.value.param == field, error.value.detail
    return error.value.detail


def test_a_string_is_one_user_message(infer: SimpleNamespace) -> None:
    request = parse(infer, instructions="Be brief.")
    assert request.input_items == ({"type": "message", "role": "user", "content": "Hi"},)
    assert request.instructions == "Be brief." and request.store and request.previous_response_id is None
    assert to_messages(request.input_items) == [ChatMessage("user", "Hi")]
    assert request.turn.tools == () and not request.turn.calls_allowed
    assert request.options.max_tokens is None and not request.options.stream


def test_items_become_messages() -> None:
    items = normalize_input(
        [
            {"role": "developer", "content": "Use tools."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text", "text": "in Paris?"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "hmm"}]},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
             "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
            {"type": "function_call", "id": "fc_1", "namespace": None, "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call", "call_id": "call_2", "name": "get_time", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "noon"}]},
        ]
    )  # fmt: skip
    assert to_messages(items) == [
        ChatMessage("system", "Use tools."),
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage(
            "assistant",
            "Let me look.",
            tool_calls=(
                ToolCall("call_1", "get_weather", '{"city":"Paris"}'),
                ToolCall("call_2", "get_time", "{}"),
            ),
        ),
        ChatMessage("tool", "sunny", tool_call_id="call_1", name="get_weather"),
        ChatMessage("tool", "noon", tool_call_id="call_2", name="get_time"),
    ]


def test_a_stored_output_continues_as_input() -> None:
    output = [
        {"id": "rs_1", "type": "reasoning", "summary": [{"type": "summary_text", "text": "x"}]},
        {"id": "fc_1", "type": "function_call", "status": "completed", "call_id": "c", "name": "f", "arguments": "{}"},
    ]  # fmt: skip
    items = normalize_output(output) + normalize_input(
        [{"type": "function_call_output", "call_id": "c", "output": "1"}]
    )
    assert to_messages(items) == [
        ChatMessage("assistant", tool_calls=(ToolCall("c", "f", "{}"),)),
        ChatMessage("tool", "1", tool_call_id="c", name="f"),
    ]


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ([], "non-empty array"),
        (7, "non-empty array"),
        ([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}], "input_image"),
        ([{"role": "tool", "content": "x"}], "role"),
        ([{"type": "web_search_call", "id": "x"}], "web_search_call"),
        ([{"type": "item_reference", "id": "x"}], "item references"),
        ([{"role": "user", "content": "x", "extra": 1}], "`extra`"),
        (
            [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}],
            "JSON text of an object",
        ),
        ([{"type": "function_call", "call_id": "", "name": "f", "arguments": "{}"}], "call_id"),
        ([{"type": "function_call_output", "call_id": "c", "output": 3}], "output"),
    ],
)
def test_bad_input_is_refused_naming_input(infer: SimpleNamespace, value: Any, words: str) -> None:
    assert words in refused(infer, "input", input=value)


def test_an_output_without_its_call_is_refused() -> None:
    items = normalize_input([{"type": "function_call_output", "call_id": "nope", "output": "x"}])
    with pytest.raises(ValidationError, match="nope") as error:
        to_messages(items)
    assert error.value.param == "input"


def test_function_tools_and_choices(infer: SimpleNamespace) -> None:
    request = parse(
        infer, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, max_tool_calls=2
    )
    tool = FunctionTool("get_weather", "The weather in a city", WEATHER["parameters"], strict=True)
    assert request.turn.tools == (tool,) and request.turn.choice == ToolChoice("required")
    assert not request.turn.parallel_tool_calls and request.turn.max_calls == 2
    assert request.echo["tools"] == [WEATHER] and request.echo["tool_choice"] == "required"
    named = parse(infer, tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"})
    assert named.turn.choice == ToolChoice("function", "get_weather")
    assert parse(infer, tools=[WEATHER]).turn.choice == ToolChoice("auto")
    bare = parse(infer, tools=[{"type": "function", "name": "ping", "parameters": None}])
    assert bare.turn.tools[0].parameters == {"type": "object", "properties": {}}


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools", "web_search"),
        ({"tools": [{"type": "file_search", "vector_store_ids": []}]}, "tools", "file_search"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "`function`"),
        ({"tools": [{**WEATHER, "name": "a b"}]}, "tools", "name"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "twice"),
        ({"tools": {"a": 1}}, "tools", "array"),
        ({"tool_choice": "required"}, "tool_choice", "`tools` is empty"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", "nope"),
        ({"tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "tool_choice", "file_search"),
        ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice", "always"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls", "boolean"),
        ({"max_tool_calls": 0}, "max_tool_calls", ">= 1"),
    ],
)
def test_bad_tools_are_refused_by_name(infer: SimpleNamespace, body: dict, field: str, words: str) -> None:
    assert words in refused(infer, field, **body)


def test_text_format(infer: SimpleNamespace) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}
    request = parse(infer, text={"format": fmt})
    assert request.turn.constraint == grammar.canonical("json", schema)
    assert request.turn.constraint_field == "text" and request.echo["text"]["format"] == fmt
    assert parse(infer, text={"format": {"type": "json_object"}}).turn.constraint == grammar.canonical(
        "json_object"
    )
    assert parse(infer, text={"format": {"type": "text"}, "verbosity": "medium"}).turn.constraint is None
    assert parse(infer).echo["text"] == {"format": {"type": "text"}}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ({"format": {"type": "json_schema", "name": "a b", "schema": {}}}, "`text.format.name`"),
        (
            {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "extra": 1}},
            "`extra`",
        ),
        ({"format": {"type": "regex"}}, "`text.format` type"),
        ({"format": {"type": "text"}, "verbosity": "low"}, "verbosity"),
        ({"fmt": {}}, "`text`"),
    ],
)
def test_bad_text_is_refused_naming_text(infer: SimpleNamespace, text: Any, words: str) -> None:
    detail = refused(infer, "text", text=text)
    assert words in detail and "response_format" not in detail


def test_sampling_goes_through_the_chat_options(infer: SimpleNamespace) -> None:
    request = parse(infer, temperature=0, top_p=0.5, max_output_tokens=7, stream=True)
    assert request.options.max_tokens == 7 and request.options.stream
    assert not request.options.params.do_sample
    assert request.echo["temperature"] == 0 and request.echo["max_output_tokens"] == 7
    assert refused(infer, "max_output_tokens", max_output_tokens=0)
    assert refused(infer, "temperature", temperature=3)
    assert refused(infer, "top_p", top_p=0)
    assert refused(infer, "stream", stream="yes")


def test_request_fields_are_honoured(infer: SimpleNamespace) -> None:
    request = parse(
        infer,
        store=False,
        metadata={"k": "v"},
        user="u1",
        service_tier="auto",
        safety_identifier="s",
        prompt_cache_key="p",
        include=[],
        truncation="disabled",
        background=False,
        reasoning={"effort": "low", "summary": "auto"},
        previous_response_id="resp_1",
    )
    assert not request.store and request.previous_response_id == "resp_1"
    assert request.template_kwargs == {"reasoning_effort": "low"}
    echo = request.echo
    assert echo["metadata"] == {"k": "v"} and echo["user"] == "u1" and echo["store"] is False
    assert echo["reasoning"] == {"effort": "low", "summary": "auto"} and echo["service_tier"] == "default"
    assert json.dumps(echo)  # the echo is plain JSON


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"prompt": {"id": "pmpt_1"}}, "prompt"),
        ({"stream_options": {"include_obfuscation": True}}, "stream_options"),
        ({"store": "yes"}, "store"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"user": 5}, "user"),
        ({"instructions": ["x"]}, "instructions"),
        ({"previous_response_id": 3}, "previous_response_id"),
        ({"reasoning": {"effort": "huge"}}, "reasoning"),
        ({"reasoning": {"budget": 3}}, "reasoning"),
        ({"seed": 3}, "seed"),
        ({"max_tokens": 3}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"model": 3}, "model"),
    ],
)
def test_other_fields_are_refused_by_name(infer: SimpleNamespace, body: dict, field: str) -> None:
    refused(infer, field, **body)
