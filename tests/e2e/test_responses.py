"""The Responses API (POST /v1/responses, GET and DELETE /v1/responses/{id}) with the official openai SDK,
unchanged, against the default model: text, streamed and not, instructions, max_output_tokens, text.format,
function tools (required and named, a tool-result round trip by previous_response_id and by input items),
the store, and bad input."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import agents
import jsonschema
import openai
import pytest
import requests

from .conftest import stop_and_check
from .harness import Launched

pytestmark = pytest.mark.timeout(600)

QUESTION = "What is the capital of France?"
WEATHER: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
    "strict": True,
}
TIME: dict[str, Any] = {
    "type": "function",
    "name": "get_time",
    "description": "Get the current time in a time zone",
    "parameters": {
        "type": "object",
        "properties": {"zone": {"type": "string", "maxLength": 30}},
        "required": ["zone"],
        "additionalProperties": False,
    },
}
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def squeeze(types: list[str]) -> list[str]:
    """Event types with runs of the same type as one."""
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


def calls(response: Any) -> list[Any]:
    return [item for item in response.output if item.type == "function_call"]


def test_text_streamed_and_not(client: openai.OpenAI, model: str) -> None:
    whole = client.responses.create(model=model, input=QUESTION, temperature=0, max_output_tokens=20)
    assert whole.object == "response" and whole.id.startswith("resp_") and whole.model == model
    assert whole.status in ("completed", "incomplete") and "Paris" in whole.output_text
    assert [item.type for item in whole.output] == ["message"]
    assert whole.usage is not None and whole.usage.input_tokens > 5
    assert whole.usage.total_tokens == whole.usage.input_tokens + whole.usage.output_tokens
    stream = client.responses.create(
        model=model, input=QUESTION, temperature=0, max_output_tokens=20, stream=True
    )
    events = list(stream)
    types = [event.type for event in events]
    assert squeeze(types) == [
        *TEXT_EVENTS,
        f"response.{'completed' if whole.status == 'completed' else 'incomplete'}",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    final = events[-1].response
    assert text == final.output_text == whole.output_text
    assert final.usage is not None and final.usage.output_tokens == whole.usage.output_tokens
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id
    done = next(e for e in events if e.type == "response.output_item.done")
    assert done.item.id == final.output[0].id


def test_the_sdk_stream_helper(client: openai.OpenAI, model: str) -> None:
    with client.responses.stream(model=model, input=QUESTION, temperature=0, max_output_tokens=12) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.output_text


def test_instructions_and_raw_http(client: openai.OpenAI, model: str, default_server: Launched) -> None:
    instructed = client.responses.create(
        model=model, input=QUESTION, instructions="Answer in one word.", temperature=0, max_output_tokens=8
    )
    assert instructed.instructions == "Answer in one word."
    # The same conversation on the chat route: the same prompt, the same greedy answer.
    messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": QUESTION}]
    chat = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=8)
    assert instructed.usage is not None and chat.usage is not None
    assert instructed.usage.input_tokens == chat.usage.prompt_tokens
    assert instructed.output_text == chat.choices[0].message.content
    raw = requests.post(
        f"{default_server.url}/v1/responses",
        json={"input": QUESTION, "max_output_tokens": 3, "stream": True},
        stream=True,
        timeout=120,
    )
    assert raw.status_code == 200 and raw.headers["Content-Type"].startswith("text/event-stream")
    blocks = raw.text.strip().split("\n\n")
    for block in blocks:  # each event: its type on an event: line, then the same type in the JSON data
        event_line, data_line = block.split("\n")
        assert event_line.removeprefix("event: ") == json.loads(data_line.removeprefix("data: "))["type"]


def test_max_output_tokens_makes_an_incomplete_response(client: openai.OpenAI, model: str) -> None:
    response = client.responses.create(model=model, input="Tell me a long story.", max_output_tokens=3)
    assert response.status == "incomplete" and response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None and response.usage.output_tokens == 3
    assert response.output[0].type == "message" and response.output[0].status == "incomplete"


def test_text_format_json_schema(client: openai.OpenAI, model: str) -> None:
    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "country": {"type": "string", "maxLength": 20},
        },
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model=model,
        input="Name a big city and its country, in JSON.",
        text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}},
        temperature=0,
        max_output_tokens=60,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text is not None and response.text.format.type == "json_schema"


@pytest.mark.parametrize("stream", [False, True])
def test_a_required_function_call(client: openai.OpenAI, model: str, stream: bool) -> None:
    kwargs: dict[str, Any] = {
        "model": model,
        "input": "What is the weather like in Paris today?",
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0,
        "max_output_tokens": 80,
    }
    if stream:
        events = list(client.responses.create(**kwargs, stream=True))
        types = squeeze([event.type for event in events])
        assert types[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
        assert "response.function_call_arguments.delta" in types
        assert types[-3:] == [
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
        response = events[-1].response
        done = next(e for e in events if e.type == "response.function_call_arguments.done")
        assert done.arguments == calls(response)[0].arguments
    else:
        response = client.responses.create(**kwargs)
    assert response.status == "completed"
    [call] = calls(response)
    assert call.name in ("get_weather", "get_time") and call.call_id.startswith("call_")
    schema = WEATHER["parameters"] if call.name == "get_weather" else TIME["parameters"]
    jsonschema.validate(json.loads(call.arguments), schema)


def test_a_named_function_call_and_its_result(client: openai.OpenAI, model: str) -> None:
    first = client.responses.create(
        model=model,
        input="What time is it in Tokyo?",
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "name": "get_time"},
        temperature=0,
        max_output_tokens=60,
    )
    [call] = calls(first)
    assert call.name == "get_time" and "zone" in json.loads(call.arguments)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "It is 9:00 in Tokyo."}
    # By previous_response_id: the stored input and output come first.
    second = client.responses.create(
        model=model, previous_response_id=first.id, input=[result], tools=[WEATHER, TIME], tool_choice="none",
        temperature=0, max_output_tokens=30,
    )  # fmt: skip
    assert second.previous_response_id == first.id and second.output_text and not calls(second)
    # By input items: the same conversation, sent whole.
    items = [
        {"role": "user", "content": "What time is it in Tokyo?"},
        *[i.model_dump() for i in first.output],
        result,
    ]
    third = client.responses.create(
        model=model,
        input=items,
        tools=[WEATHER, TIME],
        tool_choice="none",
        temperature=0,
        max_output_tokens=30,
    )
    assert third.output_text == second.output_text
    assert third.usage is not None and second.usage is not None
    assert third.usage.input_tokens == second.usage.input_tokens


def test_retrieve_delete_and_store_false(client: openai.OpenAI, model: str) -> None:
    created = client.responses.create(model=model, input="Hi", max_output_tokens=4, metadata={"k": "v"})
    fetched = client.responses.retrieve(created.id)
    assert fetched.model_dump() == created.model_dump() and fetched.metadata == {"k": "v"}
    client.responses.delete(created.id)
    streamed = list(client.responses.create(model=model, input="Hi", max_output_tokens=4, stream=True))
    final = streamed[-1].response
    assert client.responses.retrieve(final.id).model_dump() == final.model_dump()
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)
    streamed = list(client.responses.create(model=model, input="Hi", max_output_tokens=4, stream=True))
    final = streamed[-1].response
    assert client.responses.retrieve(final.id).model_dump() == final.model_dump()
    unstored = client.responses.create(model=model, input="Hi", max_output_tokens=4, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError) as error:
        client.responses.retrieve(unstored.id)
    assert error.value.body["message"] == f"No response found with id '{unstored.id}'."  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as error:
        client.responses.create(model=model, input="Hi", previous_response_id=unstored.id)
    assert error.value.body["code"] == "previous_response_not_found"  # type: ignore[index]


def test_input_items_and_cancel(client: openai.OpenAI, model: str) -> None:
    """The SDK's input_items.list (paged by its own auto-pagination) and cancel: a continuation lists the
    whole input it answered, the earlier items with the ids they had; cancel names why it cannot."""
    first = client.responses.create(model=model, input="Hi", instructions="Be brief.", max_output_tokens=4)
    second = client.responses.create(
        model=model, input="And again?", previous_response_id=first.id, max_output_tokens=4
    )
    data = client.responses.input_items.list(second.id, order="asc").data
    assert data[0].type == "message" and data[0].role == "user" and data[0].content[0].text == "Hi"
    assert [item.id for item in data[1:-1]] == [item.id for item in first.output]
    assert data[-1].content[0].text == "And again?"  # type: ignore[union-attr]
    assert [item.id for item in client.responses.input_items.list(first.id).data] == [data[0].id]
    paged = [item.id for item in client.responses.input_items.list(second.id, limit=1)]  # newest first
    assert paged == [item.id for item in reversed(data)]
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.cancel(second.id)
    assert error.value.body["param"] == "background"  # type: ignore[index]
    with_body = requests.post(
        f"{client.base_url}responses/{second.id}/cancel", json={"reason": "x"}, timeout=30
    )
    assert with_body.status_code == 400 and with_body.json()["error"]["param"] == "body"
    for call in (client.responses.cancel, client.responses.input_items.list):
        with pytest.raises(openai.NotFoundError):
            call("resp_nope")
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.input_items.list(second.id, limit=1000)
    assert error.value.body["param"] == "limit"  # type: ignore[index]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools"),
        ({"tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "text"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": 10**9}, "max_output_tokens"),
        ({"temperature": 5}, "temperature"),
        ({"background": True}, "background"),
        ({"truncation": "auto"}, "truncation"),
        (
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}
                ]
            },
            "input",
        ),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(
    client: openai.OpenAI, model: str, kwargs: dict, field: str
) -> None:
    body: dict[str, Any] = {"model": model, "input": "Hi", **kwargs}
    with pytest.raises(openai.BadRequestError) as error:
        client.responses.create(**body)
    assert error.value.body["param"] == field  # type: ignore[index]
    assert error.value.body["type"] == "invalid_request_error"  # type: ignore[index]


def test_raw_bad_bodies_are_4xx(default_server: Launched) -> None:
    url = f"{default_server.url}/v1/responses"
    for body in (b"[]", b"{", b'{"input": null}', b'{"input": [{}]}', b'{"input": "x", "tools": "all"}'):
        response = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert 400 <= response.status_code < 500, body
        assert "error" in response.json()
    assert requests.get(f"{url}/resp_nope", params={"stream": "true"}, timeout=30).status_code == 400
    assert requests.delete(f"{url}/resp_nope", timeout=30).json()["error"]["param"] == "response_id"
    items = f"{url}/resp_nope/input_items"
    for query, param in [({"limit": "x"}, "limit"), ({"order": "up"}, "order"), ({"include[]": "a"}, "include"),
                         ({"frob": "1"}, "frob")]:  # fmt: skip
        response = requests.get(items, params=query, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, query
    assert requests.get(items, timeout=30).json()["error"]["param"] == "response_id"
    assert requests.post(f"{url}/resp_nope/cancel", json={"x": 1}, timeout=30).status_code == 404


def test_openai_agents_sdk(client: openai.OpenAI, model: str, default_server: Launched) -> None:
    """The openai-agents SDK's Responses model runs an agent with a function tool: the forced call runs the
    tool, whose result goes back as function_call_output (tool_choice is reset to auto after it) for the
    final answer; and streamed, stopping at the tool's result."""
    agents.set_tracing_disabled(True)
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        seen.append(city)
        return f"It is sunny and 21 degrees in {city}."

    settings = agents.ModelSettings(
        tool_choice="required", parallel_tool_calls=False, temperature=0, max_tokens=400
    )

    async def run() -> tuple[Any, Any, list[str]]:
        client = openai.AsyncOpenAI(base_url=f"{default_server.url}/v1", api_key="unused", max_retries=0)
        responses_model = agents.OpenAIResponsesModel(model=model, openai_client=client)
        agent = agents.Agent(
            name="weather", instructions="Answer with the weather tool.", model=responses_model,
            tools=[get_weather], model_settings=settings,
        )  # fmt: skip
        result = await agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4)
        stopping = agent.clone(tool_use_behavior="stop_on_first_tool")
        streamed = agents.Runner.run_streamed(stopping, "What is the weather in Rome?")
        events = [event.type async for event in streamed.stream_events()]
        await client.close()
        return result, streamed.final_output, events

    result, final, events = asyncio.run(run())
    assert seen and isinstance(result.final_output, str) and result.final_output
    kinds = [item.type for item in result.new_items]
    assert kinds[0] == "tool_call_item" and "tool_call_output_item" in kinds, kinds
    assert kinds[-1] == "message_output_item", kinds
    assert final == f"It is sunny and 21 degrees in {seen[-1]}." and "raw_response_event" in events


THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def test_reasoning_is_an_item_before_the_message(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A tiny random model whose template opens <think>: what it writes is reasoning (it never closes it),
    a reasoning item with the text as its summary, streamed and not."""
    server = Launched(["--model-id", str(tiny_model_dir), "--chat-template", THINK_TEMPLATE]).start(tmp_path)
    try:
        server.wait_healthy(120)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        kwargs: dict[str, Any] = {"model": "tiny", "input": "Hello", "max_output_tokens": 8, "temperature": 0}
        whole = client.responses.create(**kwargs)
        reasoning = whole.output[0]  # cut off while reasoning: no message follows
        assert [item.type for item in whole.output] == ["reasoning"] and whole.status == "incomplete"
        assert reasoning.type == "reasoning" and reasoning.summary[0].text and whole.output_text == ""
        assert whole.usage is not None and 0 < whole.usage.output_tokens_details.reasoning_tokens <= 8
        events = list(client.responses.create(**kwargs, stream=True))
        streamed = "".join(e.delta for e in events if e.type == "response.reasoning_summary_text.delta")
        assert streamed == reasoning.summary[0].text
        assert squeeze([e.type for e in events])[2:5] == [
            "response.output_item.added",
            "response.reasoning_summary_part.added",
            "response.reasoning_summary_text.delta",
        ]
    finally:
        stop_and_check(server)
