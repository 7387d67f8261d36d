"""OpenTelemetry traces (``--otlp-endpoint``, ``--otlp-service-name``): what the router and the shards share.

Each process that traces builds its own SDK ``TracerProvider`` with ``setup_tracing``: its spans go, in
batches and off the request path, to the OTLP/gRPC collector at the endpoint. Without an endpoint nothing
here is imported or called: the router and the shards then hold no tracer at all, and their hooks are
``if tracer is not None`` checks once per request and once per step (docs/architecture.md, Traces).

A request's trace context crosses processes in W3C Trace Context form (``traceparent``, ``tracestate``):
from the client in HTTP headers, from the router to the shard in ``Request.trace_context`` (the one
long-lived ``Generate`` stream carries many requests, so the context travels with each request, not in the
stream's gRPC metadata) and in the gRPC metadata of the unary ``Warmup`` call.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping, MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider

# TGI's service names: the router's is --otlp-service-name's default; the shards report under the same
# name with ``.server`` for ``.router`` (``shard_service_name``).
ROUTER_SERVICE_NAME = "text-generation-inference.router"
SHARD_SERVICE_NAME = "text-generation-inference.server"
# The most events one span keeps (the SDK's default is 128): a request's span has one per step it took part
# in; past this many the SDK drops the rest and reports how many it dropped (``dropped_events_count``).
MAX_SPAN_EVENTS = 4096
# How long one export may take, retries included (the SDK's default is 10 s): the router and the shards
# export what is pending when they stop, within the launcher's grace, even when the collector is gone.
# OTEL_EXPORTER_OTLP_TIMEOUT or OTEL_EXPORTER_OTLP_TRACES_TIMEOUT set another.
EXPORT_TIMEOUT_S = 3.0
TIMEOUT_VARIABLES = ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
# What --otlp-endpoint needs (the project's dependencies, checked when the flag is given): a module of each
# distribution.
OTEL_DISTRIBUTIONS = {
    "opentelemetry.sdk": "opentelemetry-sdk",
    "opentelemetry.exporter.otlp.proto.grpc": "opentelemetry-exporter-otlp-proto-grpc",
}


def shard_service_name(router_service_name: str) -> str:
    """The shards' service name for the router's: ``X.router`` -> ``X.server`` (TGI's pair by default),
    any other ``X`` -> ``X.server``."""
    return router_service_name.removesuffix(".router") + ".server"


def check_otlp_endpoint(value: str) -> str:
    """``--otlp-endpoint``'s value: an OTLP/gRPC collector address, ``http://host:4317`` (plain text) or
    ``https://host:4317`` (TLS); a bare ``host:4317`` is TLS unless OTEL_EXPORTER_OTLP_INSECURE=true."""
    endpoint = value.strip()
    if not endpoint:
        raise ValueError("must be a collector address such as http://localhost:4317")
    missing = [dist for module, dist in OTEL_DISTRIBUTIONS.items() if not _importable(module)]
    if missing:
        raise ValueError(
            f"needs {', '.join(missing)}, which is not installed: pip install {' '.join(missing)}"
        )
    return endpoint


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def setup_tracing(endpoint: str, service_name: str) -> TracerProvider:
    """A tracer provider that exports this process's spans to ``endpoint`` (OTLP over gRPC) as
    ``service_name``. Sampling is the SDK's (parent-based, always on; OTEL_TRACES_SAMPLER changes it);
    ``shutdown()`` exports what is still pending."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: service_name}),
        span_limits=SpanLimits(max_events=MAX_SPAN_EVENTS),
    )
    timeout = None if any(v in os.environ for v in TIMEOUT_VARIABLES) else EXPORT_TIMEOUT_S
    exporter = OTLPSpanExporter(endpoint=check_otlp_endpoint(endpoint), timeout=timeout)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def extract_context(carrier: Mapping[str, str]) -> Context:
    """The W3C trace context in ``carrier`` (HTTP headers, gRPC metadata, ``Request.trace_context``); an
    empty context (a new trace) when it holds none or an invalid one."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract(carrier)


def inject_context(carrier: MutableMapping[str, str], context: Context | None = None) -> None:
    """Writes ``context``'s span (default: the current one) into ``carrier`` as W3C ``traceparent`` (and
    ``tracestate``)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    TraceContextTextMapPropagator().inject(carrier, context)
