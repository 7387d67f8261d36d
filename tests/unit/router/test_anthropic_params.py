"""router/anthropic_params.py: Messages bodies -> the neutral conversation (system, blocks, tool_use and
tool_result, prefill), tools and tool_choice, thinking, and the shared sampling options; every refusal names
its field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from common import grammar
from router.agent import ChatMessage, FunctionTool, ToolChoice
from router.anthropic_params import (
    Thinking,
    parse_conversation,
    parse_model,
    parse_request_extras,
    parse_sampling,
)
from router.errors import ValidationError
from router.openai_params import Fields
from router.tokenizer import Tokenizer
from router.toolcalls import ToolCall
from router.validation import Validator

from .test_validation import make_config

pytestmark = pytest.mark.timeout(60)

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
HELLO = [{"role": "user", "content": "Hello"}]


def conversation(**body: Any):
    fields = Fields({"messages": HELLO, **body})
    parsed = parse_conversation(fields)
    fields.finish()
    return parsed


def refused(body: dict[str, Any], *words: str) -> ValidationError:
    with pytest.raises(ValidationError) as excinfo:
        conversation(**body)
    for word in words:
        assert word in excinfo.value.detail, excinfo.value.detail
    return excinfo.value


def test_system_and_text_blocks() -> None:
    parsed = conversation(
        system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Capital of France?"},
        ],
    )  # fmt: skip
    assert parsed.messages == (
        ChatMessage("system", "Be brief.\n\nBe kind."),
        ChatMessage("user", "Hi\n\nthere"),
        ChatMessage("assistant", "Hello."),
        ChatMessage("user", "Capital of France?"),
    )
    assert not parsed.prefill and parsed.turn.tools == () and parsed.turn.choice == ToolChoice("none")
    assert parsed.thinking == Thinking() and parsed.template_kwargs() == {"enable_thinking": False}
    assert conversation(system="Be brief.").messages[0] == ChatMessage("system", "Be brief.")


def test_tool_use_and_tool_result_become_calls_and_tool_messages() -> None:
    parsed = conversation(
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "two calls", "signature": "x"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"},
                 "caller": {"type": "direct"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {"city": "Rome"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                 "content": [{"type": "text", "text": "no data"}]},
                {"type": "text", "text": "Summarize."},
            ]},
        ],
    )  # fmt: skip
    assert parsed.messages[1:] == (
        ChatMessage(
            "assistant",
            "Checking.",
            tool_calls=(
                ToolCall("toolu_1", "get_weather", '{"city": "Paris"}'),
                ToolCall("toolu_2", "get_weather", '{"city": "Rome"}'),
            ),
        ),
        ChatMessage("tool", "sunny", tool_call_id="toolu_1"),
        ChatMessage("tool", "Error: no data", tool_call_id="toolu_2"),
        ChatMessage("user", "Summarize."),
    )
    assert parsed.turn.tools == (
        FunctionTool("get_weather", WEATHER["description"], WEATHER["input_schema"]),
    )
    assert parsed.turn.choice == ToolChoice("auto") and parsed.turn.parallel_tool_calls


@pytest.mark.parametrize(
    ("choice", "expected", "parallel"),
    [
        ({"type": "auto"}, ToolChoice("auto"), True),
        ({"type": "any"}, ToolChoice("required"), True),
        ({"type": "any", "disable_parallel_tool_use": True}, ToolChoice("required"), False),
        ({"type": "tool", "name": "get_weather"}, ToolChoice("function", "get_weather"), True),
        ({"type": "none"}, ToolChoice("none"), True),
    ],
)
def test_tool_choice(choice: dict, expected: ToolChoice, parallel: bool) -> None:
    turn = conversation(tools=[WEATHER], tool_choice=choice).turn
    assert turn.choice == expected and turn.parallel_tool_calls == parallel
    assert turn.constraint is None and turn.constraint_field == "output_config"


def test_output_config_and_cache_control() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    parsed = conversation(
        output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"},
        cache_control={"type": "ephemeral", "ttl": "1h"},
    )
    assert parsed.turn.constraint == grammar.canonical("json", schema)
    assert parsed.template_kwargs() == {"enable_thinking": False, "reasoning_effort": "low"}
    assert conversation(output_config={"effort": "max"}).turn.constraint is None


def test_a_last_assistant_message_is_a_prefill() -> None:
    parsed = conversation(messages=[*HELLO, {"role": "assistant", "content": "The answer is"}])
    assert parsed.prefill and parsed.messages[-1] == ChatMessage("assistant", "The answer is")


def test_thinking() -> None:
    assert conversation(thinking={"type": "disabled"}).thinking == Thinking()
    adaptive = conversation(thinking={"type": "adaptive"})
    assert adaptive.thinking == Thinking(True, True) and adaptive.template_kwargs() == {
        "enable_thinking": True
    }
    assert conversation(thinking={"type": "adaptive", "display": "omitted"}).thinking == Thinking(True, False)
    assert conversation(thinking={"type": "adaptive", "display": "summarized"}).thinking == Thinking(
        True, True
    )
    enabled = conversation(thinking={"type": "enabled", "budget_tokens": 2048, "display": "omitted"})
    assert enabled.thinking == Thinking(True, False, 2048)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"messages": []}, ["`messages` must be a non-empty array"]),
        ({"messages": [{"role": "system", "content": "x"}]}, ["`messages[0].role`", "top-level `system`"]),
        ({"messages": [{"role": "user", "content": ""}]}, ["`messages[0].content` must be non-empty"]),
        ({"messages": [{"role": "user", "content": "x", "name": "n"}]}, ["`messages[0].name`"]),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
         ["`messages[0].content[0]`", "`image` block", "no images"]),
        ({"messages": [{"role": "user", "content": [{"type": {"a": 1}}]}]},
         ["`messages[0].content[0].type` must be a string"]),
        ({"tools": [WEATHER], "tool_choice": {"type": ["any"]}}, ["`tool_choice.type` must be"]),
        ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
         ["`messages[0].content[0]`", "`document` block"]),
        ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}]}]},
         ["`messages[0].content[0]`", "'tool_use'", "user messages"]),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "citations": [{}]}]}]},
         ["`messages[0].content[0].citations`"]),
        ({"messages": [*HELLO, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "a", "name": "f", "input": []}]}, *HELLO]},
         ["`messages[1].content[0].input` must be an object"]),
        ({"messages": [*HELLO, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "a", "name": "f", "input": {}, "caller": {"type": "code_execution"}}]}, *HELLO]},
         ["`messages[1].content[0].caller`"]),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": 3}]}]},
         ["`messages[0].content[0].tool_use_id` must be a string"]),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "a",
                                                     "content": [{"type": "image"}]}]}]},
         ["`messages[0].content[0].content[0]`", "`image` block"]),
        ({"messages": [*HELLO, {"role": "assistant", "content": [
            {"type": "tool_use", "id": "a", "name": "get_weather", "input": {}}]}]},
         ["prefill", "tool_use"]),
        ({"system": 5}, ["`system` must be a string or an array of text blocks"]),
        ({"system": [{"type": "text", "text": "x", "cache_control": {"type": "forever"}}]},
         ["`system[0].cache_control`"]),
        ({"tools": {"name": "f"}}, ["`tools` must be an array"]),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, ["`tools[0]` is a server tool"]),
        ({"tools": [{"name": "f"}]}, ["`tools[0].input_schema` must be an object"]),
        ({"tools": [{**WEATHER, "input_examples": []}]}, ["`tools[0].input_examples` is not supported"]),
        ({"tools": [{**WEATHER, "name": "bad name"}]}, ["`tools[0]` name"]),
        ({"tools": [WEATHER, WEATHER]}, ["twice"]),
        ({"tool_choice": {"type": "any"}}, ["`tool_choice` any needs `tools`"]),
        ({"tools": [WEATHER], "tool_choice": "auto"}, ["`tool_choice` must be an object"]),
        ({"tools": [WEATHER], "tool_choice": {"type": "required"}}, ["`tool_choice.type` must be"]),
        ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "other"}}, ["'other'", "not in `tools`"]),
        ({"tools": [WEATHER], "tool_choice": {"type": "none", "disable_parallel_tool_use": True}},
         ["`tool_choice.disable_parallel_tool_use` is not supported"]),
        ({"tools": [WEATHER], "tool_choice": {"type": "any"},
          "messages": [*HELLO, {"role": "assistant", "content": "x"}]}, ["prefill", "`tool_choice`"]),
        ({"output_config": {"format": {"type": "json_object"}}}, ["`output_config.format.type`"]),
        ({"output_config": {"format": {"type": "json_schema", "schema": {"type": "string", "pattern": "("}}}},
         ["`output_config.format.schema` is not valid"]),
        ({"output_config": {"effort": "extreme"}}, ["`output_config.effort`"]),
        ({"output_config": {"task_budget": 5}}, ["`output_config.task_budget` is not supported"]),
        ({"cache_control": {"type": "persistent"}}, ["`cache_control` must be"]),
        ({"thinking": {"type": "enabled"}}, ["`thinking.budget_tokens` must be an integer >= 1"]),
        ({"thinking": {"type": "enabled", "budget_tokens": 0}}, ["`thinking.budget_tokens` must be an integer"]),
        ({"thinking": {"type": "between_tools"}}, ["`thinking.type`"]),
        ({"thinking": {"type": "adaptive", "display": "full"}}, ["`thinking.display`"]),
        ({"thinking": {"type": "disabled", "budget_tokens": 5}}, ["`thinking.budget_tokens` is not supported"]),
    ],
)  # fmt: skip
def test_refusals_name_the_field(body: dict[str, Any], words: list[str]) -> None:
    error = refused(body, *words)
    assert error.status == 422
    assert error.param in {
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "cache_control",
    }


def test_unknown_fields_are_refused_by_name() -> None:
    fields = Fields({"messages": HELLO, "container": "c"})
    parse_conversation(fields)
    with pytest.raises(ValidationError, match="unsupported parameter `container`"):
        fields.finish()


@pytest.fixture(scope="module")
def infer(tiny_model_dir: Path) -> Iterator[SimpleNamespace]:
    tokenizer = Tokenizer(tiny_model_dir)
    validator = Validator(make_config(tiny_model_dir), tokenizer)
    yield SimpleNamespace(config=validator.config, validator=validator, tokenizer=tokenizer,
                          info=SimpleNamespace(vocab_size=0))  # fmt: skip
    validator.close()


def test_sampling_options(infer: SimpleNamespace) -> None:
    body = {"max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "stop_sequences": ["\n\n", "END"],
            "stream": True}  # fmt: skip
    fields = Fields(body)
    options = parse_sampling(fields, infer)
    fields.finish()
    assert options.max_tokens == 7 and options.stop == ["\n\n", "END"] and options.stream
    assert options.params.temperature == 0.5 and options.params.top_p == 0.9 and options.params.top_k == 5
    assert options.params.do_sample
    greedy = parse_sampling(Fields({"max_tokens": 3, "temperature": 0}), infer)
    assert not greedy.params.do_sample and not greedy.stream and greedy.stop == []
    default = parse_sampling(Fields({"max_tokens": 3}), infer)
    assert default.params.do_sample and default.params.temperature == 1.0  # Anthropic's default: 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 5, "temperature": 1.5}, "temperature"),
        ({"max_tokens": 5, "top_p": 0}, "top_p"),
        ({"max_tokens": 5, "top_k": -1}, "top_k"),
        ({"max_tokens": 5, "stop_sequences": "END"}, "stop_sequences"),
        ({"max_tokens": 5, "stop_sequences": [""]}, "stop_sequences"),
        ({"max_tokens": 5, "stop_sequences": ["a", "b", "c", "d", "e"]}, "stop_sequences"),
        ({"max_tokens": 5, "stream": "yes"}, "stream"),
    ],
)
def test_sampling_refusals_name_the_field(infer: SimpleNamespace, body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        parse_sampling(Fields(body), infer)
    assert excinfo.value.param == field and f"`{field}`" in excinfo.value.detail


def test_model_metadata_and_service_tier() -> None:
    with pytest.raises(ValidationError, match="`model` is required"):
        parse_model(Fields({}))
    parse_model(Fields({"model": "claude"}))
    fields = Fields({"metadata": {"user_id": "u-1"}, "service_tier": "standard_only"})
    parse_request_extras(fields)
    fields.finish()
    for body, field in (
        ({"metadata": {"user": "u"}}, "metadata"),
        ({"metadata": {"user_id": 5}}, "metadata"),
        ({"metadata": "u"}, "metadata"),
        ({"service_tier": "priority"}, "service_tier"),
    ):
        with pytest.raises(ValidationError) as excinfo:
            parse_request_extras(Fields(body))
        assert excinfo.value.param == field
