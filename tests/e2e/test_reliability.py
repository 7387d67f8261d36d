"""Reliability on the real processes: overload, disconnects, faults inside a request and a step, a dead
shard, graceful termination, reproducibility. Each test prints the figure it checks (``pytest -s``).

Faults come from the shard's test-only hooks (``--fault-injection``; see shard/faults.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest
import requests

from .conftest import stop_and_check
from .harness import Launched

pytestmark = pytest.mark.timeout(300)

MAX_CONCURRENT = 16
LONG = {"max_new_tokens": 300, "ignore_eos_token": True}


def generate_body(prompt: str = "Hello", **parameters: object) -> dict[str, object]:
    return {"inputs": prompt, "parameters": {"max_new_tokens": 20, "ignore_eos_token": True, **parameters}}


# Streams that hold their slots about 5 s on any machine: each of their 20 steps sleeps 0.25 s (the fault hook).
HELD = generate_body(fault="sleep")


def metric(server: Launched, name: str) -> float:
    """The value of one unlabelled (or fully labelled) sample in /metrics."""
    for line in requests.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@contextlib.contextmanager
def started(server: Launched, log_dir: Path) -> Iterator[Launched]:
    """A server for a test that ends it itself; whatever happens, nothing is left running."""
    server.start(log_dir)
    try:
        server.wait_healthy(120)
        yield server
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill_all()


def shard_process(server: Launched) -> psutil.Process:
    return next(p for p in server.children() if "-m shard" in " ".join(p.cmdline()))


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict, float]:
    started = time.monotonic()
    async with session.post(url, json=body) as response:
        payload = await response.json()
        return response.status, payload, time.monotonic() - started


async def stream(session: aiohttp.ClientSession, url: str, body: dict, first: asyncio.Event | None = None):
    """Streams /generate_stream; returns (status, events, error event or None)."""
    events: list[dict] = []
    async with session.post(f"{url}/generate_stream", json=body) as response:
        if response.status != 200:
            return response.status, events, await response.json()
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                return response.status, events, event
            events.append(event)
            if first is not None:
                first.set()
        return response.status, events, None


async def streaming(
    session: aiohttp.ClientSession, url: str, count: int, body: dict | None = None
) -> list[asyncio.Future]:
    """``count`` streams (long ones by default), returned once every one of them has its first token."""
    body = body or generate_body(**LONG)
    firsts = [asyncio.Event() for _ in range(count)]
    streams = [asyncio.ensure_future(stream(session, url, body, first)) for first in firsts]
    await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 60)
    return streams


@pytest.fixture(scope="module")
def faulty(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    """One server with the fault hooks on, for the tests that leave it healthy."""
    server = Launched(
        ["--model-id", str(tiny_model_dir), "--fault-injection",
         "--max-concurrent-requests", str(MAX_CONCURRENT)]
    ).start(tmp_path_factory.mktemp("faulty"))  # fmt: skip
    try:
        server.wait_healthy(120)
        yield server
    finally:
        stop_and_check(server)


def test_fault_hooks_are_off_by_default(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = Launched(["--model-id", str(tiny_model_dir)]).start(tmp_path)
    try:
        server.wait_healthy(120)
        response = requests.post(f"{server.url}/generate", json=generate_body(fault="fatal"), timeout=60)
        assert response.status_code == 200, response.text  # ignored, like any unknown parameter
        assert requests.get(f"{server.url}/health", timeout=5).status_code == 200
    finally:
        stop_and_check(server)


def test_poison_request_fails_alone(faulty: Launched) -> None:
    prompts = [f"Hello {i}" for i in range(8)]
    alone = [
        requests.post(f"{faulty.url}/generate", json=generate_body(p, details=True), timeout=60).json()
        for p in prompts
    ]

    async def run() -> list[tuple[int, dict, float]]:
        async with aiohttp.ClientSession() as session:
            calls = [post(session, f"{faulty.url}/generate", generate_body(p, details=True)) for p in prompts]
            calls.insert(3, post(session, f"{faulty.url}/generate", generate_body("poison", fault="nan")))
            return await asyncio.gather(*calls)

    results = asyncio.run(run())
    poison = results.pop(3)
    ok = [payload for status, payload, _ in results if status == 200]
    print(f"\npoison request: {poison[0]} {poison[1]}; batch-mates ok: {len(ok)}/8")
    assert poison[0] == 424 and "NaN" in poison[1]["error"]
    assert len(ok) == 8
    for mate, solo in zip(ok, alone, strict=True):
        assert [t["id"] for t in mate["details"]["tokens"]] == [t["id"] for t in solo["details"]["tokens"]]
    assert requests.get(f"{faulty.url}/health", timeout=5).status_code == 200


def test_step_failure_fails_its_requests_and_the_server_recovers(faulty: Launched) -> None:
    response = requests.post(f"{faulty.url}/generate", json=generate_body(fault="step"), timeout=60)
    print(f"\nfailed step: {response.status_code} {response.json()}")
    assert response.status_code == 424
    assert response.json()["error_type"] == "generation"
    # /health runs a real one-token generation after a failure before it answers 200 again.
    assert requests.get(f"{faulty.url}/health", timeout=10).status_code == 200
    after = requests.post(f"{faulty.url}/generate", json=generate_body(), timeout=60)
    assert after.status_code == 200


def test_health_answers_during_a_long_step(faulty: Launched) -> None:
    async def run() -> list[float]:
        async with aiohttp.ClientSession() as session:
            # 12 steps of 0.25 s each: the shard's worker is busy for 3 s.
            body = generate_body(fault="sleep", max_new_tokens=12)
            slow = asyncio.ensure_future(post(session, f"{faulty.url}/generate", body))
            await asyncio.sleep(0.3)
            latencies = []
            while not slow.done():
                started = time.monotonic()
                async with session.get(f"{faulty.url}/health") as response:
                    assert response.status == 200
                latencies.append(time.monotonic() - started)
                await asyncio.sleep(0.2)
            status, _, _ = await slow
            assert status == 200
            return latencies

    latencies = asyncio.run(run())
    print(
        f"\n/health while the shard is busy for 3 s: {len(latencies)} answers, slowest {1000 * max(latencies):.0f} ms"
    )
    assert latencies and max(latencies) < 1.0


def test_overload_gives_exactly_the_excess_an_immediate_429(faulty: Launched) -> None:
    async def run() -> tuple[list, list]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            admitted = await streaming(session, faulty.url, MAX_CONCURRENT, HELD)
            excess = await asyncio.gather(
                *(post(session, f"{faulty.url}/generate", generate_body(**LONG)) for _ in range(20))
            )
            return await asyncio.gather(*admitted), excess

    admitted, excess = asyncio.run(run())
    latencies = sorted(elapsed for _, _, elapsed in excess)
    print(
        f"\n{MAX_CONCURRENT} admitted + 20 over the limit: {sum(s == 429 for s, _, _ in excess)} x 429, "
        f"latency p50 {1000 * statistics.median(latencies):.1f} ms, max {1000 * latencies[-1]:.1f} ms"
    )
    assert [status for status, _, _ in excess] == [429] * 20
    assert all(payload["error_type"] == "overloaded" for _, payload, _ in excess)
    assert latencies[-1] < 1.0  # "immediate": the figure above is what counts; this bound absorbs CI noise
    for status, events, error in admitted:
        assert status == 200 and error is None
        assert len(events) == HELD["parameters"]["max_new_tokens"]


def test_a_closed_stream_leaves_the_batch_at_the_next_step(faulty: Launched) -> None:
    decode_steps = 'tgi_batch_inference_count_total{method="decode"}'

    async def run() -> int:
        async with aiohttp.ClientSession() as session:
            # The keeper makes every step take 0.25 s, so that the scrapes below cannot miss a step.
            keeper_body = generate_body(fault="sleep", max_new_tokens=30)
            keeper = asyncio.ensure_future(post(session, f"{faulty.url}/generate", keeper_body))
            while metric(faulty, "tgi_batch_current_size") != 1:  # the keeper is running
                await asyncio.sleep(0.005)
            response = await session.post(f"{faulty.url}/generate_stream", json=generate_body(**LONG))
            tokens = 0
            async for raw in response.content:
                tokens += raw.startswith(b"data:")
                if tokens == 5:
                    break
            before_close = metric(faulty, decode_steps)
            response.close()
            closed_at = metric(faulty, decode_steps)
            while metric(faulty, "tgi_batch_current_size") != 1:
                await asyncio.sleep(0.005)
            left_at = metric(faulty, decode_steps)
            assert metric(faulty, 'tgi_request_failure_total{err="dropped"}') >= 1
            await keeper
            # A step may end between the two reads around close(): count from the first, allow for it.
            return int(left_at - before_close), int(closed_at - before_close)

    steps, during_close = asyncio.run(run())
    print(f"\na stream closed after 5 tokens left the batch {steps} decode step(s) later")
    # The batch size comes with a step's output: the one that shows it gone is the first step without it.
    # The step in flight when it closed still had it; the next one did not.
    assert steps <= 2 + during_close


def test_abandoned_requests_do_not_hold_the_server(faulty: Launched) -> None:
    async def run() -> float:
        timeout = aiohttp.ClientTimeout(total=0.5)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def abandon(i: int) -> None:
                endpoint = "/generate_stream" if i % 2 else "/generate"
                try:
                    async with session.post(
                        f"{faulty.url}{endpoint}", json=generate_body(**LONG), timeout=timeout
                    ) as response:
                        await response.read()
                except (TimeoutError, aiohttp.ClientError):
                    pass

            await asyncio.gather(*(abandon(i) for i in range(100)))
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            status, payload, _ = await post(session, f"{faulty.url}/generate", generate_body())
            assert status == 200, payload
            return time.monotonic() - started

    elapsed = asyncio.run(run())
    print(f"\nafter 100 requests abandoned at 0.5 s, a fresh request completed in {elapsed:.2f} s")
    assert elapsed < 5.0


def test_reproducible_alone_and_batched(faulty: Launched) -> None:
    greedy = generate_body("Hello world", details=True)
    seeded = generate_body("Hello world", details=True, do_sample=True, temperature=0.8, seed=7)

    def ids(payload: dict) -> list[int]:
        return [t["id"] for t in payload["details"]["tokens"]]

    async def batched(body: dict) -> list[list[int]]:
        async with aiohttp.ClientSession() as session:
            others = [generate_body(f"Other {i}", do_sample=True, temperature=1.0) for i in range(7)]
            results = await asyncio.gather(
                *(post(session, f"{faulty.url}/generate", b) for b in [*others[:3], body, *others[3:]])
            )
            return [ids(results[3][1])]

    for body in (greedy, seeded):
        alone = [ids(requests.post(f"{faulty.url}/generate", json=body, timeout=60).json()) for _ in range(5)]
        together = [asyncio.run(batched(body))[0] for _ in range(5)]
        print(f"\n{'seeded' if 'seed' in body['parameters'] else 'greedy'}: 5 alone, 5 batched, identical")
        assert all(run == alone[0] for run in alone + together)


def test_dead_shard_under_load_takes_the_server_down(tiny_model_dir: Path, tmp_path: Path) -> None:
    with started(Launched(["--model-id", str(tiny_model_dir)]), tmp_path) as server:
        _dead_shard_under_load(server)


def _dead_shard_under_load(server: Launched) -> None:

    async def run() -> tuple[list, float | None, int | None, float]:
        async with aiohttp.ClientSession() as session:
            streams = await streaming(session, server.url, 8)
            killed_at = time.monotonic()
            shard_process(server).kill()
            unhealthy_after, health_status = None, None
            while time.monotonic() - killed_at < 5:
                try:
                    async with session.get(f"{server.url}/health") as response:
                        if response.status != 200:
                            unhealthy_after, health_status = time.monotonic() - killed_at, response.status
                            break
                except aiohttp.ClientError:
                    unhealthy_after = time.monotonic() - killed_at
                    break
                await asyncio.sleep(0.05)
            results = await asyncio.wait_for(asyncio.gather(*streams, return_exceptions=True), 10)
            return results, unhealthy_after, health_status, killed_at

    results, unhealthy_after, health_status, killed_at = asyncio.run(run())
    code = server.wait_exit(max(0.1, killed_at + 10 - time.monotonic()))
    exited_after = time.monotonic() - killed_at
    print(
        f"\nshard SIGKILL with 8 streams: /health {health_status} after {unhealthy_after:.2f} s, "
        f"launcher exit {code} {exited_after:.1f} s after the kill, streams errored: {sum(r[2] is not None for r in results if isinstance(r, tuple))}"
    )
    assert code != 0
    assert unhealthy_after is not None and unhealthy_after < 2.0
    assert health_status in (None, 503)
    for result in results:  # every in-flight request ended, with an error, not a hang
        assert not isinstance(result, tuple) or result[2] is not None or result[0] != 200
    assert server.leftovers() == []
    assert server.stale_sockets() == []


def test_fatal_device_error_exits_non_zero(tiny_model_dir: Path, tmp_path: Path) -> None:
    with started(Launched(["--model-id", str(tiny_model_dir), "--fault-injection"]), tmp_path) as server:
        response = requests.post(f"{server.url}/generate", json=generate_body(fault="fatal"), timeout=60)
        since = time.monotonic()
        code = server.wait_exit(10)
    print(
        f"\nfatal device error: {response.status_code}; launcher exit {code} in {time.monotonic() - since:.1f} s"
    )
    assert response.status_code == 424
    assert code != 0
    assert "Unrecoverable device error" in server.log()
    assert server.leftovers() == []
    assert server.stale_sockets() == []


def test_sigterm_lets_in_flight_streams_finish(tiny_model_dir: Path, tmp_path: Path) -> None:
    with started(Launched(["--model-id", str(tiny_model_dir), "--fault-injection"]), tmp_path) as server:
        _sigterm_with_streams(server)


def _sigterm_with_streams(server: Launched) -> None:

    async def run() -> tuple[list, list[int]]:
        async with aiohttp.ClientSession() as session:
            streams = await streaming(session, server.url, 10, HELD)
            os.kill(server.process.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # until the router has the signal and drains
                async with session.get(f"{server.url}/health") as response:
                    if response.status == 503:
                        break
                await asyncio.sleep(0.02)
            refused = []
            for _ in range(3):
                async with session.post(f"{server.url}/generate", json=generate_body()) as response:
                    refused.append(response.status)
            return await asyncio.gather(*streams), refused

    results, refused = asyncio.run(run())
    code = server.wait_exit(60)
    finished = [events[-1]["details"] for _, events, error in results if error is None]
    print(f"\nSIGTERM with 10 streams: {len(finished)} finished, new requests got {refused}, exit {code}")
    assert refused == [503, 503, 503]
    for status, events, error in results:
        assert status == 200 and error is None
        assert (
            len(events) == HELD["parameters"]["max_new_tokens"] and events[-1]["generated_text"] is not None
        )
    assert code == 0
    assert server.leftovers() == []
    assert server.stale_sockets() == []


def test_a_long_request_does_not_starve_short_ones(faulty: Launched) -> None:
    async def run() -> tuple[float, list[float]]:
        async with aiohttp.ClientSession() as session:
            started = time.monotonic()
            # The long one holds every step it is in for 0.25 s: 6 s in all, however fast the machine.
            (long,) = await streaming(session, faulty.url, 1, generate_body(fault="sleep", max_new_tokens=24))
            shorts = await asyncio.gather(
                *(post(session, f"{faulty.url}/generate", generate_body(f"Short {i}", max_new_tokens=4))
                  for i in range(8))
            )  # fmt: skip
            assert all(status == 200 for status, _, _ in shorts)
            short_done = [time.monotonic() - started for _ in shorts]
            status, events, error = await long
            assert status == 200 and error is None and len(events) == 24
            return time.monotonic() - started, short_done

    long_elapsed, short_done = asyncio.run(run())
    print(
        f"\n8 short requests done after {max(short_done):.2f} s while a 24-token one took {long_elapsed:.2f} s"
    )
    assert max(short_done) < long_elapsed
