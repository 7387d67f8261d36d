"""The Responses route's reading of a model's text: the plan's parsers (router/agent.py) -> output items,
streamed at every split the same as whole; reasoning first; max_tool_calls."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from openai.types.responses import Response

from router.agent import OutputPlan
from router.reasoning import ThinkReasoningParser
from router.responses_api import _Output
from router.responses_events import ResponseBuilder, Usage
from router.toolcalls import HermesParser

TEXT = (
    "<think>The user wants weather.</think>Let me check.\n"
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
    '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
)
PLAN = OutputPlan(tool_parser=HermesParser(), reasoning_parser=ThinkReasoningParser())


def run(plan: OutputPlan, pieces: list[str]) -> tuple[list[str], dict[str, Any]]:
    builder = ResponseBuilder({"model": "m", "tools": [], "tool_choice": "auto", "parallel_tool_calls": True})
    output = _Output(plan, builder)
    events = builder.start()
    for i, piece in enumerate(pieces):
        events += output.feed(piece, i == len(pieces) - 1)
    events += builder.finish("completed", Usage(1, 1))
    return [e["type"] for e in events], events[-1]["response"]


def shape(response: dict[str, Any]) -> list[tuple[str, str]]:
    parsed = Response.model_validate(response)
    out = []
    for item in parsed.output:
        if item.type == "reasoning":
            out.append(("reasoning", item.summary[0].text))
        elif item.type == "message":
            out.append(("message", parsed.output_text))
        elif item.type == "function_call":
            out.append((item.name, item.arguments))
    return out


def test_reasoning_then_message_then_calls() -> None:
    _, response = run(PLAN, [TEXT])
    assert shape(response) == [
        ("reasoning", "The user wants weather."),
        ("message", "Let me check."),
        ("get_weather", '{"city":"Paris"}'),
        ("get_time", "{}"),
    ]


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_streamed_at_any_split_equals_whole(size: int) -> None:
    whole = shape(run(PLAN, [TEXT])[1])
    types, response = run(PLAN, [TEXT[i : i + size] for i in range(0, len(TEXT), size)])
    assert shape(response) == whole
    assert types.count("response.output_item.added") == types.count("response.output_item.done") == 4


def test_max_tool_calls_keeps_the_first_calls() -> None:
    # the plan of a request with max_tool_calls 1 (Turn.max_calls -> OutputPlan.max_calls, router/agent.py)
    _, response = run(replace(PLAN, max_calls=1), [TEXT])
    assert [name for name, _ in shape(response)] == ["reasoning", "message", "get_weather"]


def test_a_plan_that_reads_nothing_is_all_text() -> None:
    _, response = run(OutputPlan(), ["<think>x</think>", " <tool_call>{}"])
    assert shape(response) == [("message", "<think>x</think> <tool_call>{}")]
