"""Rank 0's spans (``--otlp-endpoint``; common/tracing.py sets up the SDK).

- ``request``: one per request the router traces, a child of the router's ``infer`` span (its context comes
  in ``Request.trace_context``), from its arrival on the model thread until it ends (its last token, a
  failure, an abort); one ``step`` event per step that gave it a token or failed it.
- ``step``: one per step that ran traced requests, a root span with a link to each of their ``request``
  spans. A step serves many requests of many traces at once, so it cannot be the child of one of them:
  links are OpenTelemetry's way to say a span worked for several traces (TGI links its batch spans to
  its requests' spans in the same way). Its ``step`` attribute is ``StepOutput.step``, which the router's
  ``step`` events carry too.
- ``warmup``: the ``Warmup`` call, a child of the router's start-up span (its context comes in the call's
  gRPC metadata).

All of it runs on the model thread, between steps; without an endpoint there is no ``ShardTracer`` and the
model thread's hooks are one ``is None`` check per step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from common.tracing import extract_context, setup_tracing
from proto import pb

from .config import ShardConfig
from .core import Output

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span


@dataclass
class OpenRequest:
    """A live traced request: its ``request`` span and the tokens it was given so far."""

    span: Span
    tokens: int = 0


class ShardTracer:
    """Makes rank 0's spans (see the module's docstring); ``from_config``: None without an endpoint."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("text_generation.shard")
        # The open ``request`` span of each live traced request.
        self.requests: dict[int, OpenRequest] = {}

    @classmethod
    def from_config(cls, config: ShardConfig) -> ShardTracer | None:
        if config.otlp_endpoint is None or config.rank != 0:  # the other ranks' outputs are dropped
            return None
        return cls(setup_tracing(config.otlp_endpoint, config.otlp_service_name))

    def shutdown(self) -> None:
        """Exports the spans still pending (the shard is stopping)."""
        self.provider.shutdown()

    def added(self, requests: Sequence[pb.Request], now_ns: int) -> None:
        """Opens the ``request`` span of each traced request added (before the core sees them)."""
        from opentelemetry.trace import SpanKind

        for r in requests:
            if not r.trace_context or r.id in self.requests:
                continue
            span = self.tracer.start_span(
                "request",
                context=extract_context(r.trace_context),
                kind=SpanKind.SERVER,
                start_time=now_ns,
                attributes={"request.id": r.id, "gen_ai.usage.input_tokens": len(r.input_ids),
                            "gen_ai.request.max_tokens": r.max_new_tokens},
            )  # fmt: skip
            if span.is_recording():  # the router's span was sampled
                self.requests[r.id] = OpenRequest(span)

    def stepped(
        self, step: int, aborted: Sequence[int], out: Output | None, started_ns: int, ended_ns: int
    ) -> None:
        """After the model thread's turn (``started_ns`` to ``ended_ns``): the ``step`` span of the step
        ``out`` (None: none ran), the events of its requests, and the end of every request that ended in
        it or was ``aborted`` before it."""
        from opentelemetry.trace import Link, Status, StatusCode

        now = ended_ns
        for rid in aborted:
            open_request = self.requests.pop(rid, None)
            if open_request is not None:
                open_request.span.set_attribute("aborted", True)
                open_request.span.end(started_ns)
        if out is None:
            return
        result = out.result
        traced = [(row, rid) for row, rid in enumerate(result.request_ids) if rid in self.requests]
        failed = [f for f in result.failures if f.request_id in self.requests]
        if not traced and not failed:
            return
        linked = dict.fromkeys([rid for _, rid in traced] + [f.request_id for f in failed])
        links = [Link(self.requests[rid].span.get_span_context()) for rid in linked]
        span = self.tracer.start_span(
            "step",
            links=links,
            start_time=started_ns,
            attributes={"step": step, "requests": len(set(result.request_ids)), "prefill": out.prefill,
                        "failed": out.failed, "joined": out.joined, "waiting": out.waiting,
                        "running": out.running, "forward_ns": out.forward_ns},
        )  # fmt: skip
        if out.failed:
            span.set_status(Status(StatusCode.ERROR, "the step failed"))
        span.end(now)
        reasons = out.finish_reasons
        for row, rid in traced:
            request = self.requests.get(rid)
            if request is None:  # its last token came in an earlier row of this (speculative) step
                continue
            request.tokens += 1
            request.span.add_event("step", {"step": step, "token.id": result.token_ids[row]}, timestamp=now)
            reason = reasons[row] if row < len(reasons) else pb.FINISH_NONE
            if reason != pb.FINISH_NONE:
                request.span.set_attribute("finish_reason", pb.FinishReason.Name(reason))
                request.span.set_attribute("gen_ai.usage.output_tokens", request.tokens)
                del self.requests[rid]
                request.span.end(now)
        for failure in failed:
            request = self.requests.pop(failure.request_id, None)
            if request is None:  # listed twice
                continue
            request.span.add_event("step", {"step": step}, timestamp=now)
            request.span.set_status(Status(StatusCode.ERROR, failure.message))
            request.span.end(now)

    @contextmanager
    def warmup(self, metadata: Sequence[tuple[str, str | bytes]]) -> Iterator[None]:
        """The ``warmup`` span, a child of the context in the call's gRPC metadata."""
        carrier = {key: value for key, value in metadata if isinstance(value, str)}
        with self.tracer.start_as_current_span("warmup", context=extract_context(carrier)):
            yield
