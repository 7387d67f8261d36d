"""TGI v0.9.4's native API: /generate, /generate_stream, POST / (compat), /info, /health, /metrics.

Handlers translate HTTP <-> ``Infer`` only; no scheduling here.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import replace
from typing import Any

from aiohttp import web

from . import __version__
from .body import read_json_object
from .errors import InferError, UnhealthyError, ValidationError
from .generation import Finished, StreamEvent, Token
from .infer import Admission, Infer
from .sse import SSEWriter, json_text
from .state import get_infer, state
from .validation import GenerateParameters, ValidRequest, parse_parameters


def error_response(error: InferError) -> web.Response:
    return web.json_response(error.body(), status=error.status)


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _token_json(token: Token) -> dict[str, Any]:
    return {"id": token.id, "text": token.text, "logprob": _finite(token.logprob), "special": token.special}


def details_json(finished: Finished, top_n: int) -> dict[str, Any]:
    details: dict[str, Any] = {
        "finish_reason": finished.finish_reason,
        "generated_tokens": finished.generated_tokens,
        "seed": finished.seed,
        "prefill": [{"id": t.id, "text": t.text, "logprob": _finite(t.logprob)} for t in finished.prefill],
        "tokens": [_token_json(t) for t in finished.tokens],
    }
    if top_n:
        details["top_tokens"] = [[_token_json(t) for t in step] for step in finished.top_tokens]
    return details


def stream_event_json(event: StreamEvent, index: int, details: bool, input_length: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "index": index,
        "token": _token_json(event.token),
        "generated_text": None,
        "details": None,
    }
    if event.top_tokens:
        body["top_tokens"] = [_token_json(t) for t in event.top_tokens]
    if event.finished is not None:
        body["generated_text"] = event.finished.generated_text
        if details:
            body["details"] = {
                "finish_reason": event.finished.finish_reason,
                "generated_tokens": event.finished.generated_tokens,
                "seed": event.finished.seed,
                "input_length": input_length,
            }
    return body


# A plain token's event (no top tokens, not the last), with a finite log-probability (%r) or none.
_PLAIN_EVENT = (
    b'data: {"index": %d, "token": {"id": %d, "text": %b, "logprob": %r, "special": %b}, '
    b'"generated_text": null, "details": null}\n\n'
)
_PLAIN_EVENT_NULL_LOGPROB = (
    b'data: {"index": %d, "token": {"id": %d, "text": %b, "logprob": null, "special": %b}, '
    b'"generated_text": null, "details": null}\n\n'
)


def stream_event_bytes(event: StreamEvent, index: int, details: bool, input_length: int) -> bytes:
    """One SSE event. The common case (a plain token) is formatted directly: it is the per-token hot path,
    and gives the same bytes as ``json.dumps(stream_event_json(...), ensure_ascii=False)``."""
    if event.finished is not None or event.top_tokens:
        payload = json.dumps(stream_event_json(event, index, details, input_length), ensure_ascii=False)
        return b"data: " + payload.encode() + b"\n\n"
    t = event.token
    logprob = t.logprob
    special = b"true" if t.special else b"false"
    if logprob is not None and logprob - logprob == 0.0:  # finite
        return _PLAIN_EVENT % (index, t.id, json_text(t.text), logprob, special)
    return _PLAIN_EVENT_NULL_LOGPROB % (index, t.id, json_text(t.text), special)


def _timing_headers(
    started: float, validated: float, entry_queued: float, batched: float | None, chars: int, tokens: int
) -> dict[str, str]:
    now = time.monotonic()
    batched = batched or now
    inference = now - batched
    ms = lambda s: str(int(s * 1000))  # noqa: E731
    return {
        "x-compute-type": "gpu+optimized",
        "x-compute-time": f"{now - started:.3f}",
        "x-compute-characters": str(chars),
        "x-total-time": ms(now - started),
        "x-validation-time": ms(validated - started),
        "x-queue-time": ms(batched - entry_queued),
        "x-inference-time": ms(inference),
        "x-time-per-token": ms(inference / max(tokens, 1)),
    }


async def _generate_one(
    infer: Infer, inputs: object, params: GenerateParameters, slots: Admission
) -> tuple[dict[str, Any], dict]:
    started = time.monotonic()
    try:
        valid = await infer.validator.validate(inputs, params, stream=False)
    except ValidationError:
        infer.metrics.request_failure.labels("validation").inc()
        raise
    validated = time.monotonic()
    infer.metrics.request_validation_duration.observe(validated - started)
    best_of = params.best_of or 1
    if best_of > 1:
        slots.need(best_of, "best_of")  # one slot per sequence
        # TGI's best_of: independent samples with their own seeds; the highest mean logprob wins.
        candidates = [
            replace(valid, parameters=replace(valid.parameters, seed=random.getrandbits(64)))
            for _ in range(best_of)
        ]
        group = infer.new_group()
        results = sorted(
            await asyncio.gather(*(_run(infer, c, group) for c in candidates)),
            key=lambda r: r[0].mean_logprob,
            reverse=True,
        )
        (finished, entry_queued, batched), others = results[0], results[1:]
    else:
        finished, entry_queued, batched = await _run(infer, valid)
        others = []
    body: dict[str, Any] = {"generated_text": finished.generated_text}
    if valid.details:
        body["details"] = details_json(finished, valid.top_n_tokens)
        if others:
            body["details"]["best_of_sequences"] = [
                {
                    "generated_text": f.generated_text,
                    "finish_reason": f.finish_reason,
                    "generated_tokens": f.generated_tokens,
                    "seed": f.seed,
                    "prefill": [
                        {"id": t.id, "text": t.text, "logprob": _finite(t.logprob)} for t in f.prefill
                    ],
                    "tokens": [_token_json(t) for t in f.tokens],
                }
                for f, _, _ in others
            ]
    headers = _timing_headers(
        started, validated, entry_queued, batched, len(str(inputs)), finished.generated_tokens
    )
    return body, headers


async def _run(infer: Infer, valid: ValidRequest, group: int = 0) -> tuple[Finished, float, float | None]:
    async with infer.request(valid, group) as entry:
        finished = await infer.generate(entry)
        return finished, entry.queued_at, entry.batched_at


async def generate(request: web.Request) -> web.Response:
    """POST /generate"""
    infer = get_infer(request)
    infer.metrics.request_count.inc()
    body = await read_json_object(request)
    with infer.admit() as slots:
        params = parse_parameters(body.get("parameters"))
        result, headers = await _generate_one(infer, body.get("inputs"), params, slots)
    return web.json_response(result, headers=headers)


async def generate_stream(request: web.Request, body: dict[str, Any] | None = None) -> web.StreamResponse:
    """POST /generate_stream: one SSE event per token; the last carries generated_text (and details)."""
    infer = get_infer(request)
    infer.metrics.request_count.inc()
    if body is None:
        body = await read_json_object(request)
    with infer.admit():
        started = time.monotonic()
        params = parse_parameters(body.get("parameters"))
        try:
            valid = await infer.validator.validate(body.get("inputs"), params, stream=True)
        except ValidationError:
            infer.metrics.request_failure.labels("validation").inc()
            raise
        infer.metrics.request_validation_duration.observe(time.monotonic() - started)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        async with infer.request(valid) as entry:
            details, input_length = valid.details, valid.input_length
            # The coalescer writes plain tokens with this format; the rest comes through here.
            sse = await SSEWriter.start(
                request, response, entry.events, lambda e, i: stream_event_bytes(e, i, details, input_length)
            )
            try:
                async for events in infer.stream_batches(entry):
                    await response.write(sse.render(events))
            except InferError as error:
                infer.metrics.request_failure.labels(error.error_type).inc()
                await response.write(b"data: " + json.dumps(error.body()).encode() + b"\n\n")
            finally:
                sse.close()  # the connection may serve another request next
        await response.write_eof()
        return response


async def compat_generate(request: web.Request) -> web.StreamResponse:
    """POST / : TGI's compat route; ``stream`` picks the SSE or a JSON array of one answer."""
    body = await read_json_object(request)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ValidationError("`stream` must be a boolean")
    if stream:
        return await generate_stream(request, body)
    infer = get_infer(request)
    infer.metrics.request_count.inc()
    with infer.admit() as slots:
        result, headers = await _generate_one(
            infer, body.get("inputs"), parse_parameters(body.get("parameters")), slots
        )
    return web.json_response([result], headers=headers)


async def health(request: web.Request) -> web.Response:
    infer = state(request).infer
    if infer is not None and await infer.healthy():
        return web.Response(status=200)
    return error_response(UnhealthyError("unhealthy"))


async def info(request: web.Request) -> web.Response:
    c = state(request).config
    infer = state(request).infer
    shard = infer.info if infer is not None else None
    return web.json_response(
        {
            "model_id": c.model_id,
            "model_sha": c.model_sha,
            "model_weights": c.model_weights,
            "model_dtype": shard.dtype if shard else None,
            "model_device_type": shard.device_type if shard else None,
            "model_pipeline_tag": c.pipeline_tag,
            "model_backend": shard.backend if shard else None,
            "num_shard": c.num_shard,
            "max_concurrent_requests": c.max_concurrent_requests,
            "max_best_of": c.max_best_of,
            "max_stop_sequences": c.max_stop_sequences,
            "max_input_length": c.max_input_length,
            "max_total_tokens": c.max_total_tokens,
            "waiting_served_ratio": c.waiting_served_ratio,
            "max_batch_total_tokens": infer.max_batch_total_tokens if infer else c.max_batch_total_tokens,
            "max_waiting_tokens": c.max_waiting_tokens,
            "validation_workers": c.validation_workers,
            "version": __version__,
            "sha": None,
            "docker_label": None,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    infer = state(request).infer
    body = infer.metrics.render() if infer is not None else b""
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_post("/", compat_generate)
    app.router.add_get("/health", health)
    app.router.add_get("/info", info)
    app.router.add_get("/metrics", metrics)
