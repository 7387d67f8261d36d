"""The official anthropic SDK against the server, unchanged: messages.create and messages.stream, a forced
tool call (a tool_use block whose input follows the schema) and a tool_result round trip, count_tokens, bad
input in Anthropic's error shape, and the API key in x-api-key.

The default model has no tool-aware template: it gets the generic rendering and the hermes parser, and
forced calls (``tool_choice`` any or tool) are valid by constrained decoding."""

from __future__ import annotations

import collections
import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import jsonschema
import pytest
import requests

from .conftest import stop_and_check
from .harness import Launched
from .test_fuzz import FORBIDDEN, mutate_bytes, weird
from .test_tools import ASK, WEATHER_SCHEMA
from .test_tools import TOOLS as OPENAI_TOOLS

pytestmark = pytest.mark.timeout(600)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# The tools of test_tools.py, in Anthropic's shape.
TOOLS = [
    {"name": f["name"], "description": f["description"], "input_schema": f["parameters"]}
    for f in (tool["function"] for tool in OPENAI_TOOLS)
]
MODEL = "claude-sonnet-4-5"  # any name is served by the one model
# Recent SDKs no longer send sampling parameters; the server still honours them (greedy here).
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def client(default_server: Launched) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=default_server.url, api_key="unused", max_retries=0, timeout=300)


def text_of(message: anthropic.types.Message) -> str:
    return "".join(block.text for block in message.content if block.type == "text")


def test_create_names_paris(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL, max_tokens=20, **GREEDY, system="You answer in one sentence.", messages=QUESTION
    )
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "Paris" in text_of(message) and message.stop_reason in ("end_turn", "max_tokens")
    assert message.stop_sequence is None and message.usage.output_tokens > 0
    counted = client.messages.count_tokens(
        model=MODEL, system="You answer in one sentence.", messages=QUESTION
    )
    assert counted.input_tokens == message.usage.input_tokens


def test_stream_equals_create(client: anthropic.Anthropic) -> None:
    kwargs = {"model": MODEL, "max_tokens": 30, **GREEDY, "messages": QUESTION}
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == text_of(whole)
    assert text_of(final) == text_of(whole) and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_the_raw_stream_is_anthropics(default_server: Launched) -> None:
    body = {"model": MODEL, "max_tokens": 5, "temperature": 0, "messages": QUESTION, "stream": True}
    response = requests.post(f"{default_server.url}/v1/messages", json=body, timeout=120)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    names = [line[len("event: ") :] for line in response.text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}


def test_stop_sequences(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL, max_tokens=20, **GREEDY, messages=QUESTION, stop_sequences=[" Paris", "zzz"]
    )
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == " Paris"
    assert "Paris" not in text_of(message)
    with client.messages.stream(
        model=MODEL, max_tokens=20, **GREEDY, messages=QUESTION, stop_sequences=[" Paris"]
    ) as stream:
        final = stream.get_final_message()
    assert text_of(final) == text_of(message) and final.stop_sequence == " Paris"


def test_forced_tool_calls_are_valid(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL, max_tokens=80, **GREEDY, messages=ASK, tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
    )  # fmt: skip
    assert message.stop_reason == "tool_use"
    [call] = [b for b in message.content if b.type == "tool_use"]
    assert call.id.startswith("toolu_") and call.name == "get_weather"
    jsonschema.validate(call.input, WEATHER_SCHEMA)
    anyone = client.messages.create(
        model=MODEL, max_tokens=80, **GREEDY, messages=ASK, tools=TOOLS,
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
    )  # fmt: skip
    calls = [b for b in anyone.content if b.type == "tool_use"]
    assert (
        len(calls) == 1 and calls[0].name in ("get_weather", "get_time") and anyone.stop_reason == "tool_use"
    )


def test_streamed_tool_call(client: anthropic.Anthropic) -> None:
    kwargs = {"model": MODEL, "max_tokens": 80, **GREEDY, "messages": ASK, "tools": TOOLS,
              "tool_choice": {"type": "tool", "name": "get_weather"}}  # fmt: skip
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events)
    [call] = [b for b in final.content if b.type == "tool_use"]
    [expected] = [b for b in whole.content if b.type == "tool_use"]
    assert call.name == expected.name and call.input == expected.input and final.stop_reason == "tool_use"


def test_tool_result_round_trip(client: anthropic.Anthropic) -> None:
    first = client.messages.create(
        model=MODEL, max_tokens=80, **GREEDY, messages=ASK, tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
    )  # fmt: skip
    [call] = [b for b in first.content if b.type == "tool_use"]
    history = [
        *ASK,
        {"role": "assistant", "content": first.content},  # the SDK's blocks, as Anthropic's docs pass them
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "22 degrees, sunny"}]},
    ]  # fmt: skip
    answer = client.messages.create(
        model=MODEL, max_tokens=30, **GREEDY, messages=history, tools=TOOLS, tool_choice={"type": "none"}
    )
    assert answer.stop_reason in ("end_turn", "max_tokens") and text_of(answer)
    assert all(b.type == "text" for b in answer.content)
    counted = client.messages.count_tokens(
        model=MODEL, messages=history, tools=TOOLS, tool_choice={"type": "none"}
    )
    assert counted.input_tokens == answer.usage.input_tokens
    # an assistant prefill: the answer continues it
    prefilled = client.messages.create(
        model=MODEL, max_tokens=10, **GREEDY,
        messages=[*QUESTION, {"role": "assistant", "content": "The capital of France is"}],
    )  # fmt: skip
    assert "Paris" in text_of(prefilled) and not text_of(prefilled).startswith("The capital")


def test_output_config_format(client: anthropic.Anthropic) -> None:
    message = client.messages.create(
        model=MODEL, max_tokens=60, messages=ASK, **GREEDY,
        output_config={"format": {"type": "json_schema", "schema": WEATHER_SCHEMA}},
    )  # fmt: skip
    jsonschema.validate(json.loads(text_of(message)), WEATHER_SCHEMA)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"max_tokens": 5}, "`messages` must be a non-empty array"),
        ({"messages": QUESTION}, "`max_tokens` is required"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
         "`image` block"),
        ({"max_tokens": 5, "messages": QUESTION, "thinking": {"type": "enabled", "budget_tokens": 5}},
         "`thinking.budget_tokens` (5) must be less than `max_tokens` (5)"),
        ({"max_tokens": 5, "messages": QUESTION, "temperature": 1.5}, "`temperature`"),
        ({"max_tokens": 5, "messages": QUESTION, "tools": [{"name": "x", "input_schema": {"type": "object"}}],
          "tool_choice": {"type": "tool", "name": "y"}}, "not in `tools`"),
        ({"max_tokens": 5, "messages": QUESTION, "mcp_servers": []}, "unsupported parameter `mcp_servers`"),
        ({"max_tokens": 100000, "messages": QUESTION}, "`max_tokens`"),
    ],
)  # fmt: skip
def test_bad_input_is_a_400_in_anthropics_shape(client: anthropic.Anthropic, body: dict, words: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as excinfo:
        client.post("/v1/messages", body={"model": MODEL, **body}, cast_to=anthropic.types.Message)
    error = excinfo.value.body
    assert excinfo.value.status_code == 400 and error["type"] == "error", error
    assert error["error"]["type"] == "invalid_request_error" and words in error["error"]["message"]


def test_bad_bodies_never_get_a_5xx(default_server: Launched) -> None:
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        for data, content_type in ((b"{", "application/json"), (b"[]", "application/json"),
                                   (b'{"messages": 5}', "application/json"), (b"hi", "text/plain")):  # fmt: skip
            response = requests.post(
                default_server.url + path, data=data, headers={"Content-Type": content_type}
            )
            assert 400 <= response.status_code < 500, (path, data, response.text)
            assert (
                response.json()["type"] == "error"
                and response.json()["error"]["type"] == "invalid_request_error"
            )


# -- thinking ---------------------------------------------------------------------------------------------
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def test_thinking_blocks(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A tiny random model whose template opens <think>: its whole answer is reasoning (it never closes
    it). With thinking adaptive it comes back as a thinking block, streamed and not; without, it is dropped;
    --strict-model-name gives an unknown model Anthropic's 404."""
    args = ["--model-id", str(tiny_model_dir), "--chat-template", THINK_TEMPLATE, "--strict-model-name"]
    server = Launched(args).start(tmp_path)
    try:
        server.wait_healthy(120)
        client = anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=60)
        kwargs = {"model": str(tiny_model_dir), "messages": ASK, "max_tokens": 8, **GREEDY}
        message = client.messages.create(**kwargs, thinking={"type": "adaptive"})
        [block] = message.content
        assert block.type == "thinking" and block.thinking and block.signature == ""
        with client.messages.stream(**kwargs, thinking={"type": "adaptive"}) as stream:
            events = list(stream)
            final = stream.get_final_message()
        streamed = "".join(e.delta.thinking for e in events if e.type == "content_block_delta")
        assert streamed == block.thinking and final.content[0].thinking == block.thinking
        assert client.messages.create(**kwargs).content == []  # thinking not asked for: dropped
        # a budget: the thought stops after 3 tokens and the answer follows it, streamed and not
        budget = {**kwargs, "max_tokens": 12, "thinking": {"type": "enabled", "budget_tokens": 3}}
        budgeted = client.messages.create(**budget)
        assert budgeted.content[0].type == "thinking" and budgeted.usage.output_tokens <= 12
        assert len(budgeted.content[0].thinking) < len(block.thinking)
        with client.messages.stream(**budget) as stream:
            streamed_blocks = stream.get_final_message().content

        def shown(blocks: list) -> list[tuple[str, str]]:
            return [(b.type, b.thinking if b.type == "thinking" else b.text) for b in blocks]

        assert shown(streamed_blocks) == shown(budgeted.content)
        omitted = client.messages.create(**kwargs, thinking={"type": "adaptive", "display": "omitted"})
        assert [(b.type, b.thinking) for b in omitted.content] == [("thinking", "")]
        with pytest.raises(anthropic.NotFoundError) as excinfo:
            client.messages.create(**{**kwargs, "model": "dummy"})
        assert excinfo.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    finally:
        stop_and_check(server)


# -- the API key --------------------------------------------------------------------------------------------
KEY = "anthropic-e2e-key-5c1"


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    server = Launched(["--model-id", str(tiny_model_dir)], env={"API_KEY": KEY})
    server.start(tmp_path_factory.mktemp("anthropic-auth"))
    try:
        server.wait_healthy(120)
        yield server
    finally:
        stop_and_check(server)


def test_x_api_key(keyed_server: Launched) -> None:
    def sdk(**kwargs: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=keyed_server.url, max_retries=0, timeout=60, **kwargs)

    message = sdk(api_key=KEY).messages.create(model="tiny", max_tokens=2, messages=QUESTION)
    assert message.usage.output_tokens >= 1
    assert (
        sdk(auth_token=KEY).messages.count_tokens(model="tiny", messages=QUESTION).input_tokens > 0
    )  # Bearer
    for kwargs in ({"api_key": "wrong"}, {"auth_token": "wrong"}):
        with pytest.raises(anthropic.AuthenticationError) as excinfo:
            sdk(**kwargs).messages.create(model="tiny", max_tokens=2, messages=QUESTION)
        assert excinfo.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        assert KEY not in str(excinfo.value.body)
    response = requests.post(f"{keyed_server.url}/v1/messages", json={"model": "tiny"}, timeout=30)
    assert response.status_code == 401 and "x-api-key" in response.json()["error"]["message"]
    # x-api-key is the Anthropic routes' header: the others still want Bearer
    response = requests.post(f"{keyed_server.url}/v1/chat/completions", headers={"x-api-key": KEY},
                             json={"messages": QUESTION, "max_tokens": 1}, timeout=30)  # fmt: skip
    assert response.status_code == 401


# -- fuzz ---------------------------------------------------------------------------------------------------
MESSAGES_FIELDS = ("model", "max_tokens", "messages", "system", "tools", "tool_choice", "stop_sequences",
                   "temperature", "top_p", "top_k", "metadata", "stream", "thinking", "output_config",
                   "service_tier", "cache_control")  # fmt: skip
BLOCK_KEYS = ("type", "text", "id", "name", "input", "tool_use_id", "content", "is_error", "cache_control",
              "source", "citations")  # fmt: skip
BLOCK_TYPES = (
    "text",
    "tool_use",
    "tool_result",
    "image",
    "document",
    "thinking",
    "redacted_thinking",
    "x",
    None,
)


def odd_messages_body(rng: random.Random) -> dict:
    """A valid Messages body (with a tool_use / tool_result exchange) with one to three parts set to
    something odd."""
    tool = {
        "name": "f",
        "description": "d",
        "input_schema": {"type": "object", "properties": {"a": {"type": "string"}}},
    }
    use = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": "x"}}
    said = {"type": "text", "text": "ok"}
    system = {"type": "text", "text": "Be brief."}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [said]}
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [use]},
                {"role": "user", "content": [result]}]  # fmt: skip
    body: dict = {
        "model": "m", "max_tokens": 3, "system": [system], "tools": [tool],
        "messages": messages,
    }  # fmt: skip
    for _ in range(rng.choice((1, 1, 2, 3))):
        kind = rng.random()
        if kind < 0.3:
            body[rng.choice(MESSAGES_FIELDS)] = weird(rng)
        elif kind < 0.55:
            block = rng.choice((use, result, said, system))
            block[rng.choice(BLOCK_KEYS)] = rng.choice(BLOCK_TYPES) if rng.random() < 0.3 else weird(rng)
        elif kind < 0.65:
            message = rng.choice(messages)
            message[rng.choice(("role", "content", "name"))] = weird(rng)
        elif kind < 0.75:
            tool[rng.choice(("name", "description", "input_schema", "type", "strict"))] = weird(rng)
        elif kind < 0.85:
            body["tool_choice"] = rng.choice(({"type": "tool", "name": weird(rng)}, {"type": weird(rng)},
                                              {"type": "any", "disable_parallel_tool_use": weird(rng)}))  # fmt: skip
        elif kind < 0.9:
            body["thinking"] = {
                "type": rng.choice(("adaptive", "enabled", "disabled")),
                "display": weird(rng),
            }
        elif kind < 0.95:
            body["output_config"] = {"format": {"type": "json_schema", "schema": weird(rng)}}
        elif body:
            del body[rng.choice(list(body))]
    return body


def test_fuzz_never_gets_a_5xx(default_server: Launched) -> None:
    rng = random.Random(18)
    cases = []
    for i in range(400):
        body = odd_messages_body(rng)
        path = "/v1/messages"
        if i % 5 == 4:  # count_tokens takes the same body without max_tokens
            path = "/v1/messages/count_tokens"
            body.pop("max_tokens", None)
        raw = json.dumps(body, allow_nan=True).encode()
        cases.append((path, mutate_bytes(rng, raw) if i % 4 == 3 else raw))

    def one(case: tuple[str, bytes]) -> str:
        path, raw = case
        response = requests.post(default_server.url + path, data=raw, timeout=120,
                                 headers={"Content-Type": "application/json"})  # fmt: skip
        text = response.text
        if response.status_code >= 500 or FORBIDDEN.search(text):
            return f"{response.status_code} {path} {raw[:200]!r} -> {text[:300]}"
        if response.status_code >= 400:
            error = response.json()
            if error.get("type") != "error" or not error["error"]["message"] or response.status_code != 400:
                return f"not Anthropic's 400: {path} {raw[:200]!r} -> {text[:300]}"
        return str(response.status_code)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, cases))
    statuses = collections.Counter(r for r in results if r.isdigit())
    print(f"\n{len(cases)} Messages fuzz cases: {dict(statuses)}")
    problems = [r for r in results if not r.isdigit()]
    assert not problems, "\n".join(problems[:10])
    assert statuses["200"] > 15 and statuses["400"] > 100
