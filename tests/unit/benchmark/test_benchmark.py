"""The serving benchmark tool: metrics on hand-made records, the SSE/TGI parsing, and whole `serve` runs
against a fake TGI streaming server (aiohttp, 127.0.0.1, ephemeral port, in a thread of this process)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from benchmark.cli import concurrency_list, main, rate_list
from benchmark.clients import RequestError, StreamEvent
from benchmark.clients.openai import ChunkParser
from benchmark.clients.openai import http_error as openai_http_error
from benchmark.clients.tgi import http_error, parse_event
from benchmark.config import GenerationParams, Level, ServeConfig
from benchmark.metrics import (
    Distribution,
    compute_level_metrics,
    percentile,
    single_stream_decode_tokens_per_s,
)
from benchmark.progress import Progress
from benchmark.prompts import synthetic_prompt
from benchmark.records import RequestRecord
from benchmark.report import format_summary, format_table
from benchmark.runner import LevelResult, run_rate_level
from benchmark.serve import LevelOutcome, ServeResult
from benchmark.sse import SSEParser
from benchmark.workload import arrival_schedule, draw_length, length_range, make_requests, poisson_arrivals

REPO = Path(__file__).resolve().parents[3]


# ---------------------------------------------------------------------------------------------------------
# The fake TGI server


@dataclass
class FakeBehaviour:
    """How the fake answers; request indices count arrivals from 0 (warmup requests included)."""

    ttft_s: float = 0.03
    gap_s: float = 0.01
    reject_429: set[int] = field(default_factory=set)  # answered 429 before the stream
    error_event: set[int] = field(default_factory=set)  # error event after ERROR_AFTER tokens
    stall: set[int] = field(default_factory=set)  # wait STALL_S before the first token
    extra_reported_tokens: int = 0  # added to details.generated_tokens (a lying server)


ERROR_AFTER = 2
STALL_S = 30.0


class FakeServer:
    """An aiohttp app on 127.0.0.1 (ephemeral port) served by an event loop in a thread of this process."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.active = 0
        self.max_active = 0
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def _start(self) -> None:
        app = web.Application()
        self.add_routes(app)
        # Cancel a handler when its client goes away (timeouts), so that stalled ones end at once.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    @contextlib.asynccontextmanager
    async def streaming(self, request: web.Request) -> AsyncIterator[web.StreamResponse]:
        """An SSE response to ``request``, counted in ``active`` while the block writes it; ended after the
        block, or quietly when the client went away."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            yield response
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.active -= 1

    def start(self):
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


class FakeTgi(FakeServer):
    """A TGI `/generate_stream` look-alike: max_new_tokens token events, the last with details."""

    def __init__(self) -> None:
        super().__init__()
        self.behaviour = FakeBehaviour()

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/generate_stream", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        index = len(self.bodies)
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        b = self.behaviour
        if index in b.reject_429:
            return web.json_response({"error": "Model is overloaded", "error_type": "overloaded"}, status=429)
        n = body["parameters"]["max_new_tokens"]
        async with self.streaming(request) as response:
            await asyncio.sleep(b.ttft_s + (STALL_S if index in b.stall else 0.0))
            for i in range(n):
                if i:
                    await asyncio.sleep(b.gap_s)
                if index in b.error_event and i == ERROR_AFTER:
                    await response.write(b'data: {"error":"boom","error_type":"generation"}\n\n')
                    break
                last = i == n - 1
                event = {
                    "token": {"id": 5 + i, "text": f" t{i}", "logprob": -0.1, "special": False},
                    "generated_text": "".join(f" t{j}" for j in range(n)) if last else None,
                    "details": {
                        "finish_reason": "length",
                        "generated_tokens": n + b.extra_reported_tokens,
                        "seed": None,
                    }
                    if last
                    else None,
                }
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
        return response


@dataclass
class OpenAIBehaviour:
    """How the fake OpenAI server answers; request indices count chat/completions arrivals from 0."""

    ttft_s: float = 0.02
    gap_s: float = 0.005
    models: tuple[str, ...] = ("fake-model", "other-model")
    # Tokens i with i % silent_every == silent_every - 1 decode to no text and send no chunk (as ours does
    # for an incomplete UTF-8 sequence), so chunks < tokens: only usage gives the true count.
    silent_every: int = 3
    reject_429: set[int] = field(default_factory=set)
    error_chunk: set[int] = field(default_factory=set)  # error chunk after ERROR_AFTER tokens
    no_done: bool = False  # end the stream without data: [DONE]


class FakeOpenAI(FakeServer):
    """An OpenAI-API look-alike (`/v1/models`, streaming `/v1/chat/completions` and `/v1/completions`) that
    honours ``stream_options.include_usage`` the way OpenAI, vLLM and our server do: ``"usage": null`` in
    every chunk, then one last chunk with no choices and the usage."""

    def __init__(self) -> None:
        super().__init__()
        self.behaviour = OpenAIBehaviour()
        self.paths: list[str] = []

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_post("/v1/completions", self._generate)

    async def _models(self, request: web.Request) -> web.Response:
        data = [{"id": name, "object": "model", "owned_by": "fake"} for name in self.behaviour.models]
        return web.json_response({"object": "list", "data": data})

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        index = len(self.bodies)
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        self.paths.append(request.path)
        b = self.behaviour
        if index in b.reject_429:
            error = {"message": "too many requests", "type": "overloaded", "param": None, "code": 429}
            return web.json_response({"error": error}, status=429)
        chat = request.path.endswith("/chat/completions")
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        n = body["max_tokens"]
        head = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion", "model": "m"}

        def chunk(text: str | None, finish: str | None = None) -> bytes:
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            obj = {**head, "choices": [choice], **({"usage": None} if usage else {})}
            return f"data: {json.dumps(obj)}\n\n".encode()

        async with self.streaming(request) as response:
            if chat:
                await response.write(chunk(None).replace(b'"delta": {}', b'"delta": {"role": "assistant"}'))
            await asyncio.sleep(b.ttft_s)
            for i in range(n):
                if i:
                    await asyncio.sleep(b.gap_s)
                if index in b.error_chunk and i == ERROR_AFTER:
                    error = {"message": "boom", "type": "generation", "param": None, "code": 500}
                    await response.write(f"data: {json.dumps({'error': error})}\n\n".encode())
                    break
                if b.silent_every and i % b.silent_every == b.silent_every - 1:
                    continue
                await response.write(chunk(f" t{i}"))
            else:
                await response.write(chunk(None if chat else "", "length"))
                if usage:
                    counts = {"prompt_tokens": 7, "completion_tokens": n, "total_tokens": 7 + n}
                    await response.write(
                        f"data: {json.dumps({**head, 'choices': [], 'usage': counts})}\n\n".encode()
                    )
            if not b.no_done:
                await response.write(b"data: [DONE]\n\n")
        return response


@pytest.fixture
def fake_tgi():
    server = FakeTgi().start()
    yield server
    server.stop()


@pytest.fixture
def fake_openai():
    server = FakeOpenAI().start()
    yield server
    server.stop()


def run_cli(args: list[str]) -> int:
    return main(["serve", *args])


# ---------------------------------------------------------------------------------------------------------
# Metrics on hand-made records


def make_record(index: int, token_times: list[float], *, ok: bool = True, kind: str | None = None):
    record = RequestRecord(index=index, concurrency=1)
    for t in token_times:
        record.add_tokens(1, t)
    if ok:
        record.ok = True
        record.e2e_s = token_times[-1]
        record.server_output_tokens = len(token_times)
    else:
        record.fail(kind or "http_500", "failed", at_s=token_times[-1] if token_times else 0.01)
    return record


@pytest.mark.timeout(60)
def test_percentile_interpolates_linearly():
    values = [float(v) for v in range(1, 101)]  # shuffled order must not matter
    values.reverse()
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0], 50) == pytest.approx(1.5)
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1.0], 101)


@pytest.mark.timeout(60)
def test_distribution_summary():
    dist = Distribution.of([0.4, 0.1, 0.2, 0.3])
    assert dist.count == 4
    assert dist.mean == pytest.approx(0.25)
    assert (dist.min, dist.max) == (0.1, 0.4)
    assert dist.p50 == pytest.approx(0.25)
    empty = Distribution.of([])
    assert empty.count == 0 and empty.p50 is None and empty.mean is None


@pytest.mark.timeout(60)
def test_record_tpot_and_inter_token_gaps():
    record = make_record(0, [0.1, 0.15, 0.2, 0.3])
    assert record.ttft_s == pytest.approx(0.1)
    assert record.output_tokens == 4
    assert record.tpot_s == pytest.approx((0.3 - 0.1) / 3)
    assert record.itl_s == pytest.approx([0.05, 0.05, 0.1])
    assert not record.token_count_mismatch
    record.server_output_tokens = 5
    assert record.token_count_mismatch
    # One token: no TPOT, no gaps; an event with several tokens adds equal arrival times.
    assert make_record(1, [0.2]).tpot_s is None
    multi = RequestRecord(index=2, concurrency=1)
    multi.add_tokens(2, 0.1)
    multi.add_tokens(0, 0.15)
    assert multi.token_times_s == [0.1, 0.1] and multi.ttft_s == 0.1
    as_json = json.loads(json.dumps(record.to_dict()))
    assert as_json["tpot_s"] == pytest.approx(record.tpot_s)


@pytest.mark.timeout(60)
def test_level_metrics_from_records():
    records = [
        make_record(0, [0.1, 0.2, 0.3, 0.4, 0.5]),  # TPOT 0.1, gaps 0.1
        make_record(1, [0.2, 0.22, 0.24]),  # TPOT 0.02, gaps 0.02
        make_record(2, [0.3, 0.6]),  # TPOT 0.3, gap 0.3
        make_record(3, [0.1, 0.2], ok=False, kind="stream:generation"),  # 2 tokens then an error
        make_record(4, [], ok=False, kind="http_429"),
        make_record(5, [], ok=False, kind="http_429"),
    ]
    records[1].server_output_tokens = 7  # the server disagrees with the events counted
    m = compute_level_metrics(4, records, wall_s=2.0)
    assert (m.concurrency, m.num_requests, m.num_ok, m.num_errors) == (4, 6, 3, 3)
    assert m.errors_by_kind == {"http_429": 2, "stream:generation": 1}
    assert m.output_tokens == 5 + 3 + 2 + 2  # partial answers of failed requests count as output
    assert m.output_tokens_per_s == pytest.approx(12 / 2.0)
    assert m.requests_per_s == pytest.approx(3 / 2.0)
    # Latencies use the successful requests only.
    assert m.ttft_s.count == 3 and m.ttft_s.p50 == pytest.approx(0.2)
    assert m.e2e_s.p50 == pytest.approx(0.5) and m.e2e_s.max == pytest.approx(0.6)
    assert m.tpot_s.count == 3 and m.tpot_s.p50 == pytest.approx(0.1)
    assert m.itl_s.count == 4 + 2 + 1  # gaps pooled over requests
    assert m.itl_s.p50 == pytest.approx(0.1)
    assert m.itl_s.p99 == pytest.approx(percentile([0.1] * 4 + [0.02] * 2 + [0.3], 99))
    assert m.token_count_mismatches == 1
    # 1 / median TPOT at concurrency 1 only.
    assert single_stream_decode_tokens_per_s([m]) is None
    single = compute_level_metrics(1, records[:3], wall_s=1.5)
    assert single_stream_decode_tokens_per_s([single, m]) == pytest.approx(10.0)


@pytest.mark.timeout(60)
def test_level_metrics_without_successes():
    m = compute_level_metrics(2, [make_record(0, [], ok=False, kind="timeout")], wall_s=0.0)
    assert m.num_ok == 0 and m.output_tokens_per_s == 0.0 and m.requests_per_s == 0.0
    assert m.ttft_s.p50 is None and m.errors_by_kind == {"timeout": 1}


@pytest.mark.timeout(60)
def test_summary_table_is_aligned():
    ok = [make_record(i, [0.1, 0.12, 0.14]) for i in range(3)]
    levels = [
        LevelOutcome(LevelResult(c, 3, 1.0, False, ok), compute_level_metrics(c, ok, 1.0)) for c in (1, 16)
    ]
    failed = [make_record(0, [], ok=False, kind="http_429")]
    levels.append(
        LevelOutcome(LevelResult(128, 1, 1.0, True, failed), compute_level_metrics(128, failed, 1.0))
    )
    result = ServeResult(ServeConfig(), "prompt", "2025-01-01T00:00:00+00:00", levels)
    text = format_summary(result)
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if "TTFT ms" in line)
    table = lines[header : header + 4]
    assert len({len(line) for line in table}) == 1  # aligned columns
    assert all(len(line) <= 130 for line in lines)  # one screen wide
    assert "errors at concurrency 128: http_429 x1" in text
    assert "single-stream decode: 50.0 tokens/s" in text
    assert format_table(["a", "bb"], [["100", "2"]]) == ["  a  bb", "100   2"]


@pytest.mark.timeout(60)
def test_progress_line():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    records = [make_record(0, [0.1, 0.2]), make_record(1, [], ok=False, kind="timeout")]
    for stream, live in ((Terminal(), True), (io.StringIO(), False)):
        progress = Progress(stream)
        assert progress.live is live
        progress.start_level(4, 2)
        progress.record(records[0], 1, 2)
        progress.record(records[1], 2, 2)
        progress.end_level(compute_level_metrics(4, records, 1.0))
        text = stream.getvalue().replace("\x1b[K", "")  # erase-to-end-of-line on a terminal
        assert text.endswith("concurrency 4: 2 requests in 1.0 s, 2.0 output tokens/s, 1 errors\n")
        assert ("2/2 requests, 1 errors" in text) is live  # in-place updates only on a terminal
    silent = io.StringIO()
    Progress(silent, enabled=False).end_level(compute_level_metrics(4, records, 1.0))
    assert silent.getvalue() == ""


# ---------------------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.timeout(60)
def test_sse_parser_reassembles_split_events():
    parser = SSEParser()
    stream = b': comment\r\ndata: {"a":1}\r\n\r\nevent: x\ndata: line1\ndata:line2\n\ndata: {"\xc3\xa9"}\n\n'
    events = []
    for i in range(len(stream)):  # one byte at a time: splits inside lines and inside UTF-8 sequences
        events += parser.feed(stream[i : i + 1])
    assert events == ['{"a":1}', "line1\nline2", '{"é"}']
    assert parser.feed(b"data: tail") == []
    assert parser.finish() == ["tail"]


@pytest.mark.timeout(60)
def test_sse_parser_whole_events_match_line_by_line():
    """Whole "\\n" events (the fast path) and any other split give the same events."""
    stream = (
        b'data: {"i":1}\n\n\ndata: {"i":2}\n\n: ping\ndata: a\ndata: b\n\nevent: e\ndata:x\n\n'
        b"data: \xe2\x82\xac\n\ndata: last\ndata: more"
    )
    expected = ['{"i":1}', '{"i":2}', "a\nb", "x", "\u20ac", "last\nmore"]
    for size in (1, 2, 3, 7, 16, len(stream)):
        parser = SSEParser()
        events = []
        for at in range(0, len(stream), size):
            events += parser.feed(stream[at : at + size])
        assert events + parser.finish() == expected, size
    # A \r\n stream switching to \n lines, and an event still open when the other kind arrives.
    parser = SSEParser()
    assert parser.feed(b"data: one\r\n\r\ndata: two\r\n") == ["one"]
    assert parser.feed(b"\ndata: three\n\n") == ["two", "three"]
    assert parser.finish() == []


@pytest.mark.timeout(60)
def test_tgi_events_and_errors():
    token = parse_event(
        '{"token":{"id":5,"text":" Paris","logprob":-0.1,"special":false},"generated_text":null}'
    )
    assert (token.num_tokens, token.text, token.final) == (1, " Paris", False)
    last = parse_event(
        '{"token":{"id":6,"text":".","special":false},"generated_text":"Paris.",'
        '"details":{"finish_reason":"eos_token","generated_tokens":2,"seed":null}}'
    )
    assert last.final and last.finish_reason == "eos_token" and last.server_output_tokens == 2
    with pytest.raises(RequestError) as error:
        parse_event('{"error":"out of memory","error_type":"generation"}')
    assert error.value.kind == "stream:generation"
    with pytest.raises(RequestError) as error:
        parse_event("not json")
    assert error.value.kind == "protocol"
    overloaded = http_error(429, '{"error":"Model is overloaded","error_type":"overloaded"}')
    assert (overloaded.kind, overloaded.error_type, overloaded.status) == ("http_429", "overloaded", 429)
    assert http_error(502, "<html>bad gateway</html>").kind == "http_502"


# ---------------------------------------------------------------------------------------------------------
# Configuration and CLI


@pytest.mark.timeout(60)
def test_config_and_arguments(capsys):
    assert concurrency_list("1,8,32") == (1, 8, 32)
    config = ServeConfig(concurrency=(1, 4, 32))
    assert [config.requests_for(c) for c in config.concurrency] == [8, 16, 128]
    assert ServeConfig(requests_per_level=5).requests_for(32) == 5
    with pytest.raises(ValueError, match="max_new_tokens"):
        ServeConfig(params=GenerationParams(max_new_tokens=0))
    assert len(synthetic_prompt(50).split()) == 50
    assert run_cli(["--concurrency", "1,x"]) == 2
    assert run_cli(["--concurrency", "0"]) == 2
    assert run_cli(["--prompt", "hi", "--input-tokens", "10"]) == 2
    assert run_cli(["--api", "nope"]) == 2
    assert main([]) == 2
    assert main(["--version"]) == 0
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------------------
# Whole `serve` runs against the fake


@pytest.mark.timeout(60)
def test_serve_end_to_end(fake_tgi, tmp_path, capsys):
    b = fake_tgi.behaviour
    n = 8
    output = tmp_path / "out" / "results.json"
    code = run_cli(
        ["--url", fake_tgi.url, "--concurrency", "1,4", "--max-new-tokens", str(n), "--output", str(output)]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    # Default: max(8, 4 x C) requests per level, plus one warmup request.
    assert len(fake_tgi.bodies) == 1 + 8 + 16
    for body in fake_tgi.bodies:
        assert body["parameters"] == {"max_new_tokens": n, "details": True, "do_sample": False}
        assert isinstance(body["inputs"], str) and body["inputs"]
    assert fake_tgi.max_active == 4  # the closed loop reached, and never exceeded, the concurrency

    results = json.loads(output.read_text())
    assert results["config"]["concurrency"] == [1, 4]
    assert [level["concurrency"] for level in results["levels"]] == [1, 4]
    # Fastest possible request: TTFT plus n - 1 gaps; no level can beat C such requests in parallel.
    ideal_e2e = b.ttft_s + (n - 1) * b.gap_s
    in_flight = {}
    for level in results["levels"]:
        c, m, records = level["concurrency"], level["metrics"], level["records"]
        assert len(records) == m["num_requests"] == m["num_ok"] == level["target_requests"]
        assert m["num_errors"] == 0 and m["errors_by_kind"] == {} and m["token_count_mismatches"] == 0
        assert m["output_tokens"] == n * len(records)
        for r in records:
            assert r["ok"] and r["output_tokens"] == n == r["server_output_tokens"] == len(r["token_times_s"])
            assert r["finish_reason"] == "length"
            assert r["ttft_s"] >= 0.8 * b.ttft_s and r["e2e_s"] >= 0.8 * ideal_e2e
            assert r["tpot_s"] == pytest.approx((r["e2e_s"] - r["ttft_s"]) / (n - 1))
        ttft = m["ttft_s"]
        assert 0.8 * b.ttft_s <= ttft["p50"] <= ttft["p90"] <= ttft["p99"] < b.ttft_s + 1.0
        assert 0.5 * b.gap_s <= m["tpot_s"]["p50"] < b.gap_s + 0.1
        assert m["itl_s"]["count"] == (n - 1) * len(records)
        assert m["itl_s"]["p50"] < b.gap_s + 0.1
        assert 0.8 * ideal_e2e <= m["e2e_s"]["p50"] < ideal_e2e + 1.0
        assert m["output_tokens_per_s"] <= 1.2 * c * n / ideal_e2e
        assert m["output_tokens_per_s"] >= 0.1 * c * n / ideal_e2e
        assert m["requests_per_s"] == pytest.approx(m["output_tokens_per_s"] / n)
        assert m["output_tokens_per_s"] == pytest.approx(m["output_tokens"] / m["wall_s"])
        in_flight[c] = sum(r["e2e_s"] for r in records) / m["wall_s"]
    # The fake serves requests in parallel: on average more than two of four in flight. (Not a throughput
    # ratio: a pause of the shared process would stretch one level's wall time and not the other's.)
    assert in_flight[1] <= 1.01 and in_flight[4] > 2.5
    decode = results["summary"]["single_stream_decode_tokens_per_s"]
    assert decode == pytest.approx(1 / results["levels"][0]["metrics"]["tpot_s"]["p50"])
    assert 1 / (b.gap_s + 0.1) < decode <= 2.0 / b.gap_s

    assert "TTFT ms p50/p90/p99" in out and "out tok/s" in out and "single-stream decode:" in out
    assert "concurrency 1: 8 requests" in err and "concurrency 4: 16 requests" in err  # progress


@pytest.mark.timeout(60)
def test_serve_counts_errors_by_kind(fake_tgi, tmp_path, capsys):
    n = 6
    fake_tgi.behaviour.reject_429 = {2, 5}
    fake_tgi.behaviour.error_event = {3}
    output = tmp_path / "errors.json"
    args = ["--url", fake_tgi.url, "--concurrency", "2", "--requests-per-level", "10", "--warmup", "0"]
    code = run_cli([*args, "--max-new-tokens", str(n), "--output", str(output)])
    out, err = capsys.readouterr()
    assert code == 0, err  # failed requests are results, not a failed run
    (level,) = json.loads(output.read_text())["levels"]
    m = level["metrics"]
    assert (m["num_requests"], m["num_ok"], m["num_errors"]) == (10, 7, 3)
    assert m["errors_by_kind"] == {"http_429": 2, "stream:generation": 1}
    assert m["output_tokens"] == 7 * n + ERROR_AFTER
    failed = [r for r in level["records"] if not r["ok"]]
    assert sorted(r["error_kind"] for r in failed) == ["http_429", "http_429", "stream:generation"]
    assert {r["status"] for r in failed if r["error_kind"] == "http_429"} == {429}
    assert all(r["error_message"] for r in failed)
    assert "errors at concurrency 2: http_429 x2, stream:generation x1" in out
    assert "single-stream decode: -" in out  # no concurrency-1 level


@pytest.mark.timeout(60)
def test_serve_options_reach_the_server(fake_tgi, capsys):
    fake_tgi.behaviour.extra_reported_tokens = 1
    args = ["--url", fake_tgi.url, "--concurrency", "1", "--requests-per-level", "2", "--max-new-tokens", "3"]
    assert run_cli([*args, "--ignore-eos", "--input-tokens", "50", "--warmup", "2", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert len(fake_tgi.bodies) == 2 + 2
    for body in fake_tgi.bodies:
        assert body["parameters"]["ignore_eos"] is True
        assert len(body["inputs"].split()) == 50
    assert err == ""  # --no-progress
    assert "2 request(s) streamed a token count different" in out


@pytest.mark.timeout(60)
def test_request_timeout(fake_tgi, tmp_path, capsys):
    fake_tgi.behaviour.stall = {1}
    output = tmp_path / "timeout.json"
    args = ["--url", fake_tgi.url, "--concurrency", "1", "--requests-per-level", "3", "--warmup", "0"]
    started = time.perf_counter()
    assert run_cli([*args, "--max-new-tokens", "3", "--timeout", "0.5", "--output", str(output)]) == 0
    assert time.perf_counter() - started < STALL_S / 2
    capsys.readouterr()
    (level,) = json.loads(output.read_text())["levels"]
    assert level["metrics"]["errors_by_kind"] == {"timeout": 1}
    assert [r["ok"] for r in level["records"]] == [True, False, True]
    assert level["records"][1]["e2e_s"] >= 0.4


@pytest.mark.timeout(60)
def test_level_timeout_bounds_a_level(fake_tgi, tmp_path, capsys):
    fake_tgi.behaviour.stall = set(range(100))
    output = tmp_path / "level.json"
    args = ["--url", fake_tgi.url, "--concurrency", "2", "--requests-per-level", "6", "--warmup", "0"]
    started = time.perf_counter()
    code = run_cli([*args, "--timeout", "60", "--level-timeout", "3", "--output", str(output)])
    assert time.perf_counter() - started < STALL_S / 2
    out, err = capsys.readouterr()
    assert code == 1 and "no request succeeded" in err
    (level,) = json.loads(output.read_text())["levels"]
    assert level["timed_out"] and level["target_requests"] == 6
    # The two requests in flight were cancelled; the other four were never sent.
    assert level["metrics"]["errors_by_kind"] == {"level_timeout": 2}
    assert len(fake_tgi.bodies) == 2
    assert "stopped at the level timeout" in out


@pytest.mark.timeout(60)
def test_warmup_failure_stops_the_run(capsys):
    with socket.socket() as sock:  # a port with nobody listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = run_cli(["--url", f"http://127.0.0.1:{port}", "--concurrency", "1", "--timeout", "5"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "warmup request 1/1 failed: connection" in err


@pytest.mark.timeout(60)
def test_python_m_benchmark(fake_tgi, tmp_path):
    output = tmp_path / "m.json"
    command = [sys.executable, "-m", "benchmark", "serve", "--url", fake_tgi.url, "--concurrency", "1,2"]
    command += ["--requests-per-level", "4", "--max-new-tokens", "4", "--warmup", "0"]
    command += ["--output", str(output)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stderr
    assert "TTFT ms p50/p90/p99" in done.stdout
    results = json.loads(output.read_text())
    assert [level["metrics"]["num_ok"] for level in results["levels"]] == [4, 4]


# ---------------------------------------------------------------------------------------------------------
# OpenAI APIs


def chat_chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
    choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
    return json.dumps({"object": "chat.completion.chunk", "choices": choices, "usage": usage})


@pytest.mark.timeout(60)
def test_openai_chat_chunks():
    parser = ChunkParser(chat=True)
    assert parser.feed(chat_chunk({"role": "assistant", "content": ""})) is None  # no token yet
    event = parser.feed(chat_chunk({"content": " Paris"}))
    assert (event.num_tokens, event.text, event.final) == (1, " Paris", False)
    assert parser.feed(chat_chunk({"reasoning_content": "hmm"})).num_tokens == 1  # thinking counts too
    assert parser.feed(chat_chunk({}, "length")) is None  # finish chunk without text
    usage = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
    assert parser.feed(json.dumps({"choices": [], "usage": usage})) is None
    final = parser.feed("[DONE]")
    assert final == StreamEvent(
        num_tokens=0,
        final=True,
        finish_reason="length",
        server_output_tokens=5,
        count_from_server=True,
        prompt_tokens=9,
    )
    # Without usage the chunks are the count; a stream without [DONE] but with a finish reason still ends.
    parser = ChunkParser(chat=True)
    parser.feed(chat_chunk({"content": "a"}, "stop"))
    end = parser.end()
    assert end.final and end.finish_reason == "stop" and not end.count_from_server
    with pytest.raises(RequestError) as error:
        ChunkParser(chat=True).end()
    assert error.value.kind == "incomplete"


@pytest.mark.timeout(60)
def test_openai_completion_chunks_and_errors():
    parser = ChunkParser(chat=False)
    # llama-server puts the usage into the finish chunk itself.
    usage = {"completion_tokens": 2, "prompt_tokens": 3}
    assert parser.feed(json.dumps({"choices": [{"text": " a", "finish_reason": None}]})).num_tokens == 1
    assert (
        parser.feed(json.dumps({"choices": [{"text": "", "finish_reason": "length"}], "usage": usage}))
        is None
    )
    final = parser.feed("[DONE]")
    assert (final.server_output_tokens, final.prompt_tokens, final.finish_reason) == (2, 3, "length")
    with pytest.raises(RequestError) as error:
        ChunkParser(chat=False).feed('{"error": {"message": "boom", "type": "generation"}}')
    assert (error.value.kind, error.value.message) == ("stream:generation", "boom")
    with pytest.raises(RequestError) as error:  # vLLM's older error object
        ChunkParser(chat=False).feed('{"object": "error", "message": "bad", "type": "BadRequestError"}')
    assert error.value.kind == "stream:BadRequestError"
    with pytest.raises(RequestError) as error:
        ChunkParser(chat=False).feed("{not json")
    assert error.value.kind == "protocol"
    envelope = '{"error": {"message": "`max_tokens` must be >= 1", "type": "invalid_request_error"}}'
    bad = openai_http_error(422, envelope)
    assert (bad.kind, bad.message, bad.error_type) == (
        "http_422",
        "`max_tokens` must be >= 1",
        "invalid_request_error",
    )
    assert openai_http_error(503, "down").message == "down"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("api", ["openai-chat", "openai-completions"])
def test_serve_openai_with_usage(fake_openai, tmp_path, capsys, api):
    n = 9
    output = tmp_path / "openai.json"
    args = [
        "--url",
        fake_openai.url + "/v1",
        "--api",
        api,
        "--concurrency",
        "1,2",
        "--requests-per-level",
        "4",
    ]
    args += ["--max-new-tokens", str(n), "--ignore-eos", "--api-key", "secret", "--label", "fake server"]
    args += ["--extra-body", '{"top_k": 1}', "--output", str(output)]
    code = run_cli(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert len(fake_openai.bodies) == 1 + 4 + 4
    chat = api == "openai-chat"
    assert set(fake_openai.paths) == {"/v1/chat/completions" if chat else "/v1/completions"}
    for body, headers in zip(fake_openai.bodies, fake_openai.headers, strict=True):
        assert body["model"] == "fake-model"  # the first id of /v1/models
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (n, n, True)
        assert body["temperature"] == 0 and body["top_k"] == 1
        if chat:
            assert body["messages"][0]["role"] == "user" and body["messages"][0]["content"]
        else:
            assert isinstance(body["prompt"], str) and body["prompt"]
        assert headers["Authorization"] == "Bearer secret"

    results = json.loads(output.read_text())
    assert (results["label"], results["model"], results["mode"]) == (
        "fake server",
        "fake-model",
        "concurrency",
    )
    assert "api_key" not in results["config"] and "secret" not in output.read_text()
    silent = n // 3  # every third token sends no chunk: the stream alone would count 6
    for level in results["levels"]:
        m = level["metrics"]
        assert m["num_ok"] == 4 and m["output_tokens"] == 4 * n and m["token_count_mismatches"] == 0
        for r in level["records"]:
            assert r["token_count_source"] == "usage" and r["output_tokens"] == n == r["server_output_tokens"]
            assert r["streamed_tokens"] == n - silent and r["prompt_tokens"] == 7
            assert r["finish_reason"] == "length"
            assert r["tpot_s"] == pytest.approx((r["e2e_s"] - r["ttft_s"]) / (n - 1))
            assert r["ttft_s"] >= 0.8 * fake_openai.behaviour.ttft_s  # the role chunk is no token
    assert "fake server" in out and "model fake-model" in out and "warning" not in out


@pytest.mark.timeout(60)
def test_serve_openai_counts_chunks_without_usage(fake_openai, tmp_path, capsys):
    fake_openai.behaviour.silent_every = 0
    output = tmp_path / "chunks.json"
    args = ["--url", fake_openai.url, "--api", "openai-completions", "--concurrency", "2", "--warmup", "0"]
    args += ["--requests-per-level", "4", "--max-new-tokens", "5", "--no-stream-usage", "--model", "mine"]
    assert run_cli([*args, "--output", str(output)]) == 0
    capsys.readouterr()
    for body in fake_openai.bodies:
        assert "stream_options" not in body and "ignore_eos" not in body and "min_tokens" not in body
        assert body["model"] == "mine"  # given: /v1/models not asked
    (level,) = json.loads(output.read_text())["levels"]
    for r in level["records"]:
        assert r["token_count_source"] == "stream" and r["server_output_tokens"] is None
        assert r["output_tokens"] == r["streamed_tokens"] == 5 and len(r["token_times_s"]) == 5


@pytest.mark.timeout(60)
def test_serve_openai_errors(fake_openai, tmp_path, capsys):
    b = fake_openai.behaviour
    b.reject_429, b.error_chunk, b.no_done = {1}, {2}, True
    output = tmp_path / "errors.json"
    args = ["--url", fake_openai.url, "--api", "openai-chat", "--concurrency", "1", "--warmup", "0"]
    assert (
        run_cli([*args, "--requests-per-level", "4", "--max-new-tokens", "4", "--output", str(output)]) == 0
    )
    capsys.readouterr()
    (level,) = json.loads(output.read_text())["levels"]
    assert level["metrics"]["errors_by_kind"] == {"http_429": 1, "stream:generation": 1}
    assert [r["ok"] for r in level["records"]] == [True, False, False, True]  # no [DONE]: still complete
    assert level["records"][1]["error_message"] == "too many requests"
    # No model listed: the run stops before any request.
    b.models = ()
    assert run_cli([*args, "--requests-per-level", "1"]) == 1
    _, err = capsys.readouterr()
    assert "could not get ready" in err and "/v1/models lists no model id" in err


# ---------------------------------------------------------------------------------------------------------
# Open loop: Poisson arrivals


@pytest.mark.timeout(60)
def test_poisson_arrivals_statistics():
    rate, count = 4.0, 20_000
    times = poisson_arrivals(rate, count, random.Random(1))
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert times[0] == 0.0 and len(times) == count and all(g >= 0 for g in gaps)
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(1 / rate, rel=0.03)  # exponential gaps of mean 1/rate ...
    assert statistics.stdev(gaps) / mean == pytest.approx(1.0, rel=0.05)  # ... whose std equals the mean
    assert sum(g < mean for g in gaps) / len(gaps) == pytest.approx(1 - 1 / 2.718281828, abs=0.02)
    # Seeded: the same schedule again; the unit gaps are shared by every rate, scaled by 1/rate.
    assert poisson_arrivals(rate, 50, random.Random(1)) == times[:50]
    config = ServeConfig(request_rates=(2.0, 8.0), seed=3)
    slow, fast = arrival_schedule(config, 2.0, 20), arrival_schedule(config, 8.0, 20)
    assert slow == pytest.approx([4 * t for t in fast])
    assert arrival_schedule(ServeConfig(request_rates=(2.0,), seed=4), 2.0, 20) != slow
    with pytest.raises(ValueError):
        poisson_arrivals(0.0, 3, random.Random(0))


@pytest.mark.timeout(60)
def test_serve_request_rate_level(fake_tgi, tmp_path, capsys):
    b = fake_tgi.behaviour
    b.ttft_s, b.gap_s = 0.05, 0.01
    output = tmp_path / "rate.json"
    rate, count = 20.0, 12
    args = ["--url", fake_tgi.url, "--request-rate", f"{rate:g}", "--requests-per-level", str(count)]
    args += ["--max-new-tokens", "20", "--warmup", "0", "--seed", "7", "--output", str(output)]
    code = run_cli(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    results = json.loads(output.read_text())
    assert results["mode"] == "request_rate" and results["config"]["request_rates"] == [rate]
    (level,) = results["levels"]
    assert level["request_rate"] == rate and level["concurrency"] is None
    schedule = arrival_schedule(ServeConfig(request_rates=(rate,), seed=7), rate, count)
    records = level["records"]
    assert [r["scheduled_s"] for r in records] == pytest.approx(schedule)
    late = [r["start_s"] - r["scheduled_s"] for r in records]
    assert all(r["ok"] for r in records) and min(late) >= 0
    # Sent on schedule, not when an earlier request ended: a closed loop would send the last ~2 s late.
    assert statistics.median(late) < 0.05 and max(late) < 1.0
    # Each request lasts ~0.24 s and they arrive every 0.05 s on average: several overlap.
    assert fake_tgi.max_active >= 2 and level["metrics"]["max_in_flight"] >= 2
    assert level["metrics"]["request_rate"] == rate
    assert "rate/s" in out and "peak" in out and "single-stream decode" not in out
    assert f"rate {rate:g} req/s: {count} requests" in err


class SlowClient:
    """A StreamingClient whose answers take forever (level-timeout tests without a server)."""

    api, model = "slow", None

    def __init__(self) -> None:
        self.sent = 0

    async def prepare(self) -> None:
        pass

    async def stream(self, prompt, max_new_tokens=None):
        self.sent += 1
        await asyncio.sleep(60)
        yield StreamEvent(num_tokens=1, final=True)

    async def close(self) -> None:
        pass


@pytest.mark.timeout(60)
async def test_rate_level_timeout():
    client = SlowClient()
    started = time.perf_counter()
    result = await run_rate_level(
        client,
        ["p"],
        request_rate=1.0,
        arrivals_s=[0.0, 0.05, 20.0, 30.0],
        request_timeout_s=60,
        level_timeout_s=2,
    )
    assert time.perf_counter() - started < 5
    assert client.sent == 2 and result.timed_out and result.request_rate == 1.0
    assert [(r.index, r.error_kind) for r in result.records] == [(0, "level_timeout"), (1, "level_timeout")]


class InstantClient(SlowClient):
    """A StreamingClient that answers at once."""

    async def stream(self, prompt, max_new_tokens=None):
        self.sent += 1
        yield StreamEvent(num_tokens=1, final=True)


@pytest.mark.timeout(60)
async def test_rate_level_never_sends_early(monkeypatch):
    # uvloop's timers tick in milliseconds and may fire up to one early; the dispatcher must sleep again.
    real_sleep = asyncio.sleep

    async def early_sleep(delay, result=None):
        return await real_sleep(max(0.0, delay - 0.005), result)

    monkeypatch.setattr(asyncio, "sleep", early_sleep)
    arrivals = [0.0, 0.02, 0.021, 0.05, 0.08]
    result = await run_rate_level(
        InstantClient(), ["p"], request_rate=50.0, arrivals_s=arrivals, request_timeout_s=5, level_timeout_s=5
    )
    assert [r.scheduled_s for r in result.records] == arrivals
    assert all(r.ok and r.start_s >= r.scheduled_s for r in result.records)


# ---------------------------------------------------------------------------------------------------------
# Random lengths


@pytest.mark.timeout(60)
def test_random_length_ranges():
    assert length_range(100, 0.5) == (50, 100)
    assert length_range(10, 0.0) == (10, 10) and length_range(10, 1.0) == (1, 10)
    assert length_range(7, 0.3) == (5, 7)  # ceil(4.9)
    rng = random.Random(0)
    draws = [draw_length(100, 0.5, rng) for _ in range(5000)]
    assert min(draws) == 50 and max(draws) == 100  # the whole range is reached ...
    assert statistics.fmean(draws) == pytest.approx(75, abs=1.5)  # ... uniformly
    assert all(draw_length(64, 0.0, rng) == 64 for _ in range(10))

    config = ServeConfig(
        input_tokens=40,
        random_input_range_ratio=0.5,
        params=GenerationParams(max_new_tokens=30),
        random_output_range_ratio=0.8,
        seed=5,
    )
    specs = make_requests(config, 200)
    assert all(20 <= s.input_tokens <= 40 and len(s.prompt.split()) == s.input_tokens for s in specs)
    assert all(6 <= s.max_new_tokens <= 30 for s in specs)
    assert len({s.input_tokens for s in specs}) > 10 and len({s.max_new_tokens for s in specs}) > 10
    assert len({tuple(s.prompt.split()[:4]) for s in specs}) > 150  # distinct prompt starts
    assert make_requests(config, 20) == specs[:20]  # seeded; a shorter level is a prefix of a longer one
    assert make_requests(ServeConfig(**{**config.__dict__, "seed": 6}), 20) != specs[:20]
    assert make_requests(config, 3, "warmup") != specs[:3]
    fixed = make_requests(ServeConfig(prompt="hello"), 3)
    assert [(s.prompt, s.max_new_tokens, s.input_tokens) for s in fixed] == [("hello", 64, None)] * 3


@pytest.mark.timeout(60)
def test_serve_random_lengths_reach_the_server(fake_tgi, tmp_path, capsys):
    output = tmp_path / "lengths.json"
    args = ["--url", fake_tgi.url, "--concurrency", "4", "--requests-per-level", "24", "--warmup", "0"]
    args += ["--input-tokens", "30", "--random-input-range-ratio", "0.5", "--max-new-tokens", "10"]
    args += ["--random-output-range-ratio", "0.5", "--output", str(output)]
    assert run_cli(args) == 0
    capsys.readouterr()
    inputs = [len(body["inputs"].split()) for body in fake_tgi.bodies]
    outputs = [body["parameters"]["max_new_tokens"] for body in fake_tgi.bodies]
    assert all(15 <= n <= 30 for n in inputs) and len(set(inputs)) > 3
    assert all(5 <= n <= 10 for n in outputs) and len(set(outputs)) > 2
    (level,) = json.loads(output.read_text())["levels"]
    records = level["records"]
    assert sorted(r["max_new_tokens"] for r in records) == sorted(outputs)
    for r in records:
        assert r["output_tokens"] == r["max_new_tokens"] and 15 <= r["input_tokens"] <= 30


@pytest.mark.timeout(60)
def test_new_arguments_are_checked(capsys):
    assert rate_list("0.5,2") == (0.5, 2.0)
    assert Level(request_rate=2).name == "rate 2 req/s" and Level(concurrency=3).name == "concurrency 3"
    config = ServeConfig(request_rates=(0.1, 4.0))
    assert [config.requests_for(level) for level in config.levels] == [8, 120]
    assert run_cli(["--request-rate", "0"]) == 2
    assert run_cli(["--request-rate", "1,inf"]) == 2
    assert run_cli(["--concurrency", "1", "--request-rate", "1"]) == 2
    assert run_cli(["--random-output-range-ratio", "1.5"]) == 2
    assert run_cli(["--random-input-range-ratio", "0.5"]) == 2  # needs --input-tokens
    assert run_cli(["--extra-body", "[1]"]) == 2
    _, err = capsys.readouterr()
    assert "random_input_range_ratio needs input_tokens" in err
