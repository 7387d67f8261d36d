"""The router's spans (router/tracing.py) through ``Infer`` against the fake shard, exported to memory: a
sequence's spans and events, its context on the wire, and how failures and cancellations end them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from proto import pb
from router.config import RouterConfig
from router.errors import GenerationError
from router.infer import Infer
from router.tracing import RouterTracer
from tests.fake_shard import FakeShard

from .test_engine_client import generate, settle, start, validate

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def traced(tiny_model_dir: Path) -> AsyncIterator[tuple[Infer, FakeShard, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    infer, shard, close = await start(tiny_model_dir, RouterTracer(provider))
    try:
        yield infer, shard, exporter
    finally:
        await close()


def by_name(exporter: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    spans: dict[str, list[ReadableSpan]] = {}
    for span in exporter.get_finished_spans():
        spans.setdefault(span.name, []).append(span)
    return spans


def parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_a_sequence_has_its_queue_and_detokenize_spans_and_its_context_goes_to_the_shard(
    traced: tuple[Infer, FakeShard, InMemorySpanExporter],
) -> None:
    infer, shard, exporter = traced
    sent: list[pb.Request] = []
    add = shard.add
    shard.add = lambda requests: (sent.extend(requests), add(requests))[1]  # type: ignore[method-assign]
    result = await generate(infer, "Hello", max_new_tokens=5)
    assert result.generated_tokens == 5
    spans = by_name(exporter)
    (sequence,) = spans["infer"]
    (queue,) = spans["queue"]
    (detokenize,) = spans["detokenize"]
    context = sequence.get_span_context()
    assert parent_of(queue) == parent_of(detokenize) == context.span_id
    assert sequence.attributes is not None
    assert sequence.attributes["gen_ai.usage.output_tokens"] == 5
    assert sequence.attributes["gen_ai.response.finish_reasons"] == ("length",)
    assert sequence.status.status_code == StatusCode.UNSET
    # The queue wait ends where detokenization starts: the first token.
    assert queue.end_time == detokenize.start_time
    assert [e.name for e in detokenize.events] == ["step"] * 5
    steps = [e.attributes["step"] for e in detokenize.events if e.attributes is not None]
    assert steps == sorted(steps) and len(set(steps)) == 5
    # The shard got the sequence span's W3C context with the request.
    traceparent = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    assert [dict(r.trace_context) for r in sent] == [{"traceparent": traceparent}]
    # Start-up's warm-up has its span too; without an HTTP request around it, no validate span.
    assert "warmup" in spans and "validate" not in spans


async def test_a_failed_sequence_is_an_error_and_a_cancelled_one_says_so(
    traced: tuple[Infer, FakeShard, InMemorySpanExporter],
) -> None:
    infer, shard, exporter = traced
    with pytest.raises(GenerationError, match="non-finite logits"):
        await generate(infer, "Hello", max_new_tokens=20, fault="nan")
    (failed,) = by_name(exporter)["infer"]
    assert failed.status.status_code == StatusCode.ERROR and "non-finite" in (failed.status.description or "")
    exporter.clear()
    shard.step_s = 0.01
    async with infer.request(await validate(infer, "Hello", stream=True, max_new_tokens=1000)) as entry:
        async for _ in infer.stream(entry):
            break  # the client goes away after one token
    await settle(infer, shard)
    spans = by_name(exporter)
    (cancelled,) = spans["infer"]
    assert cancelled.attributes is not None and cancelled.attributes["cancelled"] is True
    assert cancelled.status.status_code == StatusCode.UNSET
    assert len(spans["detokenize"]) == 1  # ended with its sequence


async def test_without_an_endpoint_there_is_no_tracer_and_nothing_travels(tiny_model_dir: Path) -> None:
    assert RouterTracer.from_config(RouterConfig(tokenizer_name="t", model_id="t")) is None
    infer, shard, close = await start(tiny_model_dir)
    try:
        sent: list[pb.Request] = []
        add = shard.add
        shard.add = lambda requests: (sent.extend(requests), add(requests))[1]  # type: ignore[method-assign]
        async with infer.request(await validate(infer, "Hello", max_new_tokens=2)) as entry:
            await infer.generate(entry)
        assert entry.trace is None and infer.engine.tracer is None
        assert [dict(r.trace_context) for r in sent] == [{}]
    finally:
        await close()
