"""The Anthropic Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

A request is parsed into the API-neutral values of router/agent.py (anthropic_params.py), rendered and
planned by the model's ``Agent`` (tools, forced calls by constrained decoding, reasoning), validated into
a ``ValidRequest`` by the same sampling rules as every route (``parse_options``, ``build_requests``), run
by ``Infer``, and streamed through the ``SSEWriter``; only the shapes are Anthropic's:

- the response: ``{"id": "msg_...", "type": "message", "role": "assistant", "model", "content": [blocks],
  "stop_reason", "stop_sequence", "usage": {"input_tokens", "output_tokens"}}``, whose blocks are
  ``thinking`` (when the request enables it and the model reasons; ``signature`` is empty: nothing here
  signs), ``text`` and ``tool_use`` (``id`` ``toolu_...``, ``name``, ``input`` object), in that order;
- ``stop_reason``: ``max_tokens`` (cut by ``max_tokens``), ``stop_sequence`` (with the one that matched in
  ``stop_sequence``; the text ends before it), ``tool_use`` (the answer made calls), else ``end_turn``;
- the stream: ``event:`` / ``data:`` pairs as Anthropic sends them: ``message_start`` (the message, no
  content yet), ``ping``, then per block ``content_block_start``, ``content_block_delta`` (``text_delta``,
  ``thinking_delta`` or ``input_json_delta``) and ``content_block_stop``, then ``message_delta`` (stop
  reason, stop sequence, usage) and ``message_stop``; a failure after the headers went out is an ``error``
  event. A tool call's block opens once the call is complete (the parsers release whole calls);
- errors: ``{"type": "error", "error": {"type": "invalid_request_error", "message": ...}}`` with
  Anthropic's types per status (400 invalid_request_error, 401 authentication_error, 404 not_found_error,
  413 request_too_large, 429 rate_limit_error, 503 overloaded_error, other 5xx api_error). Bad input is
  always a 4xx. The middlewares answer these paths in this shape too (``is_anthropic_path``), and accept the
  API key in ``x-api-key`` as well as ``Authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from .agent import Agent, AssistantOutput, OutputDelta, OutputPlan, ReasoningDelta, Turn
from .anthropic_params import (
    Conversation,
    Thinking,
    parse_conversation,
    parse_model,
    parse_request_extras,
    parse_sampling,
)
from .body import read_json_object
from .call_grammar import THINK_PARSERS
from .errors import (
    AuthenticationError,
    InferError,
    OverloadedError,
    PayloadTooLargeError,
    UnhealthyError,
    ValidationError,
)
from .generation import Finished, StreamEvent
from .infer import Infer
from .openai_api import Handler, error_route
from .openai_params import Fields, ModelNotFoundError, Options, build_requests, check_model
from .sse import SSEWriter, json_text, write_stream
from .state import get_agent, get_infer
from .toolcalls import ContentDelta, ToolCall, ToolCallDelta
from .toolcalls.base import random_alphanumeric
from .validation import ValidRequest

PATHS = frozenset({"/v1/messages", "/v1/messages/count_tokens"})
RETRY_AFTER_S = "1"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Anthropic's error type for each status this router answers with.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error"}  # fmt: skip


def is_anthropic_path(path: str) -> bool:
    return path in PATHS


def new_message_id() -> str:
    return "msg_" + random_alphanumeric(24)


def new_tool_use_id() -> str:
    return "toolu_" + random_alphanumeric(24)


# -- errors -------------------------------------------------------------------------------------------------
def anthropic_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """Anthropic's error body, typed by ``status``."""
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    body = {"type": "error", "error": {"type": kind, "message": message}}
    return web.json_response(body, status=status, headers=headers)


def error_to_anthropic(error: BaseException) -> web.Response:
    """The router's errors as Anthropic answers them; bad input of any kind is a 400."""
    if isinstance(error, ValidationError):
        return anthropic_error(400, error.detail)
    if isinstance(error, ModelNotFoundError):
        return anthropic_error(404, error.message)
    if isinstance(error, OverloadedError):
        return anthropic_error(429, error.message, {"Retry-After": RETRY_AFTER_S})
    if isinstance(error, UnhealthyError):
        return anthropic_error(503, error.message, {"Retry-After": RETRY_AFTER_S})
    if isinstance(error, AuthenticationError):
        return anthropic_error(401, error.message, {"WWW-Authenticate": "Bearer"})
    if isinstance(error, PayloadTooLargeError):
        return anthropic_error(413, error.message)
    if isinstance(error, web.HTTPException):
        message = error.reason
        with contextlib.suppress(ValueError, TypeError, KeyError):
            message = json.loads(error.text or "")["error"]
        return anthropic_error(error.status, message)
    if isinstance(error, InferError):
        return anthropic_error(error.status if error.status >= 500 else 500, error.message)
    return anthropic_error(500, "internal server error")


def anthropic_route(handler: Handler) -> Handler:
    """Errors raised by a Messages handler leave in Anthropic's shape."""
    return error_route(handler, error_to_anthropic)


# -- the answer ---------------------------------------------------------------------------------------------
def matched_stop(text: str, stops: list[str]) -> str | None:
    """The stop sequence that ended ``text`` (generated with the stop kept): the longest one it ends with,
    which is the one the stop matcher found (the first to complete, then the earliest to start)."""
    ends = [s for s in stops if text.endswith(s)]
    return max(ends, key=len) if ends else None


def stop_reason(finished: Finished, calls: int, stop_sequence: str | None) -> str:
    if finished.finish_reason == "length":
        return "max_tokens"
    if stop_sequence is not None:
        return "stop_sequence"
    return "tool_use" if calls else "end_turn"


def tool_use_block(call: ToolCall) -> dict[str, Any]:
    """A call as a ``tool_use`` block (the parsers guarantee arguments that are a JSON object)."""
    return {
        "type": "tool_use",
        "id": new_tool_use_id(),
        "name": call.name,
        "input": json.loads(call.arguments),
    }


def content_blocks(output: AssistantOutput, thinking: Thinking) -> list[dict[str, Any]]:
    """The blocks of a whole answer: thinking (when enabled), text, then one tool_use per call."""
    blocks: list[dict[str, Any]] = []
    if thinking.enabled and output.reasoning:
        text = output.reasoning if thinking.shown else ""
        blocks.append({"type": "thinking", "thinking": text, "signature": ""})
    if output.content:
        blocks.append({"type": "text", "text": output.content})
    blocks.extend(tool_use_block(call) for call in output.calls)
    return blocks


def message_head(message_id: str, model: str) -> dict[str, Any]:
    return {"id": message_id, "type": "message", "role": "assistant", "model": model}


def message_body(
    message_id: str, model: str, finished: Finished, plan: OutputPlan, thinking: Thinking, stops: list[str],
    input_tokens: int,
) -> dict[str, Any]:  # fmt: skip
    """The whole response to a non-streamed request."""
    text = finished.generated_text
    stop_sequence = matched_stop(text, stops) if finished.finish_reason == "stop_sequence" else None
    if stop_sequence is not None:
        text = text[: len(text) - len(stop_sequence)]
    output = plan.parse(text) if plan.parses else AssistantOutput("", text, [])
    return {
        **message_head(message_id, model),
        "content": content_blocks(output, thinking),
        "stop_reason": stop_reason(finished, len(output.calls), stop_sequence),
        "stop_sequence": stop_sequence,
        "usage": {"input_tokens": input_tokens, "output_tokens": finished.generated_tokens},
    }


def sse_event(name: str, payload: dict[str, Any]) -> bytes:
    """One SSE event as Anthropic writes them: ``event: <name>`` then ``data: <compact JSON>``."""
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"event: {name}\ndata: {data}\n\n".encode()


class MessageEvents:
    """One streamed message: ``start()`` (message_start, ping), then each StreamEvent as its Anthropic
    events (the SSEWriter's ``format_event``, called in order, once per event), ending with the last
    event's message_delta and message_stop; ``error()`` for a failure mid-stream.

    Plain answers (nothing to parse) take the per-token path: one text_delta from cached bytes around the
    token's text. Parsed answers go through the plan's ``OutputStream``: reasoning into thinking blocks
    (or dropped), content into text blocks, each call into a tool_use block with its arguments as
    input_json_delta fragments."""

    def __init__(
        self, message_id: str, model: str, input_tokens: int, plan: OutputPlan, thinking: Thinking,
        stops: list[str],
    ) -> None:  # fmt: skip
        self.head = message_head(message_id, model)
        self.input_tokens = input_tokens
        self.output = plan.stream() if plan.parses else None
        self.thinking = thinking
        self.stops = stops
        self.block = -1  # the index of the block open last
        self.kind: str | None = None  # the type of the open block, None when none is open
        self.text_prefix = b""  # a text_delta event's bytes before the text, for the open text block
        # A thinking budget's first phase (see ``ThinkingBudget``): the last event goes on to a second phase
        # when ``continuation`` says so; ``carried`` is then the text it added and the first phase's ending.
        self.continuation: Callable[[Finished], str | None] | None = None
        self.carried: tuple[str, Finished] | None = None
        self.tokens_before = 0  # tokens of a first phase, for the usage

    def start(self) -> bytes:
        message = {**self.head, "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": self.input_tokens, "output_tokens": 0}}  # fmt: skip
        return sse_event("message_start", {"type": "message_start", "message": message}) + sse_event(
            "ping", {"type": "ping"}
        )

    def error(self, error: BaseException) -> bytes:
        body = error_to_anthropic(error).text
        assert body is not None  # a json_response always has its body
        return sse_event("error", json.loads(body))

    def __call__(self, event: StreamEvent, _index: int) -> bytes:
        finished = event.finished
        if finished is None and self.output is None:
            return self._text(event.delta) if event.delta else b""
        if finished is not None and self.continuation is not None:
            added = self.continuation(finished)
            if added is not None:  # not the end: the second phase follows
                self.carried = (added, finished)
                return self(StreamEvent(event.token, event.delta + added), _index)
        delta, stop_sequence = event.delta, None
        if finished is not None and finished.finish_reason == "stop_sequence":
            stop_sequence = matched_stop(finished.generated_text, self.stops)
            if stop_sequence is not None and delta.endswith(stop_sequence):
                delta = delta[: len(delta) - len(stop_sequence)]
        parts: list[bytes] = []
        if self.output is None:
            if delta:
                parts.append(self._text(delta))
        else:
            parts.extend(self._delta(d) for d in self.output.read(delta, finished is not None))
        if finished is not None:
            parts.append(self._end(finished, stop_sequence))
        return b"".join(parts)

    def _open(self, kind: str, block: dict[str, Any]) -> bytes:
        closed = self._close()
        self.block += 1
        self.kind = kind
        start = {"type": "content_block_start", "index": self.block, "content_block": block}
        return closed + sse_event("content_block_start", start)

    def _close(self) -> bytes:
        if self.kind is None:
            return b""
        self.kind = None
        return sse_event("content_block_stop", {"type": "content_block_stop", "index": self.block})

    def _block_delta(self, delta: dict[str, Any]) -> bytes:
        return sse_event(
            "content_block_delta", {"type": "content_block_delta", "index": self.block, "delta": delta}
        )

    def _text(self, text: str) -> bytes:
        opened = b""
        if self.kind != "text":
            opened = self._open("text", {"type": "text", "text": ""})
            self.text_prefix = (
                b'event: content_block_delta\ndata: {"type":"content_block_delta","index":%d,'
                b'"delta":{"type":"text_delta","text":' % self.block
            )
        return opened + self.text_prefix + json_text(text) + b"}}\n\n"

    def _delta(self, delta: OutputDelta) -> bytes:
        if isinstance(delta, ContentDelta):
            return self._text(delta.text) if delta.text else b""
        if isinstance(delta, ReasoningDelta):
            if not self.thinking.enabled:
                return b""
            opened = b""
            if self.kind != "thinking":
                opened = self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            if not self.thinking.shown or not delta.text:
                return opened
            return opened + self._block_delta({"type": "thinking_delta", "thinking": delta.text})
        assert isinstance(delta, ToolCallDelta)
        opened = b""
        if delta.id is not None:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": new_tool_use_id(),
                "name": delta.name,
                "input": {},
            }
            opened = self._open("tool_use", block)
        if not delta.arguments:
            return opened
        return opened + self._block_delta({"type": "input_json_delta", "partial_json": delta.arguments})

    def end(self, finished: Finished) -> bytes:
        """Ends the message without another event (a second phase with no tokens left)."""
        deltas = self.output.finish() if self.output is not None else []
        return b"".join(self._delta(d) for d in deltas) + self._end(finished, None)

    def _end(self, finished: Finished, stop_sequence: str | None) -> bytes:
        calls = self.output.calls if self.output is not None else 0
        delta = {"stop_reason": stop_reason(finished, calls, stop_sequence), "stop_sequence": stop_sequence}
        usage = {
            "input_tokens": self.input_tokens,
            "output_tokens": self.tokens_before + finished.generated_tokens,
        }
        return (
            self._close()
            + sse_event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
            + sse_event("message_stop", {"type": "message_stop"})
        )


# -- the routes ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """A rendered conversation: its text, whether tokenizing it adds special tokens, and its ids."""

    text: str
    special: bool
    ids: list[int]


async def _render(infer: Infer, agent: Agent, conversation: Conversation) -> Prompt:
    """The conversation's prompt (the chat template, with its tools)."""
    text, special = await infer.validator.run(
        agent.render,
        list(conversation.messages),
        conversation.turn,
        not conversation.prefill,
        conversation.prefill,
        conversation.template_kwargs(),
    )
    return Prompt(text, special, await infer.validator.run(infer.tokenizer.encode, text, special))


def _valid_request(infer: Infer, prompt: Prompt, options: Options, plan: OutputPlan) -> ValidRequest:
    """The request to run: the plan's grammar (a forced call, ``output_config.format``), its special tokens
    kept, and stop sequences kept in the text (``matched_stop`` reads which one ended it; the answer is
    cut before it)."""
    if plan.grammar is not None:
        infer.validator.require_processor("grammar", plan.grammar_field)
        options = options.with_grammar(plan.grammar, plan.grammar_field)
    [valid] = build_requests(
        infer, prompt.text, prompt.ids, options, 1, 0, False, False, plan.keep_special_ids
    )
    return replace(valid, include_stop=True)


@dataclass(frozen=True)
class ThinkingBudget:
    """``thinking.budget_tokens``, enforced by budget forcing (Muennighoff et al., s1): a first phase runs
    for at most ``tokens`` tokens and stops at the end of the thought (``</think>``); if the budget ran out
    while the model was still thinking, ``FORCED_END`` closes the thought; a second phase then continues
    the same text (the prompt plus what the first phase wrote) with the tokens ``max_tokens`` has left, so
    that the answer follows a thought of at most ``tokens`` tokens. The two phases read as one answer:
    one text, one set of blocks, one usage. Only ``think`` reasoning (``<think>`` ... ``</think>``) can be
    closed this way."""

    tokens: int
    plan: OutputPlan
    stops: list[str]

    def first(self, options: Options) -> Options:
        return replace(options, max_tokens=self.tokens, stop=[*options.stop, THINK_END])

    def continuation(self, finished: Finished) -> str | None:
        """What the first phase's ending calls for: the text to add before the second phase (``FORCED_END``
        mid-thought, "" otherwise), or None when the answer is complete."""
        text = finished.generated_text
        if finished.finish_reason == "stop_sequence":
            ours = text.endswith(THINK_END) and matched_stop(text, self.stops) is None
            return "" if ours else None
        if finished.finish_reason != "length":
            return None
        reasoning = self.plan.reasoning_parser
        assert reasoning is not None
        opened = self.plan.in_reasoning or text.lstrip().startswith("<think>")
        thinking = opened and not reasoning.parse(text, self.plan.in_reasoning).content
        return FORCED_END if thinking else ""


THINK_END = "</think>"
FORCED_END = "\n</think>\n\n"


def _budget(conversation: Conversation, options: Options, plan: OutputPlan) -> ThinkingBudget | None:
    """The thinking budget to enforce, if any (none when the model does not reason)."""
    tokens = conversation.thinking.budget_tokens
    if tokens is None:
        return None
    if options.max_tokens is not None and tokens >= options.max_tokens:
        raise ValidationError(
            f"`thinking.budget_tokens` ({tokens}) must be less than `max_tokens` ({options.max_tokens})",
            "thinking",
        )
    if plan.reasoning_parser is None:
        return None
    if plan.reasoning_parser.name not in THINK_PARSERS:
        raise ValidationError(
            f"`thinking.budget_tokens` cannot be enforced on {plan.reasoning_parser.name} reasoning: send "
            '`thinking: {"type": "adaptive"}`',
            "thinking",
        )
    return ThinkingBudget(tokens, plan, options.stop)


async def _second_phase(
    infer: Infer, agent: Agent, turn: Turn, options: Options, prompt: Prompt, added: str, first: Finished
) -> ValidRequest | None:
    """The second phase of a thinking budget: the prompt plus the first phase's text, for the tokens left
    (None when none are: the answer then ends as cut by ``max_tokens``)."""
    text = prompt.text + first.generated_text + added
    ids = await infer.validator.run(infer.tokenizer.encode, text, prompt.special)
    assert options.max_tokens is not None  # Messages requests always have one
    left = min(options.max_tokens - first.generated_tokens, infer.config.max_total_tokens - len(ids))
    if left < 1 or len(ids) > infer.config.max_input_length:
        return None
    plan = await infer.validator.run(agent.plan, turn, text)
    return _valid_request(infer, Prompt(text, prompt.special, ids), replace(options, max_tokens=left), plan)


def _joined(first: Finished, added: str, second: Finished | None) -> Finished:
    """The two phases' endings as one."""
    if second is None:
        return replace(first, generated_text=first.generated_text + added, finish_reason="length")
    return replace(
        second,
        generated_text=first.generated_text + added + second.generated_text,
        generated_tokens=first.generated_tokens + second.generated_tokens,
        tokens=first.tokens + second.tokens,
    )


@anthropic_route
async def messages(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages"""
    infer = get_infer(request)
    infer.metrics.request_count.inc()
    fields = Fields(await read_json_object(request))
    with infer.admit():
        parse_model(fields)
        model = check_model(fields, infer)
        conversation = parse_conversation(fields)
        options = parse_sampling(fields, infer, model)
        parse_request_extras(fields)
        fields.finish()
        agent = get_agent(request)
        prompt = await _render(infer, agent, conversation)
        turn = conversation.turn
        plan = await infer.validator.run(agent.plan, turn, prompt.text)
        budget = _budget(conversation, options, plan)
        valid = _valid_request(infer, prompt, budget.first(options) if budget else options, plan)
        message_id = new_message_id()
        if options.stream:
            events = MessageEvents(
                message_id, model, len(prompt.ids), plan, conversation.thinking, options.stop
            )
            response = web.StreamResponse(headers=SSE_HEADERS)
            transport = await SSEWriter.open(request, response)
            await response.write(events.start())
            try:
                if budget is not None:
                    events.continuation = budget.continuation
                await _pump(infer, valid, response, transport, events)
                if events.carried is not None:
                    added, first = events.carried
                    events.continuation, events.tokens_before = None, first.generated_tokens
                    second = await _second_phase(infer, agent, turn, options, prompt, added, first)
                    if second is None:
                        await response.write(
                            events.end(replace(first, finish_reason="length", generated_tokens=0))
                        )
                    else:
                        await _pump(infer, second, response, transport, events)
            except InferError as e:
                await response.write(events.error(e))
            await response.write_eof()
            return response
        async with infer.request(valid) as entry:
            finished = await infer.generate(entry)
        then = budget.continuation(finished) if budget is not None else None
        if then is not None:
            second = await _second_phase(infer, agent, turn, options, prompt, then, finished)
            if second is None:
                finished = _joined(finished, then, None)
            else:
                async with infer.request(second) as entry:
                    finished = _joined(finished, then, await infer.generate(entry))
    body = message_body(
        message_id, model, finished, plan, conversation.thinking, options.stop, len(prompt.ids)
    )
    return web.json_response(body)


async def _pump(
    infer: Infer, valid: ValidRequest, response: web.StreamResponse, transport: asyncio.Transport | None,
    events: MessageEvents,
) -> None:  # fmt: skip
    """Streams one request's events as ``events`` formats them (the SSEWriter writes the plain ones)."""
    async with infer.request(valid) as entry:
        await write_stream(response, transport, entry.events, events, infer.stream_batches(entry))


@anthropic_route
async def count_tokens(request: web.Request) -> web.Response:
    """POST /v1/messages/count_tokens: the prompt's tokens as /v1/messages would render it."""
    infer = get_infer(request)
    fields = Fields(await read_json_object(request))
    parse_model(fields)
    check_model(fields, infer)
    conversation = parse_conversation(fields)
    fields.finish()
    prompt = await _render(infer, get_agent(request), conversation)
    return web.json_response({"input_tokens": len(prompt.ids)})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/messages", messages)
    app.router.add_post("/v1/messages/count_tokens", count_tokens)
