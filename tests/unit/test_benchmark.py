"""The serving benchmark tool: metrics on hand-made records, the SSE/TGI parsing, and whole `serve` runs
against a fake TGI streaming server (aiohttp, 127.0.0.1, ephemeral port, in a thread of this process)."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from benchmark.cli import concurrency_list, main
from benchmark.clients import RequestError
from benchmark.clients.tgi import http_error, parse_event
from benchmark.config import GenerationParams, ServeConfig
from benchmark.metrics import (
    Distribution,
    compute_level_metrics,
    percentile,
    single_stream_decode_tokens_per_s,
)
from benchmark.prompts import synthetic_prompt
from benchmark.records import RequestRecord
from benchmark.report import Progress, format_summary, format_table
from benchmark.runner import LevelResult
from benchmark.serve import LevelOutcome, ServeResult
from benchmark.sse import SSEParser

REPO = Path(__file__).resolve().parents[2]


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


class FakeTgi:
    """A TGI `/generate_stream` look-alike: max_new_tokens token events, the last with details."""

    def __init__(self) -> None:
        self.behaviour = FakeBehaviour()
        self.bodies: list[dict] = []
        self.active = 0
        self.max_active = 0
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        index = len(self.bodies)
        self.bodies.append(body)
        b = self.behaviour
        if index in b.reject_429:
            return web.json_response({"error": "Model is overloaded", "error_type": "overloaded"}, status=429)
        n = body["parameters"]["max_new_tokens"]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
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
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.active -= 1
        return response

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/generate_stream", self._handle)
        # Cancel a handler when its client goes away (timeouts), so that stalled ones end at once.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"

    def start(self) -> FakeTgi:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@pytest.fixture
def fake_tgi():
    server = FakeTgi().start()
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
    rates = {}
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
        rates[c] = m["output_tokens_per_s"]
    assert rates[4] > 1.5 * rates[1]  # the fake serves requests in parallel
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
    code = run_cli([*args, "--timeout", "60", "--level-timeout", "0.5", "--output", str(output)])
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
