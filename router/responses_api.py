"""The OpenAI Responses API: ``POST /v1/responses``, ``GET`` and ``DELETE /v1/responses/{id}``,
``GET /v1/responses/{id}/input_items`` and ``POST /v1/responses/{id}/cancel``.

A thin translation over the chat route's pipeline, as every chat-like API is:

- the body is checked by ``responses_params.parse_request`` (sampling through the chat route's own
  ``parse_options``, ``text.format`` through ``response_format``'s grammar, tools into router/agent.py's
  neutral values); every field is honoured or refused with a 400 naming it, in OpenAI's error envelope;
- the conversation (a stored response's input and output first, with ``previous_response_id``; then this
  request's input items; ``instructions`` as the system message) is rendered by the model's ``Agent``,
  which also plans the answer (the grammar forcing a call for ``tool_choice`` ``required`` or a named
  function, the special tokens the parsers read, the parsers themselves);
- the request runs as one ``ValidRequest`` through ``Infer``; its text goes through the plan's stream
  (reasoning, content, tool calls) into ``responses_events.ResponseBuilder``, which makes the output items
  and, when streaming, the events (written by ``SSEWriter`` like every other stream);
- the response is kept in the app's ``ResponseStore`` (bounded, in memory) unless ``store`` is false.

``status`` is ``incomplete`` (``incomplete_details.reason``: ``max_output_tokens``) when the answer ran out
of tokens, else ``completed``. A failure after a stream started ends it with ``response.failed``.

A stored response's input items are listed by ``input_items`` (router/responses_items.py). ``cancel``
applies to background responses only, and this server runs none (``background`` is refused): a stored
response's cancel is a 400 saying so, an unknown id a 404.
"""

from __future__ import annotations

from aiohttp import web

from .agent import ChatMessage, OutputPlan, ReasoningDelta
from .body import read_json_object
from .errors import InferError, ValidationError
from .generation import Finished, StreamEvent
from .infer import Infer
from .openai_api import SSE_HEADERS, Handler, error_route, error_to_openai, openai_error
from .openai_params import build_requests
from .responses_events import Event, ResponseBuilder, Status, Usage, sse_bytes
from .responses_items import ItemPage, continued_output, identified
from .responses_params import ResponsesRequest, parse_request, to_messages
from .responses_store import ResponseStore, StoredResponse
from .sse import SSEWriter, write_stream
from .state import get_agent, get_infer
from .toolcalls import ContentDelta, ToolCallDelta
from .validation import ValidRequest

STORE_KEY = web.AppKey("responses_store", ResponseStore)


class ResponseNotFoundError(InferError):
    """An id the store does not hold (unknown, deleted, dropped, or created with ``store: false``)."""

    status = 404
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def error_to_responses(error: BaseException) -> web.Response:
    """``error_to_openai``, and unknown response ids as a 404 in the same envelope."""
    if isinstance(error, ResponseNotFoundError):
        return openai_error(404, error.message, "invalid_request_error", error.param, error.code)
    return error_to_openai(error)


def responses_route(handler: Handler) -> Handler:
    """An OpenAI route (``openai_route``'s errors) whose unknown response ids are a 404 in the same
    envelope."""
    return error_route(handler, error_to_responses)


class _Output:
    """One response's generated text -> the builder's events, read by the plan's parsers (the text is all
    answer when the plan reads nothing). Keeps the reasoning text, for the usage's reasoning tokens."""

    def __init__(self, plan: OutputPlan, builder: ResponseBuilder) -> None:
        self.stream = plan.stream() if plan.parses else None
        self.builder = builder
        self.reasoning: list[str] = []

    def feed(self, text: str, final: bool) -> list[Event]:
        if self.stream is None:
            return self.builder.text(text)
        events: list[Event] = []
        for delta in self.stream.read(text, final):
            if isinstance(delta, ReasoningDelta):
                self.reasoning.append(delta.text)
                events += self.builder.reasoning(delta.text)
            elif isinstance(delta, ToolCallDelta):  # the plan keeps max_tool_calls calls at most
                events += self.builder.call(delta)
            elif isinstance(delta, ContentDelta):
                events += self.builder.text(delta.text)
        return events


async def _usage(infer: Infer, valid: ValidRequest, finished: Finished, output: _Output) -> Usage:
    reasoning = "".join(output.reasoning)
    reasoning_tokens = (
        len(await infer.validator.run(infer.tokenizer.encode, reasoning, False)) if reasoning else 0
    )
    return Usage(
        valid.input_length, finished.generated_tokens, min(reasoning_tokens, finished.generated_tokens)
    )


def _status(finished: Finished) -> Status:
    return "incomplete" if finished.finish_reason == "length" else "completed"


async def _store(
    request: web.Request, infer: Infer, parsed: ResponsesRequest, items: tuple[dict, ...], response: dict
) -> None:
    """Keeps the response unless ``store`` is false (its size is measured off the event loop)."""
    if parsed.store:
        stored = StoredResponse(response, items)
        request.app[STORE_KEY].put(stored, await infer.validator.run(stored.size))


@responses_route
async def create_response(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses"""
    infer = get_infer(request)
    infer.metrics.request_count.inc()
    body = await read_json_object(request)
    with infer.admit():
        parsed = parse_request(body, infer)
        items = identified(parsed.input_items)
        if parsed.previous_response_id is not None:
            previous = request.app[STORE_KEY].get(parsed.previous_response_id)
            if previous is None:
                raise ResponseNotFoundError(
                    f"Previous response with id '{parsed.previous_response_id}' not found.",
                    "previous_response_id",
                    "previous_response_not_found",
                )
            items = previous.input_items + continued_output(previous.response) + items
        messages = to_messages(items)
        if parsed.instructions:
            messages.insert(0, ChatMessage("system", parsed.instructions))
        agent = get_agent(request)
        turn = parsed.turn
        text, special = await infer.validator.run(
            agent.render, messages, turn, True, False, parsed.template_kwargs
        )
        plan = await infer.validator.run(agent.plan, turn, text)
        options = parsed.options
        if plan.grammar is not None:
            infer.validator.require_processor("grammar", plan.grammar_field)
            options = options.with_grammar(plan.grammar, plan.grammar_field)
        ids = await infer.validator.run(infer.tokenizer.encode, text, special)
        infer.validator.new_tokens_budget(len(ids), options.max_tokens, "max_output_tokens")
        [valid] = build_requests(infer, text, ids, options, 1, 0, False, False, plan.keep_special_ids)
        builder = ResponseBuilder(parsed.echo)
        output = _Output(plan, builder)
        if options.stream:
            return await _stream(request, infer, valid, parsed, items, builder, output)
        async with infer.request(valid) as entry:
            finished = await infer.generate(entry)
    output.feed(finished.generated_text, True)
    events = builder.finish(_status(finished), await _usage(infer, valid, finished, output))
    result = events[-1]["response"]
    await _store(request, infer, parsed, items, result)
    return web.json_response(result)


async def _stream(
    request: web.Request, infer: Infer, valid: ValidRequest, parsed: ResponsesRequest, items: tuple[dict, ...],
    builder: ResponseBuilder, output: _Output,
) -> web.StreamResponse:  # fmt: skip
    response = web.StreamResponse(headers=SSE_HEADERS)
    transport = await SSEWriter.open(request, response)
    await response.write(sse_bytes(builder.start()))

    def format_event(event: StreamEvent, _: int) -> bytes:
        return sse_bytes(output.feed(event.delta, event.finished is not None))

    try:
        async with infer.request(valid) as entry:
            last = await write_stream(
                response, transport, entry.events, format_event, infer.stream_batches(entry)
            )
        assert last is not None and last.finished is not None  # stream_batches ends on the last event
        finished = last.finished
        done = builder.finish(_status(finished), await _usage(infer, valid, finished, output))
        await _store(
            request, infer, parsed, items, done[-1]["response"]
        )  # kept before the client hears of it
        await response.write(sse_bytes(done))
    except InferError as e:
        await response.write(sse_bytes(builder.fail(e.message)))
    await response.write_eof()
    return response


def _stored(request: web.Request) -> str:
    """The path's response id; query parameters (OpenAI's ``include``, ``stream``, ...) are refused."""
    if request.query:
        name = next(iter(request.query))
        raise ValidationError(f"query parameter `{name}` is not supported", name)
    return request.match_info["response_id"]


def _not_found(response_id: str) -> ResponseNotFoundError:
    return ResponseNotFoundError(f"No response found with id '{response_id}'.", "response_id")


def _held(request: web.Request, response_id: str) -> StoredResponse:
    """The stored response, or a 404."""
    stored = request.app[STORE_KEY].get(response_id)
    if stored is None:
        raise _not_found(response_id)
    return stored


@responses_route
async def get_response(request: web.Request) -> web.Response:
    """GET /v1/responses/{response_id}"""
    return web.json_response(_held(request, _stored(request)).response)


@responses_route
async def list_input_items(request: web.Request) -> web.Response:
    """GET /v1/responses/{response_id}/input_items"""
    page = ItemPage.from_query(request.query)
    stored = _held(request, request.match_info["response_id"])
    return web.json_response(page.of(stored.input_items))


@responses_route
async def cancel_response(request: web.Request) -> web.Response:
    """POST /v1/responses/{response_id}/cancel"""
    _held(request, _stored(request))
    if request.body_exists and await read_json_object(request):
        raise ValidationError("a cancel request takes no body", "body")
    raise ValidationError(
        "Cannot cancel a synchronous response: only responses created with `background: true` can be "
        "cancelled, and this server runs every response in the foreground (`background` is refused)",
        "background",
    )


@responses_route
async def delete_response(request: web.Request) -> web.Response:
    """DELETE /v1/responses/{response_id}"""
    response_id = _stored(request)
    if not request.app[STORE_KEY].delete(response_id):
        raise _not_found(response_id)
    return web.json_response({"id": response_id, "object": "response", "deleted": True})


def add_routes(app: web.Application) -> None:
    """The Responses routes, and the app's response store."""
    app[STORE_KEY] = ResponseStore()
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{response_id}", get_response)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)
    app.router.add_get("/v1/responses/{response_id}/input_items", list_input_items)
    app.router.add_post("/v1/responses/{response_id}/cancel", cancel_response)
