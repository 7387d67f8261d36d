"""The router's spans (``--otlp-endpoint``; common/tracing.py sets up the SDK).

Per HTTP request (every route but ``/health`` and ``/metrics``), in the trace of the request's W3C
``traceparent`` header when it has a valid one, else in a new trace:

```
POST /generate_stream                 SERVER span: the whole request, its HTTP status
├─ validate                           from its arrival to its first sequence's submission (body, parameters,
│                                     chat template, tokenization, token limits)
└─ infer                              one per sequence (OpenAI's n, best_of: several): until its handler is done
   ├─ queue                           submitted -> its first token came back (its prompt's steps included)
   └─ detokenize                      first token -> last: one "step" event per step that gave it a token
                                      (the shard's step number, the token, the router's pass over the step)
```

The ``infer`` span's context travels to the shard in ``Request.trace_context``: the shard's span of the
request is its child, and the shard's step spans link to it (shard/tracing.py). Without an endpoint there
is no ``RouterTracer``, and the router's hooks are one ``is None`` check per request and per step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from common.tracing import extract_context, inject_context, setup_tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

    from proto import pb

    from .config import RouterConfig

# Routes that get no span: probes and scrapes come every few seconds and say nothing about a request.
UNTRACED_PATHS = frozenset({"/health", "/metrics"})


@dataclass
class HttpTrace:
    """The HTTP request being handled (in a context variable of its handler's task): when it arrived, and
    whether its ``validate`` span is made (at its first sequence's submission)."""

    started_ns: int
    validated: bool = False


_current_http: ContextVar[HttpTrace | None] = ContextVar("current_http", default=None)


@dataclass
class RequestTrace:
    """One sequence's spans: ``infer``, and its ``queue`` then ``detokenize`` children.

    ``carrier`` is the ``infer`` span's W3C context, for ``Request.trace_context``."""

    span: Span
    queue: Span
    carrier: dict[str, str] = field(default_factory=dict)
    detokenize: Span | None = None
    # Set when the sequence ended with an error (its message) or with its last token.
    error: str | None = None
    finished: bool = False

    def first_token(self, tracer: Tracer, now_ns: int) -> Span:
        """Ends the queue wait and starts detokenization (its first token came back at ``now_ns``)."""
        from opentelemetry import trace

        self.queue.end(now_ns)
        self.detokenize = tracer.start_span(
            "detokenize", context=trace.set_span_in_context(self.span), start_time=now_ns
        )
        return self.detokenize

    def fail(self, message: str) -> None:
        self.error = message

    def end_finished(self, finish_reason: str, generated_tokens: int) -> None:
        """The handler took its last event (``Infer``): how it ended."""
        self.finished = True
        self.span.set_attribute("gen_ai.response.finish_reasons", (finish_reason,))
        self.span.set_attribute("gen_ai.usage.output_tokens", generated_tokens)

    def close(self, cancelled: bool) -> None:
        """Ends every span still open: its handler is done with it (finished, failed or gone)."""
        from opentelemetry.trace import Status, StatusCode

        now = time.time_ns()
        if self.detokenize is None:
            self.queue.end(now)
        elif self.detokenize.is_recording():
            self.detokenize.end(now)
        if self.error is not None:
            self.span.set_status(Status(StatusCode.ERROR, self.error))
        elif not self.finished:
            self.span.set_attribute("cancelled", cancelled)
            if not cancelled:
                self.span.set_status(Status(StatusCode.ERROR, "ended without its last token"))
        self.span.end(now)


class Traced(Protocol):
    """What the step hooks read of an entry (router/entry.py)."""

    trace: RequestTrace | None
    batched_at: float | None
    done: bool


class RouterTracer:
    """Makes the router's spans; one per process (``from_config``: None without ``--otlp-endpoint``)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("text_generation.router")

    @classmethod
    def from_config(cls, config: RouterConfig) -> RouterTracer | None:
        if config.otlp_endpoint is None:
            return None
        return cls(setup_tracing(config.otlp_endpoint, config.otlp_service_name))

    def shutdown(self) -> None:
        """Exports the spans still pending (the router is stopping)."""
        self.provider.shutdown()

    # -- HTTP ---------------------------------------------------------------------------------------
    def middleware(self) -> Any:
        """The outermost middleware: a SERVER span per request (see the module's docstring), current in
        the handler's task, continuing the request's ``traceparent``."""
        from opentelemetry import context, trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        tracer = self.tracer

        @web.middleware
        async def traced(request: web.Request, handler: Any) -> web.StreamResponse:
            if request.path in UNTRACED_PATHS or request.method == "OPTIONS":
                return await handler(request)
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else request.path
            started = time.time_ns()
            span = tracer.start_span(
                f"{request.method} {route}",
                context=extract_context(request.headers),
                kind=SpanKind.SERVER,
                start_time=started,
                attributes={"http.request.method": request.method, "http.route": route,
                            "url.path": request.path},
            )  # fmt: skip
            http = _current_http.set(HttpTrace(started))
            attached = context.attach(trace.set_span_in_context(span))
            try:
                response = await handler(request)
            except web.HTTPException as e:
                _end_http(span, e.status)
                raise
            except BaseException as e:
                span.record_exception(e)
                span.set_status(Status(StatusCode.ERROR, type(e).__name__))
                span.end()
                raise
            else:
                _end_http(span, response.status)
                return response
            finally:
                context.detach(attached)
                _current_http.reset(http)

        return traced

    # -- sequences ----------------------------------------------------------------------------------
    def sequence(self, entry_id: int, group: int, input_length: int, max_new_tokens: int) -> RequestTrace:
        """The spans of a sequence being submitted, children of the current HTTP request's span (the
        request's first sequence also ends its ``validate`` span)."""
        from opentelemetry import trace

        now = time.time_ns()
        http = _current_http.get()
        if http is not None and not http.validated:
            http.validated = True
            self.tracer.start_span("validate", start_time=http.started_ns).end(now)
        span = self.tracer.start_span(
            "infer",
            start_time=now,
            attributes={"request.id": entry_id, "request.group": group,
                        "gen_ai.usage.input_tokens": input_length,
                        "gen_ai.request.max_tokens": max_new_tokens},
        )  # fmt: skip
        sequence = trace.set_span_in_context(span)
        queue = self.tracer.start_span("queue", context=sequence, start_time=now)
        carrier: dict[str, str] = {}
        inject_context(carrier, sequence)
        return RequestTrace(span, queue, carrier)

    def step_rows(self, running: Mapping[int, Traced], out: pb.StepOutput) -> list[tuple[Traced, int, bool]]:
        """Before a step's output is delivered: its traced rows (entry, token id, whether it is the entry's
        first token; a speculative step gives a request several rows), and the failures it reports
        recorded on their traces."""
        g = out.generations
        for failure in g.failures:
            entry = running.get(failure.request_id)
            if entry is not None and entry.trace is not None:
                entry.trace.fail(failure.message)
        rows = []
        seen: set[int] = set()
        for rid, token_id in zip(g.request_ids, g.token_ids, strict=True):
            entry = running.get(rid)
            if entry is not None and entry.trace is not None:
                rows.append((entry, token_id, entry.batched_at is None and rid not in seen))
                seen.add(rid)
        return rows

    def stepped(
        self, rows: list[tuple[Traced, int, bool]], out: pb.StepOutput, started_ns: int, ended_ns: int
    ) -> None:
        """After a step's output was delivered (``started_ns`` to ``ended_ns``, epoch): one ``step`` event
        per traced row; the rows that ended close their ``detokenize`` span."""
        attributes = {"step": out.step, "router.detokenize_ns": ended_ns - started_ns}
        for entry, token_id, first in rows:
            trace = entry.trace
            assert trace is not None
            detokenize = trace.first_token(self.tracer, started_ns) if first else trace.detokenize
            if detokenize is None:
                continue
            if not detokenize.is_recording():  # ended by an earlier row of this step (or not sampled)
                continue
            detokenize.add_event("step", {**attributes, "token.id": token_id}, timestamp=ended_ns)
            if entry.done:
                detokenize.end(ended_ns)

    @contextlib.contextmanager
    def warmup(self) -> Iterator[list[tuple[str, str]]]:
        """A ``warmup`` span for the start-up's Warmup call; yields the gRPC metadata that carries its
        context to the shard."""
        from opentelemetry import trace

        with self.tracer.start_as_current_span("warmup") as span:
            carrier: dict[str, str] = {}
            inject_context(carrier, trace.set_span_in_context(span))
            yield list(carrier.items())


def _end_http(span: Span, status: int) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()
