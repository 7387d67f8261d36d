"""router/anthropic_api.py: Anthropic's response object, stream events and errors, and the two routes in
process over a scripted model (the real tokenizer, validator, agent, generation state and SSEWriter; the
model's text is given), with the API key in x-api-key."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import test_utils, web

from router import anthropic_api, middleware
from router.agent import Agent, AssistantOutput, OutputPlan
from router.anthropic_api import MessageEvents, content_blocks, error_to_anthropic, matched_stop, message_body
from router.anthropic_params import Thinking
from router.chat import ChatPrompter
from router.entry import Entry
from router.errors import (
    AuthenticationError,
    GenerationError,
    OverloadedError,
    PayloadTooLargeError,
    UnhealthyError,
    ValidationError,
)
from router.generation import Finished, GenerationState, StreamEvent, Token
from router.openai_params import ModelNotFoundError
from router.reasoning import get_reasoning_parser
from router.state import STATE_KEY, RouterState
from router.tokenizer import Tokenizer
from router.toolcalls import get_tool_parser
from router.validation import Validator, ValidRequest

from .test_validation import make_config

pytestmark = pytest.mark.timeout(60)

KEY = "anthropic-test-key"
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


# -- formatting ---------------------------------------------------------------------------------------------
def finished(text: str, reason: str = "eos_token", tokens: int = 3) -> Finished:
    return Finished(text, reason, tokens, None, [], [], [])


def event(delta: str, end: Finished | None = None) -> StreamEvent:
    return StreamEvent(Token(1, delta, -0.1, False), delta, [], end)


def parse_sse(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, payload) pairs; each event's name matches its payload's type."""
    out = []
    for raw in data.decode().split("\n\n"):
        if not raw:
            continue
        name_line, data_line = raw.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        payload = json.loads(data_line[len("data: ") :])
        assert payload["type"] == name_line[len("event: ") :]
        out.append((payload["type"], payload))
    return out


def run_stream(events: MessageEvents, pieces: list[str], end: Finished) -> list[tuple[str, dict[str, Any]]]:
    data = events.start()
    for i, piece in enumerate(pieces):
        data += events(event(piece, end if i == len(pieces) - 1 else None), i + 1)
    return parse_sse(data)


def test_matched_stop_is_the_longest_suffix() -> None:
    assert matched_stop("abc END", ["END", "D"]) == "END"
    assert matched_stop("abc", ["x"]) is None


def test_message_body_text_and_stop_sequence() -> None:
    plan = OutputPlan()
    body = message_body("msg_1", "m", finished("Paris.\nEND", "stop_sequence"), plan, Thinking(), ["END"], 9)
    assert body == {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
        "content": [{"type": "text", "text": "Paris.\n"}],
        "stop_reason": "stop_sequence", "stop_sequence": "END",
        "usage": {"input_tokens": 9, "output_tokens": 3},
    }  # fmt: skip
    assert (
        message_body("i", "m", finished("ab", "length"), plan, Thinking(), [], 1)["stop_reason"]
        == "max_tokens"
    )
    assert message_body("i", "m", finished("ab"), plan, Thinking(), [], 1)["stop_reason"] == "end_turn"
    assert message_body("i", "m", finished(""), plan, Thinking(), [], 1)["content"] == []


def test_message_body_tool_use_and_thinking() -> None:
    plan = OutputPlan(tool_parser=get_tool_parser("hermes"), reasoning_parser=get_reasoning_parser("think"))
    text = f"<think>Use the tool.</think>Let me check.\n{CALL}"
    body = message_body("i", "m", finished(text), plan, Thinking(True), [], 1)
    thinking, said, call = body["content"]
    assert thinking == {"type": "thinking", "thinking": "Use the tool.", "signature": ""}
    assert said == {"type": "text", "text": "Let me check."}
    assert call["type"] == "tool_use" and call["id"].startswith("toolu_") and len(call["id"]) == 30
    assert call["name"] == "get_weather" and call["input"] == {"city": "Paris"}
    assert body["stop_reason"] == "tool_use"
    # thinking not enabled: the reasoning is dropped; omitted: the block is there without its text
    assert [b["type"] for b in message_body("i", "m", finished(text), plan, Thinking(), [], 1)["content"]] == [
        "text", "tool_use",
    ]  # fmt: skip
    omitted = content_blocks(AssistantOutput("why", "ok", []), Thinking(True, False))
    assert omitted == [{"type": "thinking", "thinking": "", "signature": ""}, {"type": "text", "text": "ok"}]


def test_stream_of_plain_text() -> None:
    events = MessageEvents("msg_1", "m", 5, OutputPlan(), Thinking(), [])
    out = run_stream(events, ["Hel", "lo", ""], finished("Hello", tokens=3))
    assert [name for name, _ in out] == [
        "message_start", "ping", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop", "message_delta", "message_stop",
    ]  # fmt: skip
    start = out[0][1]["message"]
    assert start == {"id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
                     "stop_reason": None, "stop_sequence": None,
                     "usage": {"input_tokens": 5, "output_tokens": 0}}  # fmt: skip
    assert out[2][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert out[3][1] == {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "Hel"},
    }
    assert out[5][1] == {"type": "content_block_stop", "index": 0}
    assert out[6][1] == {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                         "usage": {"input_tokens": 5, "output_tokens": 3}}  # fmt: skip


def test_stream_cuts_the_stop_sequence() -> None:
    events = MessageEvents("i", "m", 1, OutputPlan(), Thinking(), ["STOP"])
    out = run_stream(events, ["One", " two STOP"], finished("One two STOP", "stop_sequence"))
    text = "".join(p["delta"]["text"] for name, p in out if name == "content_block_delta")
    assert text == "One two "
    assert out[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "STOP"}


def test_stream_with_thinking_and_a_tool_call_at_every_split() -> None:
    plan = OutputPlan(tool_parser=get_tool_parser("hermes"), reasoning_parser=get_reasoning_parser("think"))
    text = f"<think>Use the tool.</think>Let me check.\n{CALL}"
    for split in range(1, len(text)):
        events = MessageEvents("i", "m", 1, plan, Thinking(True), [])
        out = run_stream(events, [text[:split], text[split:]], finished(text))
        starts = [p["content_block"] for name, p in out if name == "content_block_start"]
        assert [b["type"] for b in starts] == ["thinking", "text", "tool_use"], split
        assert starts[2]["name"] == "get_weather" and starts[2]["input"] == {}
        by_block: dict[int, str] = {}
        for name, p in out:
            if name == "content_block_delta":
                delta = p["delta"]
                piece = delta.get("thinking", delta.get("text", delta.get("partial_json")))
                by_block[p["index"]] = by_block.get(p["index"], "") + piece
        assert by_block[0] == "Use the tool." and by_block[1] == "Let me check."
        assert json.loads(by_block[2]) == {"city": "Paris"}
        assert [p["index"] for name, p in out if name == "content_block_stop"] == [0, 1, 2]
        assert out[-2][1]["delta"]["stop_reason"] == "tool_use"
    # thinking not enabled: no thinking block; the text block is the first
    events = MessageEvents("i", "m", 1, plan, Thinking(), [])
    out = run_stream(events, [text], finished(text))
    assert [p["content_block"]["type"] for name, p in out if name == "content_block_start"] == [
        "text",
        "tool_use",
    ]


def test_error_shapes() -> None:
    cases = [
        (ValidationError("`x` is bad", "x"), 400, "invalid_request_error", "`x` is bad"),
        (ModelNotFoundError("no such model"), 404, "not_found_error", "no such model"),
        (OverloadedError(), 429, "rate_limit_error", "Model is overloaded"),
        (UnhealthyError("loading"), 503, "overloaded_error", "loading"),
        (AuthenticationError("invalid API key"), 401, "authentication_error", "invalid API key"),
        (PayloadTooLargeError(10, 20), 413, "request_too_large", "larger than"),
        (web.HTTPUnsupportedMediaType(text='{"error": "Expected json"}'), 415, "invalid_request_error",
         "Expected json"),
        (GenerationError("the shard failed"), 500, "api_error", "the shard failed"),
    ]  # fmt: skip
    for error, status, kind, message in cases:
        response = error_to_anthropic(error)
        assert response.status == status
        assert response.text is not None
        body = json.loads(response.text)
        assert (
            body["type"] == "error" and body["error"]["type"] == kind and message in body["error"]["message"]
        )


# -- the routes in process ----------------------------------------------------------------------------------
class ScriptedInfer:
    """Infer's surface the routes use, over a model that answers ``script`` (then its end-of-sequence
    token): each token goes through the real GenerationState (stop sequences, max_tokens)."""

    def __init__(self, tokenizer: Tokenizer, validator: Validator) -> None:
        self.tokenizer = tokenizer
        self.validator = validator
        self.config = validator.config
        self.info = SimpleNamespace(vocab_size=0)
        self.ready = True
        counter = SimpleNamespace(inc=lambda: None)
        self.metrics = SimpleNamespace(
            request_count=counter, request_failure=SimpleNamespace(labels=lambda _: counter)
        )
        self.script: str | list[str] = ""  # a list: one script per request, in turn
        self.requests: list[ValidRequest] = []
        self.eos = tokenizer.hf.eos_token_id

    @contextlib.contextmanager
    def admit(self) -> Iterator[SimpleNamespace]:
        yield SimpleNamespace(need=lambda *_: None)

    @contextlib.asynccontextmanager
    async def request(self, valid: ValidRequest, group: int = 0) -> AsyncIterator[Entry]:
        self.requests.append(valid)
        entry = Entry(
            len(self.requests), valid, GenerationState(valid, self.tokenizer, frozenset([self.eos]))
        )
        script = self.script if isinstance(self.script, str) else self.script.pop(0)
        ids = [*self.tokenizer.encode(script, False), self.eos]
        asyncio.get_running_loop().call_soon(self._feed, entry, ids)
        yield entry

    def _feed(self, entry: Entry, ids: list[int]) -> None:
        for i, token in enumerate(ids):
            ended = None
            if i == len(ids) - 1:
                ended = "eos_token"
            elif i + 1 == entry.request.max_new_tokens:
                ended = "length"
            out = entry.state.push(token, -0.1, [], ended=ended)
            entry.events.put(out)
            if out.finished is not None:
                return

    async def stream_batches(self, entry: Entry) -> AsyncIterator[list[StreamEvent]]:
        while True:
            await entry.events.wait()
            batch = [e for e in entry.events.take_all() if isinstance(e, StreamEvent)]
            yield batch
            if batch and batch[-1].finished is not None:
                return

    async def generate(self, entry: Entry) -> Finished:
        async for batch in self.stream_batches(entry):
            if batch and batch[-1].finished is not None:
                return batch[-1].finished
        raise AssertionError("no last event")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_model_dir)


@pytest.fixture
async def server(
    tiny_model_dir: Path, tokenizer: Tokenizer
) -> AsyncIterator[tuple[test_utils.TestClient, ScriptedInfer]]:
    config = make_config(tiny_model_dir, api_key=KEY, max_input_length=2000, max_total_tokens=2048)
    validator = Validator(config, tokenizer, (), "", ("grammar",))
    infer = ScriptedInfer(tokenizer, validator)
    app = web.Application(middlewares=middleware.middlewares(config))
    agent = Agent(ChatPrompter(tokenizer, None, None), tokenizer, "hermes", "think")
    app[STATE_KEY] = RouterState(config, infer=infer, agent=agent)  # type: ignore[arg-type]
    anthropic_api.add_routes(app)
    async with test_utils.TestClient(test_utils.TestServer(app)) as client:
        yield client, infer
    validator.close()


HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
BODY = {"model": "tiny", "max_tokens": 400, "messages": [{"role": "user", "content": "Capital of France?"}]}


async def test_messages_and_stream(server: tuple[test_utils.TestClient, ScriptedInfer]) -> None:
    client, infer = server
    infer.script = "<think>Easy.</think>Paris is the capital. END of answer"
    body = {**BODY, "stop_sequences": ["END"], "thinking": {"type": "adaptive"}, "temperature": 0}
    response = await client.post("/v1/messages", json=body, headers=HEADERS)
    whole = await response.json()
    assert response.status == 200, whole
    assert whole["id"].startswith("msg_") and whole["model"] == "tiny"
    assert whole["content"] == [{"type": "thinking", "thinking": "Easy.", "signature": ""},
                                {"type": "text", "text": "Paris is the capital. "}]  # fmt: skip
    assert whole["stop_reason"] == "stop_sequence" and whole["stop_sequence"] == "END"
    assert whole["usage"]["input_tokens"] == infer.requests[-1].input_length
    assert infer.requests[-1].inputs.endswith("assistant\n")  # rendered by the chat template
    response = await client.post("/v1/messages", json={**body, "stream": True}, headers=HEADERS)
    assert response.headers["Content-Type"].startswith("text/event-stream")
    out = parse_sse(await response.read())
    assert [n for n, _ in out][:2] == ["message_start", "ping"] and out[-1][0] == "message_stop"
    text = "".join(p["delta"].get("text", "") for n, p in out if n == "content_block_delta")
    assert text == "Paris is the capital. "
    assert out[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}
    assert out[-2][1]["usage"]["output_tokens"] == whole["usage"]["output_tokens"]


async def test_forced_tool_call(server: tuple[test_utils.TestClient, ScriptedInfer]) -> None:
    client, infer = server
    infer.script = CALL
    body = {**BODY, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather"}}
    response = await client.post("/v1/messages", json=body, headers=HEADERS)
    whole = await response.json()
    assert response.status == 200, whole
    [block] = whole["content"]
    assert (
        block["type"] == "tool_use"
        and block["input"] == {"city": "Paris"}
        and whole["stop_reason"] == "tool_use"
    )
    processors = dict(infer.requests[-1].parameters.processors)
    assert "grammar" in processors and "get_weather" in processors["grammar"]  # the call is constrained
    assert "get_weather" in infer.requests[-1].inputs  # the tools are in the prompt
    # the result goes back as a tool message
    history = [*BODY["messages"], {"role": "assistant", "content": [block]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"], "content": "22C"}]}]  # fmt: skip
    infer.script = "It is 22C."
    response = await client.post(
        "/v1/messages", json={**BODY, "tools": [WEATHER], "messages": history}, headers=HEADERS
    )
    assert (await response.json())["content"] == [{"type": "text", "text": "It is 22C."}]
    assert "<tool_response>\n22C\n</tool_response>" in infer.requests[-1].inputs
    response = await client.post(
        "/v1/messages/count_tokens",
        json={"model": "x", "messages": history, "tools": [WEATHER]},
        headers=HEADERS,
    )
    assert await response.json() == {"input_tokens": infer.requests[-1].input_length}


async def test_bad_input_and_the_api_key(server: tuple[test_utils.TestClient, ScriptedInfer]) -> None:
    client, _ = server
    for body, words in (
        ({**BODY, "max_tokens": None}, "`max_tokens` is required"),
        ({**BODY, "top_logprobs": 2}, "unsupported parameter `top_logprobs`"),
        (
            {**BODY, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "`image` block",
        ),
    ):
        response = await client.post("/v1/messages", json=body, headers=HEADERS)
        error = await response.json()
        assert response.status == 400 and error["type"] == "error", error
        assert error["error"]["type"] == "invalid_request_error" and words in error["error"]["message"]
    response = await client.get("/v1/messages", headers=HEADERS)
    assert response.status == 405 and (await response.json())["error"]["type"] == "invalid_request_error"
    assert response.headers["Allow"] == "POST"
    response = await client.post(
        "/v1/messages", data=b"{", headers={**HEADERS, "Content-Type": "application/json"}
    )
    assert response.status == 400 and (await response.json())["error"]["type"] == "invalid_request_error"
    for headers, message in (({}, "x-api-key"), ({"x-api-key": "wrong"}, "invalid API key")):
        response = await client.post("/v1/messages", json=BODY, headers=headers)
        error = await response.json()
        assert response.status == 401 and error["error"] == {
            "type": "authentication_error",
            "message": error["error"]["message"],
        }
        assert message in error["error"]["message"] and KEY not in await response.text()
    response = await client.post(
        "/v1/messages/count_tokens",
        json={"model": "x", "messages": BODY["messages"]},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert response.status == 200


async def test_thinking_budget(server: tuple[test_utils.TestClient, ScriptedInfer]) -> None:
    """Budget forcing: the first phase stops at the budget (the thought is then closed for it) or at the
    end of the thought; the second continues the same text; they read as one answer."""
    client, infer = server
    thought = "<think>" + "hmm " * 40
    cut = infer.tokenizer.decode(infer.tokenizer.encode(thought, False)[:10])
    for stream in (False, True):
        infer.script = [thought + "</think>never reached", "Paris."]
        body = {**BODY, "thinking": {"type": "enabled", "budget_tokens": 10}, "stream": stream}
        response = await client.post("/v1/messages", json=body, headers=HEADERS)
        raw = await response.read()
        first, second = infer.requests[-2:]
        assert first.max_new_tokens == 10 and "</think>" in first.stop
        assert second.inputs == first.inputs + cut + "\n</think>\n\n"
        assert second.max_new_tokens == 400 - 10 and "</think>" not in second.stop
        if stream:
            out = parse_sse(raw)
            blocks = [p["content_block"]["type"] for n, p in out if n == "content_block_start"]
            text = "".join(p["delta"].get("text", "") for n, p in out if n == "content_block_delta")
            assert blocks == ["thinking", "text"] and text == "Paris."
            usage = out[-2][1]["usage"]
        else:
            whole = json.loads(raw)
            assert [b["type"] for b in whole["content"]] == ["thinking", "text"]
            assert (
                whole["content"][0]["thinking"].startswith("hmm") and whole["content"][1]["text"] == "Paris."
            )
            assert whole["stop_reason"] == "end_turn"
            usage = whole["usage"]
        assert usage["output_tokens"] == 10 + len(infer.tokenizer.encode("Paris.", False)) + 1
    # a thought within the budget: the first phase stops at its end
    infer.script = ["<think>short</think>", "Rome."]
    body = {**BODY, "thinking": {"type": "enabled", "budget_tokens": 100}}
    whole = await (await client.post("/v1/messages", json=body, headers=HEADERS)).json()
    assert whole["content"] == [{"type": "thinking", "thinking": "short", "signature": ""},
                                {"type": "text", "text": "Rome."}]  # fmt: skip
    assert infer.requests[-1].inputs.endswith("<think>short</think>")
    # a budget of max_tokens or more is refused, as Anthropic does
    response = await client.post("/v1/messages", json={**body, "max_tokens": 100}, headers=HEADERS)
    assert (
        response.status == 400
        and "`thinking.budget_tokens` (100)" in (await response.json())["error"]["message"]
    )
