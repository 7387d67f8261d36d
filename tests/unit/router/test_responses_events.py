"""The Responses API's output items and streaming events: order, shapes (checked with the openai SDK's own
models), sequence numbers, and the same output streamed or whole."""

from __future__ import annotations

import json
from typing import Any

import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from router.responses_events import ResponseBuilder, Usage, new_id, sse_bytes
from router.toolcalls import ToolCallDelta

EVENTS = pydantic.TypeAdapter(ResponseStreamEvent)
HEAD: dict[str, Any] = {
    "model": "m",
    "instructions": None,
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "tools": [],
    "temperature": 1.0,
    "top_p": 1.0,
    "metadata": {},
}


def checked(events: list[dict[str, Any]]) -> list[str]:
    """The events' types, after the SDK's models parsed each one."""
    for event in events:
        EVENTS.validate_python(event)
    return [event["type"] for event in events]


def test_text_events_in_order_with_sequence_numbers() -> None:
    builder = ResponseBuilder(HEAD)
    events = builder.start() + builder.text("Hel") + builder.text("") + builder.text("lo")
    events += builder.finish("completed", Usage(5, 3))
    assert checked(events) == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []
    assert events[6]["text"] == "Hello"
    final = Response.model_validate(events[-1]["response"])
    assert final.output_text == "Hello" and final.status == "completed" and final.id.startswith("resp_")
    assert final.usage is not None and final.usage.total_tokens == 8 and final.usage.input_tokens == 5
    message = final.output[0]
    assert message.type == "message" and message.status == "completed" and message.id.startswith("msg_")
    ids = {e.get("item_id") for e in events if "item_id" in e}
    assert ids == {message.id}


def test_reasoning_then_text_then_calls() -> None:
    builder = ResponseBuilder(HEAD)
    events = builder.start() + builder.reasoning("think ") + builder.reasoning("hard")
    events += builder.text("Calling.")
    events += builder.call(ToolCallDelta(0, "call_1", "get_weather"))
    events += builder.call(ToolCallDelta(0, arguments='{"city":'))
    events += builder.call(ToolCallDelta(0, arguments='"Paris"}'))
    events += builder.call(ToolCallDelta(1, "call_2", "get_time"))
    events += builder.call(ToolCallDelta(1, arguments="{}"))
    events += builder.finish("completed", Usage(10, 20, 2))
    types = checked(events)
    assert types[2:9] == [
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
    ]
    assert types.count("response.function_call_arguments.delta") == 3
    assert types.count("response.function_call_arguments.done") == 2
    assert types[-1] == "response.completed"
    final = Response.model_validate(events[-1]["response"])
    kinds = [item.type for item in final.output]
    assert kinds == ["reasoning", "message", "function_call", "function_call"]
    reasoning, _, first, second = final.output
    assert reasoning.type == "reasoning" and reasoning.summary[0].text == "think hard"
    assert final.output_text == "Calling."
    assert first.type == "function_call" and first.call_id == "call_1" and first.name == "get_weather"
    assert json.loads(first.arguments) == {"city": "Paris"} and first.id and first.id.startswith("fc_")
    assert second.type == "function_call" and second.arguments == "{}" and second.status == "completed"
    output_indexes = [e["output_index"] for e in events if e["type"] == "response.output_item.added"]
    assert output_indexes == [0, 1, 2, 3]
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens == 2


def test_incomplete_marks_the_open_message() -> None:
    builder = ResponseBuilder(HEAD)
    events = builder.start() + builder.text("cut sh") + builder.finish("incomplete", Usage(1, 2))
    assert checked(events)[-1] == "response.incomplete"
    final = Response.model_validate(events[-1]["response"])
    assert final.status == "incomplete" and final.incomplete_details is not None
    assert final.incomplete_details.reason == "max_output_tokens"
    assert final.output[0].type == "message" and final.output[0].status == "incomplete"


def test_no_output_is_one_empty_message() -> None:
    builder = ResponseBuilder(HEAD)
    events = builder.finish("completed", Usage(1, 1))
    final = Response.model_validate(events[-1]["response"])
    assert len(final.output) == 1 and final.output_text == ""
    assert checked(events)[0] == "response.output_item.added"


def test_failed() -> None:
    builder = ResponseBuilder(HEAD)
    events = builder.start() + builder.text("x") + builder.fail("the shard failed")
    assert checked(events)[-1] == "response.failed"
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": "the shard failed"}
    assert events[-1]["response"]["status"] == "failed"


def test_streamed_equals_whole() -> None:
    def build(pieces: list[str]) -> dict[str, Any]:
        builder = ResponseBuilder(HEAD, response_id="resp_x")
        for piece in pieces:
            builder.text(piece)
        response = builder.finish("completed", Usage(1, len(pieces)))[-1]["response"]
        return {**response, "output": [{**item, "id": ""} for item in response["output"]]}

    whole, streamed = build(["Bonjour ", "à ", "tous"]), build(["Bonjour à tous"])
    assert {**whole, "usage": None} == {**streamed, "usage": None}


def test_sse_bytes_names_each_event() -> None:
    raw = sse_bytes([{"type": "response.output_text.delta", "delta": "é\n"}])
    assert (
        raw
        == 'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", "delta": "é\\n"}\n\n'.encode()
    )


@pytest.mark.parametrize("prefix", ["resp", "msg", "fc", "rs"])
def test_ids(prefix: str) -> None:
    first, second = new_id(prefix), new_id(prefix)
    assert first.startswith(prefix + "_") and first != second
