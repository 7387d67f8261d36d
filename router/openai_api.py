"""The OpenAI API: /v1/chat/completions, /v1/completions, /v1/models (and the unprefixed POST routes of
the Preemo fork), plus /tokenize and /version.

Every parameter is honoured or refused with a 400 that names it; nothing is silently ignored. Requests
become ``ValidRequest``s for the same queue as TGI's routes; n samples, several prompts and best_of are
several entries whose prompt prefill the shard shares. Handlers translate HTTP <-> ``Infer`` only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import __version__
from .agent import AssistantOutput, OutputPlan, ReasoningDelta, Turn
from .body import read_json_object
from .entry import Entry
from .errors import (
    AuthenticationError,
    InferError,
    OverloadedError,
    PayloadTooLargeError,
    UnhealthyError,
    ValidationError,
)
from .generation import Finished, StreamEvent, Token
from .infer import Infer
from .openai_params import (
    TEMPLATE_RESERVED,
    Fields,
    ModelNotFoundError,
    Options,
    build_requests,
    check_model,
    parse_chat_extras,
    parse_messages,
    parse_options,
    parse_reasoning_effort,
    parse_turn,
    parse_user,
    refuse_unsupported,
)
from .sse import SSEWriter, json_text, write_stream
from .state import get_agent, get_infer, state
from .tokenizer import Tokenizer
from .toolcalls import ToolCallDelta
from .validation import ValidRequest

STARTED_AT = int(time.time())
RETRY_AFTER_S = "1"


# -- errors ---------------------------------------------------------------------------------------------
def openai_error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> web.Response:  # fmt: skip
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def error_to_openai(error: BaseException) -> web.Response:
    """Maps the router's errors to OpenAI's envelope and the status codes its SDK expects."""
    if isinstance(error, ValidationError):
        return openai_error(400, error.detail, "invalid_request_error", error.param, error.code)
    if isinstance(error, ModelNotFoundError):
        return openai_error(404, error.message, "invalid_request_error", "model", "model_not_found")
    if isinstance(error, OverloadedError):
        return openai_error(
            429, "the server is at its limit of concurrent requests; retry shortly", "rate_limit_error",
            code="rate_limit_exceeded", headers={"Retry-After": RETRY_AFTER_S},
        )  # fmt: skip
    if isinstance(error, UnhealthyError):
        return openai_error(503, error.message, "unavailable_error", headers={"Retry-After": RETRY_AFTER_S})
    if isinstance(error, AuthenticationError):
        return openai_error(
            401, error.message, "invalid_request_error", code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip
    if isinstance(error, PayloadTooLargeError):
        return openai_error(413, error.message, "invalid_request_error", code="payload_too_large")
    if isinstance(error, web.HTTPException):
        message = error.reason
        with contextlib.suppress(ValueError, TypeError):
            message = json.loads(error.text or "")["error"]
        return openai_error(error.status, message, "invalid_request_error")
    return openai_error(500, getattr(error, "message", "internal server error"), "server_error")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_route(handler: Handler, to_response: Callable[[BaseException], web.Response]) -> Handler:
    """``handler`` whose errors (the router's, and aiohttp's client errors) leave as ``to_response``
    answers them; bad input and unknown models are counted as validation failures."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except (InferError, web.HTTPClientError) as e:
            infer = state(request).infer
            if infer is not None and isinstance(e, ValidationError | ModelNotFoundError):
                infer.metrics.request_failure.labels("validation").inc()
            return to_response(e)

    return wrapped


def openai_route(handler: Handler) -> Handler:
    """Errors raised by an OpenAI handler leave in OpenAI's envelope."""
    return error_route(handler, error_to_openai)


# -- running ----------------------------------------------------------------------------------------------
async def _run_all(infer: Infer, requests: list[ValidRequest]) -> list[Finished]:
    async with contextlib.AsyncExitStack() as stack:
        group = infer.new_group() if len(requests) > 1 else 0
        entries = [await stack.enter_async_context(infer.request(r, group)) for r in requests]
        return list(await asyncio.gather(*(infer.generate(e) for e in entries)))


EventBytes = Callable[[int, StreamEvent], bytes]


async def _stream_all(
    infer: Infer,
    requests: list[ValidRequest],
    response: web.StreamResponse,
    transport: asyncio.Transport | None,
    event_bytes: EventBytes,
) -> int:
    """Streams every request's events as ``event_bytes(index, event)`` (b"" for an event without a
    chunk); returns how many tokens they generated in all, or raises the first error (the other requests
    are then cancelled).

    As on TGI's stream, the write coalescer writes the plain token events (``SSEWriter``, on
    ``transport``: see ``SSEWriter.open``); a task per request writes the others (the last one, errors
    aside, and every event while the client is slow to read)."""

    async def pump(index: int, entry: Entry) -> int:
        def format_event(event: StreamEvent, _: int) -> bytes:
            return event_bytes(index, event)

        last = await write_stream(
            response, transport, entry.events, format_event, infer.stream_batches(entry)
        )
        return last.finished.generated_tokens if last is not None and last.finished is not None else 0

    async with contextlib.AsyncExitStack() as stack:
        group = infer.new_group() if len(requests) > 1 else 0
        entries = [await stack.enter_async_context(infer.request(r, group)) for r in requests]
        tasks = [asyncio.create_task(pump(i, e)) for i, e in enumerate(entries)]
        try:
            return sum(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # nothing of theirs follows


class _TextChunks:
    """The SSE bytes of ``make(index, text)`` (a chunk in which only one text varies), built from bytes
    cached per index around the text: the same bytes as ``_data(make(index, text))``, without encoding
    the whole chunk per token."""

    def __init__(self, make: Callable[[int, str], dict[str, Any]]) -> None:
        self.make = make
        self.parts: dict[int, tuple[bytes, bytes]] = {}

    def __call__(self, index: int, text: str) -> bytes:
        parts = self.parts.get(index)
        if parts is None:
            parts = self.parts[index] = self._split(index)
        return parts[0] + json_text(text) + parts[1]

    def _split(self, index: int) -> tuple[bytes, bytes]:
        marker = uuid.uuid4().hex
        encoded = _data(self.make(index, marker))
        before, found, after = encoded.partition(json_text(marker))
        if not found or json_text(marker) in after:
            raise AssertionError("the chunk's text marker is not unique")
        return before, after


def _finish_reason(finished: Finished | None, calls: int = 0) -> str | None:
    """OpenAI's finish reason; ``tool_calls`` when the answer made calls (and was not cut short)."""
    if finished is None:
        return None
    if finished.finish_reason == "length":
        return "length"
    return "tool_calls" if calls else "stop"


def _visible(token: Token, request: ValidRequest) -> bool:
    """Whether a token belongs to the answer (end-of-sequence and skipped special tokens do not)."""
    skipped = token.special and request.skip_special_tokens and token.id not in request.keep_special_ids
    return not skipped and token.id not in request.stop_token_ids


def _logprob(value: float | None) -> float:
    return value if value is not None and math.isfinite(value) else -9999.0


def _chat_logprob(tokenizer: Tokenizer, token: Token, top: list[Token]) -> dict[str, Any]:
    """OpenAI's chat logprob entry: the token's own string and raw bytes (not the text it completed)."""

    def entry(t: Token) -> dict[str, Any]:
        return {
            "token": tokenizer.token_text(t.id),
            "logprob": _logprob(t.logprob),
            "bytes": list(tokenizer.token_bytes(t.id)),
        }

    return {**entry(token), "top_logprobs": [entry(t) for t in top]}


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _data(payload: dict[str, Any] | str) -> bytes:
    """One SSE event: ``data: `` and the payload (a JSON object, or a string as is)."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def _send(response: web.StreamResponse, payload: dict[str, Any] | str) -> None:
    await response.write(_data(payload))


async def _stream_errors_and_done(response: web.StreamResponse, body: Awaitable[None]) -> web.StreamResponse:
    """Runs a stream body; a failure mid-stream becomes an error chunk; ``[DONE]`` always ends it."""
    try:
        await body
    except InferError as e:
        envelope = error_to_openai(e).text
        assert envelope is not None  # a json_response always has its body
        await _send(response, json.loads(envelope))
    await _send(response, "[DONE]")
    await response.write_eof()
    return response


# -- chat ---------------------------------------------------------------------------------------------------
@openai_route
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions (and /chat/completions)"""
    infer = get_infer(request)
    infer.metrics.request_count.inc()
    fields = Fields(await read_json_object(request))
    with infer.admit() as slots:
        model = check_model(fields, infer)
        messages = parse_messages(fields.raw("messages"))
        options = parse_options(fields, infer, infer.config.max_best_of, model)
        slots.need(options.n, "n")
        logprobs = fields.bool("logprobs", False)
        top_logprobs = fields.int("top_logprobs", 0, infer.config.max_top_n_tokens)
        if top_logprobs and not logprobs:
            raise ValidationError("`top_logprobs` needs `logprobs: true`", "top_logprobs")
        add_generation_prompt = fields.bool("add_generation_prompt", True)
        continue_final = fields.bool("continue_final_message", False)
        if add_generation_prompt and continue_final and fields.body.get("add_generation_prompt"):
            raise ValidationError(
                "`add_generation_prompt` and `continue_final_message` cannot both be true",
                "continue_final_message",
            )
        kwargs = fields.raw("chat_template_kwargs") or {}
        if not isinstance(kwargs, dict) or any(k in TEMPLATE_RESERVED for k in kwargs):
            raise ValidationError(
                f"`chat_template_kwargs` must be an object without {', '.join(TEMPLATE_RESERVED)}",
                "chat_template_kwargs",
            )
        effort = parse_reasoning_effort(fields)
        if effort is not None:
            kwargs = {"reasoning_effort": effort, **kwargs}
        turn = parse_turn(fields, options)
        echo = parse_chat_extras(fields)
        refuse_unsupported(fields)
        fields.finish()
        agent = get_agent(request)
        text, special = await infer.validator.run(
            agent.render, messages, turn, add_generation_prompt, continue_final, kwargs
        )
        plan = await infer.validator.run(agent.plan, turn, text)
        if plan.grammar != options.constraint:
            infer.validator.require_processor("grammar", plan.grammar_field)
            options = options.with_grammar(plan.grammar, plan.grammar_field)
        ids = await infer.validator.run(infer.tokenizer.encode, text, special)
        requests = build_requests(
            infer, text, ids, options, options.n, top_logprobs or 0, False, False, plan.keep_special_ids
        )
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        if options.stream:
            return await _chat_stream(request, infer, requests, {**head, **echo}, options, logprobs, plan)
        results = await _run_all(infer, requests)
    choices = []
    for index, (finished, valid) in enumerate(zip(results, requests, strict=True)):
        choice: dict[str, Any] = {
            "index": index,
            "message": _chat_message(finished.generated_text, plan),
            "logprobs": None,
            "finish_reason": None,
        }
        choice["finish_reason"] = _finish_reason(finished, len(choice["message"].get("tool_calls", ())))
        if logprobs:
            tops = finished.top_tokens or [[] for _ in finished.tokens]
            choice["logprobs"] = {
                "content": [
                    _chat_logprob(infer.tokenizer, t, top)
                    for t, top in zip(finished.tokens, tops, strict=True)
                    if _visible(t, valid)
                ],
                "refusal": None,
            }
        choices.append(choice)
    usage = _usage(len(ids), sum(f.generated_tokens for f in results))
    body = {**head, "object": "chat.completion", "choices": choices, "usage": usage, **echo}
    return web.json_response(body)


def _chat_message(text: str, plan: OutputPlan) -> dict[str, Any]:
    """The answer's message: content (null when the answer is only calls), ``tool_calls`` when it made
    any, ``reasoning_content`` when a reasoning parser reads the model."""
    if not plan.parses:
        return {"role": "assistant", "content": text}
    answer: AssistantOutput = plan.parse(text)
    message: dict[str, Any] = {"role": "assistant", "content": answer.content or None}
    if not answer.calls and not answer.content:
        message["content"] = ""
    if answer.calls:
        message["tool_calls"] = [call.to_openai() for call in answer.calls]
    if plan.reasoning_parser is not None:
        message["reasoning_content"] = answer.reasoning or None
    return message


async def _chat_stream(
    request: web.Request, infer: Infer, requests: list[ValidRequest], head: dict[str, Any], options: Options,
    logprobs: bool, plan: OutputPlan,
) -> web.StreamResponse:  # fmt: skip
    response = web.StreamResponse(headers=SSE_HEADERS)
    transport = await SSEWriter.open(request, response)
    head = {**head, "object": "chat.completion.chunk"}
    extra: dict[str, Any] = {"usage": None} if options.include_usage else {}
    prompt_tokens = requests[0].input_length
    generated = [0] * len(requests)  # tokens so far, per choice (continuous usage)
    streams = [plan.stream() for _ in requests] if plan.parses else []

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> dict[str, Any]:
        usage = {"usage": _usage(prompt_tokens, generated[index])} if options.continuous_usage else extra
        return {
            **head,
            "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}],
            **usage,
        }

    content = _TextChunks(lambda index, text: chunk(index, {"content": text}))
    plain = not logprobs and not plan.parses and not options.continuous_usage

    def parsed(index: int, text: str, finished: bool) -> list[dict[str, Any]]:
        """The deltas of the answer's next text, read by the plan's parsers."""
        stream = streams[index]
        out: list[dict[str, Any]] = []
        for delta in stream.read(text, finished):
            if isinstance(delta, ReasoningDelta):
                out.append({"reasoning_content": delta.text})
            elif isinstance(delta, ToolCallDelta):
                out.append({"tool_calls": [delta.to_openai()]})
            else:
                out.append({"content": delta.text})
        return out

    def event_bytes(index: int, event: StreamEvent) -> bytes:
        """The event's chunks (the per-token path for plain tokens, see ``SSEWriter``); b"" for none."""
        generated[index] += 1
        if plain and event.finished is None and event.delta:
            return content(index, event.delta)
        visible = _visible(event.token, requests[index])
        lp = (
            {"content": [_chat_logprob(infer.tokenizer, event.token, event.top_tokens)], "refusal": None}
            if logprobs and visible
            else None
        )
        if streams:
            deltas = parsed(index, event.delta, event.finished is not None)
        else:
            deltas = [{"content": event.delta}] if event.delta else []
        if event.finished is None:
            if lp is not None and not deltas:
                deltas = [{}]
            return b"".join(
                _data(chunk(index, d, None, lp if i == 0 else None)) for i, d in enumerate(deltas)
            )
        # the last delta carries the finish reason
        last = deltas.pop() if deltas else {}
        out = [_data(chunk(index, d, None, lp if i == 0 else None)) for i, d in enumerate(deltas)]
        finish = _finish_reason(event.finished, streams[index].calls if streams else 0)
        out.append(_data(chunk(index, last, finish, None if out else lp)))
        return b"".join(out)

    async def body() -> None:
        for index in range(len(requests)):
            await _send(response, chunk(index, {"role": "assistant", "content": ""}))
        total = await _stream_all(infer, requests, response, transport, event_bytes)
        if options.include_usage:
            await _send(response, {**head, "choices": [], "usage": _usage(prompt_tokens, total)})

    return await _stream_errors_and_done(response, body())


# -- completions ------------------------------------------------------------------------------------------
def _prompts(raw: object) -> list[str | list[int]]:
    """A string, a list of strings, a list of token ids, or a list of lists of token ids."""

    def is_ids(value: object) -> bool:
        return (
            isinstance(value, list)
            and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
        )

    if isinstance(raw, str):
        return [raw]
    if is_ids(raw):
        return [raw]  # type: ignore[list-item]
    if isinstance(raw, list) and raw and all(isinstance(p, str) or is_ids(p) for p in raw):
        return list(raw)
    raise ValidationError(
        "`prompt` must be a string, an array of strings, an array of token ids or an array of such arrays",
        "prompt",
    )


@openai_route
async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions (and /completions)"""
    infer = get_infer(request)
    infer.metrics.request_count.inc()
    fields = Fields(await read_json_object(request))
    with infer.admit() as slots:
        model = check_model(fields, infer)
        prompts = _prompts(fields.raw("prompt"))
        options = parse_options(fields, infer, infer.config.max_best_of, model)
        echo = fields.bool("echo", False)
        logprobs = fields.int("logprobs", 0, infer.config.max_top_n_tokens)
        best_of = fields.int("best_of", 1, infer.config.max_best_of) or options.n
        if best_of < options.n:
            raise ValidationError(f"`best_of` ({best_of}) must be >= `n` ({options.n})", "best_of")
        if best_of > options.n and options.stream:
            raise ValidationError("`best_of` > `n` cannot be streamed", "best_of")
        if len(prompts) * best_of > infer.config.max_concurrent_requests:
            raise ValidationError(
                f"`prompt` holds {len(prompts)} prompts x {best_of} sequences each: more than the "
                f"{infer.config.max_concurrent_requests} sequences one request may ask for",
                "prompt",
            )
        slots.need(len(prompts) * best_of, "best_of")
        if fields.raw("suffix"):
            raise ValidationError("`suffix` (fill-in-the-middle) is not supported", "suffix")
        parse_user(fields)
        refuse_unsupported(fields)
        fields.finish()
        vocab = infer.info.vocab_size or len(infer.tokenizer.hf)
        groups: list[list[ValidRequest]] = []
        for prompt in prompts:
            if isinstance(prompt, str):
                if not prompt:
                    raise ValidationError("`prompt` cannot be empty", "prompt")
                ids = await infer.validator.run(infer.tokenizer.encode, prompt)
                text = prompt
            else:
                if any(not 0 <= t < vocab for t in prompt):
                    raise ValidationError(f"`prompt` token ids must be below {vocab}", "prompt")
                ids, text = list(prompt), await infer.validator.run(infer.tokenizer.decode, prompt)
            groups.append(
                build_requests(
                    infer, text, ids, options, best_of, logprobs or 0, echo and logprobs is not None, echo
                )
            )
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
        if options.stream:
            return await _completions_stream(request, infer, groups, head, options, logprobs, echo)
        results = await _run_all(infer, [r for group in groups for r in group])
    choices = []
    completion_tokens = 0
    for p, group in enumerate(groups):
        finished = results[p * best_of : (p + 1) * best_of]
        completion_tokens += sum(f.generated_tokens for f in finished)
        ranked = sorted(range(best_of), key=lambda i: finished[i].mean_logprob, reverse=True)[: options.n]
        for rank, i in enumerate(sorted(ranked) if best_of == options.n else ranked):
            valid = group[i]
            choices.append(
                {
                    "index": p * options.n + rank,
                    "text": finished[i].generated_text,
                    "logprobs": _legacy_logprobs(infer.tokenizer, finished[i], valid, echo)
                    if logprobs is not None
                    else None,
                    "finish_reason": _finish_reason(finished[i]),
                }
            )
    usage = _usage(sum(g[0].input_length for g in groups), completion_tokens)
    return web.json_response({**head, "object": "text_completion", "choices": choices, "usage": usage})


def _legacy_logprobs(
    tokenizer: Tokenizer, finished: Finished, valid: ValidRequest, echo: bool
) -> dict[str, Any]:
    """The completions route's logprobs: tokens, token_logprobs, top_logprobs, and text_offset (where each
    token's text starts in the returned text)."""
    tokens: list[str] = []
    logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    position = 0
    if echo:
        for t in finished.prefill:
            tokens.append(t.text)
            logprobs.append(t.logprob)
            tops.append(None)
            offsets.append(position)
            position += len(t.text)
        position = len(valid.inputs)
    steps = finished.top_tokens or [[] for _ in finished.tokens]
    for token, top in zip(finished.tokens, steps, strict=True):
        if _visible(token, valid):
            tokens.append(tokenizer.token_text(token.id))
            logprobs.append(_logprob(token.logprob))
            tops.append({tokenizer.token_text(t.id): _logprob(t.logprob) for t in top})
            offsets.append(position)
            position += len(token.text)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


async def _completions_stream(
    request: web.Request, infer: Infer, groups: list[list[ValidRequest]], head: dict[str, Any], options: Options,
    logprobs: int | None, echo: bool,
) -> web.StreamResponse:  # fmt: skip
    response = web.StreamResponse(headers=SSE_HEADERS)
    transport = await SSEWriter.open(request, response)
    head = {**head, "object": "text_completion"}
    extra = {"usage": None} if options.include_usage else {}
    requests = [r for group in groups for r in group]

    def chunk(index: int, text: str, finish: str | None, lp: dict[str, Any] | None) -> dict[str, Any]:
        return {
            **head,
            "choices": [{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}],
            **extra,
        }

    text_chunk = _TextChunks(lambda index, text: chunk(index, text, None, None))

    def event_bytes(index: int, event: StreamEvent) -> bytes:
        """The event's chunk (the per-token path for plain tokens, see ``SSEWriter``); b"" for none."""
        if event.finished is None and event.delta and logprobs is None:
            return text_chunk(index, event.delta)
        lp = None
        if logprobs is not None and _visible(event.token, requests[index]):
            top = {infer.tokenizer.token_text(t.id): _logprob(t.logprob) for t in event.top_tokens}
            lp = {"tokens": [infer.tokenizer.token_text(event.token.id)], "token_logprobs": [_logprob(event.token.logprob)],
                  "top_logprobs": [top], "text_offset": [0]}  # fmt: skip
        if event.delta or lp is not None or event.finished is not None:
            return _data(chunk(index, event.delta, _finish_reason(event.finished), lp))
        return b""

    async def body() -> None:
        if echo:
            for index, valid in enumerate(requests):
                await _send(response, chunk(index, valid.inputs, None, None))
        generated = await _stream_all(infer, requests, response, transport, event_bytes)
        if options.include_usage:
            usage = _usage(sum(g[0].input_length for g in groups), generated)
            await _send(response, {**head, "choices": [], "usage": usage})

    return await _stream_errors_and_done(response, body())


# -- models, tokenize, version --------------------------------------------------------------------------
@openai_route
async def models(request: web.Request) -> web.Response:
    """GET /v1/models"""
    config = state(request).config
    data = [
        {
            "id": name,
            "object": "model",
            "created": STARTED_AT,
            "owned_by": "text-generation-server",
            "root": config.model_id,
            "max_model_len": config.max_total_tokens,
        }
        for name in config.model_names
    ]
    # The LoRA adapters, once the shards have said which they hold (vLLM's shape: the base is their parent).
    infer = state(request).infer
    base = config.model_names[0]
    data += [
        {"id": name, "object": "model", "created": STARTED_AT, "owned_by": "text-generation-server",
         "root": name, "parent": base, "max_model_len": config.max_total_tokens}
        for name in (infer.validator.adapters if infer is not None else ())
    ]  # fmt: skip
    return web.json_response({"object": "list", "data": data})


@openai_route
async def tokenize(request: web.Request) -> web.Response:
    """POST /tokenize: {"prompt"} or {"messages"} -> token ids and the rendered prompt."""
    infer = get_infer(request)
    fields = Fields(await read_json_object(request))
    check_model(fields, infer)
    prompt, messages = fields.raw("prompt"), fields.raw("messages")
    add_special = fields.bool("add_special_tokens", True)
    if (prompt is None) == (messages is None):
        raise ValidationError("send exactly one of `prompt` and `messages`", "prompt")
    if messages is not None:
        add_generation_prompt = fields.bool("add_generation_prompt", True)
        continue_final = fields.bool("continue_final_message", False)
        fields.finish()
        text, add_special = await infer.validator.run(
            get_agent(request).render, parse_messages(messages), Turn(), add_generation_prompt, continue_final
        )
    else:
        if not isinstance(prompt, str):
            raise ValidationError("`prompt` must be a string", "prompt")
        fields.finish()
        text = prompt
    ids = await infer.validator.run(infer.tokenizer.encode, text, add_special)
    return web.json_response(
        {
            "count": len(ids),
            "max_model_len": infer.config.max_total_tokens,
            "tokens": ids,
            "token_strs": [infer.tokenizer.token_text(i) for i in ids],
            "prompt": text,
        }
    )


async def version(request: web.Request) -> web.Response:
    """GET /version"""
    return web.json_response({"version": __version__})


def add_routes(app: web.Application) -> None:
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", chat_completions)
        app.router.add_post(f"{prefix}/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/tokenize", tokenize)
    app.router.add_get("/version", version)
