"""OpenTelemetry traces end to end: the real launcher exports to an OTLP/gRPC receiver started here."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import requests
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from .conftest import stop_and_check
from .harness import Launched

pytestmark = pytest.mark.timeout(300)

SPANS_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Span:
    """One exported span, flattened: its service and ids in hex."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    links: tuple[tuple[str, str], ...]
    # Each event's name and its "step" attribute (0 when it has none).
    events: tuple[tuple[str, int], ...]
    attributes: dict


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace collector: keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        got = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    got.append(
                        Span(
                            service=resource.get("service.name", ""),
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in s.links),
                            events=tuple((e.name, _step(e.attributes)) for e in s.events),
                            attributes={a.key: _value(a.value) for a in s.attributes},
                        )
                    )
        with self.lock:
            self.spans.extend(got)
        return trace_service_pb2.ExportTraceServiceResponse()

    def wait_for(self, done, what: str) -> list[Span]:
        """The spans received once ``done(spans)`` holds (within SPANS_TIMEOUT_S)."""
        deadline = time.monotonic() + SPANS_TIMEOUT_S
        while True:
            with self.lock:
                spans = list(self.spans)
            if done(spans):
                return spans
            if time.monotonic() > deadline:
                names = sorted({(s.service, s.name) for s in spans})
                raise AssertionError(f"no {what} after {SPANS_TIMEOUT_S} s; spans received: {names}")
            time.sleep(0.2)


def _step(attributes) -> int:
    return next((a.value.int_value for a in attributes if a.key == "step"), 0)


def _value(v) -> object:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind in ("string_value", "int_value", "bool_value", "double_value") else kind


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    collector = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield collector, port
    finally:
        server.stop(grace=None)


def in_trace(spans: list[Span], trace_id: str) -> dict[tuple[str, str], Span]:
    return {(s.service, s.name): s for s in spans if s.trace_id == trace_id}


def test_a_streamed_request_is_one_trace_across_router_and_shard(
    receiver: tuple[Receiver, int], tiny_model_dir: Path, tmp_path: Path
) -> None:
    collector, port = receiver
    server = Launched(
        # The endpoint by its environment variable (TGI's OTLP_ENDPOINT), the service name by flag.
        ["--model-id", str(tiny_model_dir), "--otlp-service-name", "tgi-test.router"],
        env={"OTLP_ENDPOINT": f"http://127.0.0.1:{port}", "OTEL_BSP_SCHEDULE_DELAY": "100"},
    ).start(tmp_path)
    try:
        server.wait_healthy(120)
        response = requests.post(
            f"{server.url}/generate_stream",
            json={
                "inputs": "Hello",
                "parameters": {"max_new_tokens": 4, "ignore_eos_token": True, "details": True},
            },
            stream=True,
            timeout=60,
        )
        assert response.status_code == 200
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith(b"data:")]
        assert events[-1]["details"]["generated_tokens"] == 4

        def router_span(spans: list[Span]) -> Span | None:
            return next((s for s in spans if s.name == "POST /generate_stream"), None)

        def complete(spans: list[Span]) -> bool:
            http = router_span(spans)
            if http is None:
                return False
            names = set(in_trace(spans, http.trace_id))
            wanted = {("tgi-test.router", n) for n in ("validate", "infer", "queue", "detokenize")}
            return wanted | {("tgi-test.server", "request")} <= names and any(
                s.name == "step" and s.links for s in spans
            )

        spans = collector.wait_for(complete, "trace of the streamed request")
        http = router_span(spans)
        assert http is not None and http.service == "tgi-test.router"
        assert http.parent_span_id == "" and http.attributes["http.response.status_code"] == 200
        trace = in_trace(spans, http.trace_id)
        infer = trace[("tgi-test.router", "infer")]
        assert trace[("tgi-test.router", "validate")].parent_span_id == http.span_id
        assert infer.parent_span_id == http.span_id
        assert infer.attributes["gen_ai.usage.output_tokens"] == 4
        assert trace[("tgi-test.router", "queue")].parent_span_id == infer.span_id
        detokenize = trace[("tgi-test.router", "detokenize")]
        assert detokenize.parent_span_id == infer.span_id
        assert [name for name, _ in detokenize.events] == ["step"] * 4  # one per token
        # The shard's span of the request is the router's sequence span's child, in the same trace ...
        request = trace[("tgi-test.server", "request")]
        assert request.parent_span_id == infer.span_id
        assert request.attributes["finish_reason"] == "FINISH_LENGTH"
        assert request.events == detokenize.events  # the same steps (a speculative step gives several)
        # ... and the shard's step spans that gave it its tokens link to it, numbered as both say.
        steps = [s for s in spans if s.name == "step" and (http.trace_id, request.span_id) in s.links]
        assert {s.attributes["step"] for s in steps} == {step for _, step in request.events}
        assert {s.service for s in steps} == {"tgi-test.server"} and 0 not in {
            s.attributes["step"] for s in steps
        }
        assert all(s.trace_id != http.trace_id for s in steps)  # a step works for many traces: links
        # Start-up's warm-up: the shard's span is the router's child through the call's gRPC metadata.
        warmups = {s.service: s for s in spans if s.name == "warmup"}
        assert warmups["tgi-test.server"].parent_span_id == warmups["tgi-test.router"].span_id
        # Probes get no span.
        assert requests.get(f"{server.url}/health", timeout=10).status_code == 200
        assert not any("/health" in s.name for s in spans)
    finally:
        stop_and_check(server)


def test_an_incoming_traceparent_is_continued(
    receiver: tuple[Receiver, int], tiny_model_dir: Path, tmp_path: Path
) -> None:
    collector, port = receiver
    server = Launched(
        ["--model-id", str(tiny_model_dir), "--otlp-endpoint", f"http://127.0.0.1:{port}"],
        env={"OTEL_BSP_SCHEDULE_DELAY": "100"},
    ).start(tmp_path)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        server.wait_healthy(120)
        response = requests.post(
            f"{server.url}/generate",
            json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}},
            headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
            timeout=60,
        )
        assert response.status_code == 200
        spans = collector.wait_for(
            lambda spans: ("text-generation-inference.server", "request") in in_trace(spans, trace_id),
            "shard span in the client's trace",
        )
        trace = in_trace(spans, trace_id)
        http = trace[("text-generation-inference.router", "POST /generate")]
        assert http.parent_span_id == parent_id
        assert trace[("text-generation-inference.router", "infer")].parent_span_id == http.span_id
    finally:
        stop_and_check(server)
