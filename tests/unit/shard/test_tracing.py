"""Rank 0's spans (shard/tracing.py), exported to memory: a request's span under the router's, the step
spans that link to it, and how requests end (last token, failure, abort)."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanContext, StatusCode

from common.tracing import inject_context
from proto import pb
from shard.config import ShardConfig
from shard.core import Output
from shard.tracing import ShardTracer
from shard.types import RequestFailure, StepResult

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def traced() -> tuple[ShardTracer, InMemorySpanExporter, TracerProvider]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return ShardTracer(provider), exporter, provider


def router_request(provider: TracerProvider, rid: int) -> tuple[pb.Request, SpanContext]:
    """A request as the router sends it, with the context of a router span (ended at once)."""
    from opentelemetry import trace

    span = provider.get_tracer("router").start_span("infer")
    span.end()
    message = pb.Request(id=rid, input_ids=[1, 2, 3], max_new_tokens=4)
    inject_context(message.trace_context, trace.set_span_in_context(span))
    return message, span.get_span_context()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def output(ids: list[int], reasons: list[int], failures: list[RequestFailure] | None = None) -> Output:
    result = StepResult(ids, [7] * len(ids), [0.0] * len(ids), failures=failures or [])
    return Output(result, reasons, forward_ns=5, running=len(ids))


def test_a_request_span_is_the_routers_child_and_each_step_links_to_it(traced) -> None:
    tracer, exporter, provider = traced
    first, router_span = router_request(provider, 1)
    untraced = pb.Request(id=2, input_ids=[1], max_new_tokens=4)
    tracer.added([first, untraced], 100)
    assert set(tracer.requests) == {1}
    tracer.stepped(1, [], output([1, 2], [pb.FINISH_NONE, pb.FINISH_NONE]), 100, 200)
    tracer.stepped(2, [], output([2], [pb.FINISH_NONE]), 200, 300)  # no traced request in it: no span
    tracer.stepped(3, [], output([1, 2], [pb.FINISH_LENGTH, pb.FINISH_NONE]), 300, 400)
    assert tracer.requests == {}
    (request,) = named(exporter, "request")
    assert request.context.trace_id == router_span.trace_id
    assert request.parent is not None and request.parent.span_id == router_span.span_id
    assert (request.start_time, request.end_time) == (100, 400)
    assert request.attributes == {
        "request.id": 1, "gen_ai.usage.input_tokens": 3, "gen_ai.request.max_tokens": 4,
        "finish_reason": "FINISH_LENGTH", "gen_ai.usage.output_tokens": 2,
    }  # fmt: skip
    assert [e.attributes["step"] for e in request.events if e.attributes is not None] == [1, 3]
    steps = named(exporter, "step")
    assert [s.attributes["step"] for s in steps if s.attributes is not None] == [1, 3]
    for step in steps:
        assert step.parent is None and step.context.trace_id != router_span.trace_id
        assert [link.context.span_id for link in step.links] == [request.context.span_id]
        assert step.attributes is not None and step.attributes["requests"] == 2


def test_a_failed_request_is_an_error_and_an_aborted_one_ends_before_the_step(traced) -> None:
    tracer, exporter, provider = traced
    tracer.added([router_request(provider, 1)[0], router_request(provider, 2)[0]], 100)
    tracer.stepped(1, [2], output([], [], [RequestFailure(1, "non-finite logits")]), 150, 200)
    assert tracer.requests == {}
    spans = {s.attributes["request.id"]: s for s in named(exporter, "request") if s.attributes is not None}
    assert spans[1].status.status_code == StatusCode.ERROR
    assert spans[1].status.description == "non-finite logits"
    assert spans[2].attributes is not None and spans[2].attributes["aborted"] is True
    assert spans[2].end_time == 150
    (step,) = named(exporter, "step")
    assert [link.context.span_id for link in step.links] == [spans[1].context.span_id]


def test_only_rank_0_traces_and_only_with_an_endpoint(tmp_path: Path) -> None:
    assert ShardTracer.from_config(ShardConfig(model_path=tmp_path)) is None
    follower = ShardConfig(model_path=tmp_path, otlp_endpoint="http://127.0.0.1:4317", rank=1, world_size=2)
    assert ShardTracer.from_config(follower) is None
    leader = ShardTracer.from_config(ShardConfig(model_path=tmp_path, otlp_endpoint="http://127.0.0.1:4317"))
    assert leader is not None
    leader.shutdown()
