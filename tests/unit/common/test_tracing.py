"""common/tracing.py: nothing of OpenTelemetry is loaded without an endpoint, W3C context in and out, and
a collector that is gone does not hold a stopping process up."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time

import pytest
from opentelemetry import trace

from common.tracing import (
    EXPORT_TIMEOUT_S,
    TIMEOUT_VARIABLES,
    check_otlp_endpoint,
    extract_context,
    inject_context,
    setup_tracing,
)
from tests.e2e.harness import REPO

pytestmark = pytest.mark.timeout(120)


def test_nothing_of_opentelemetry_is_loaded_without_an_endpoint(tmp_path) -> None:
    code = f"""
import sys
from pathlib import Path
import launcher.supervisor, router.app, router.infer, shard.server
from router.config import RouterConfig
from router.tracing import RouterTracer
from shard.config import ShardConfig
from shard.tracing import ShardTracer
assert RouterTracer.from_config(RouterConfig(tokenizer_name="t", model_id="t")) is None
assert ShardTracer.from_config(ShardConfig(model_path=Path({str(tmp_path)!r}))) is None
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=100, check=True
    )
    assert done.stdout.strip() == "[]"


def test_an_endpoint_is_refused_blank_or_without_the_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_otlp_endpoint(" http://c:4317 ") == "http://c:4317"
    with pytest.raises(ValueError, match="collector address"):
        check_otlp_endpoint("  ")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "opentelemetry.sdk" else find_spec(name, *a),
    )
    with pytest.raises(ValueError, match="needs opentelemetry-sdk, which is not installed: pip install"):
        check_otlp_endpoint("http://c:4317")


def test_a_context_goes_out_and_comes_back() -> None:
    provider = setup_tracing("http://127.0.0.1:4317", "test")
    try:
        span = provider.get_tracer("t").start_span("s")
        carrier: dict[str, str] = {}
        inject_context(carrier, trace.set_span_in_context(span))
        back = trace.get_current_span(extract_context(carrier)).get_span_context()
        assert (back.trace_id, back.span_id, back.is_remote) == (
            span.get_span_context().trace_id,
            span.get_span_context().span_id,
            True,
        )
        # A malformed traceparent is no context: the request starts a trace of its own.
        bad = trace.get_current_span(extract_context({"traceparent": "00-xyz-01"})).get_span_context()
        assert not bad.is_valid
    finally:
        provider.shutdown()


def test_a_gone_collector_does_not_hold_the_stop_up(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in TIMEOUT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    provider = setup_tracing(f"http://127.0.0.1:{port}", "test")
    tracer = provider.get_tracer("t")
    for _ in range(10):
        tracer.start_span("s").end()
    started = time.monotonic()
    provider.shutdown()
    assert time.monotonic() - started < EXPORT_TIMEOUT_S + 2.0
