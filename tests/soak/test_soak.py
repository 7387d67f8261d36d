"""Soak: 2,000 mixed requests at about 70% of the server's capacity, on the real processes.

Marked ``slow``: ``make soak`` runs it (``make test`` does not). It measures the server's capacity first
(closed loop, completed requests per second), then sends an open-loop Poisson stream of requests at 70%
of that rate: streaming and non-streaming, TGI and OpenAI routes, 5% cancelled by their client, 5%
invalid. It checks that no request met an unexpected error and that the resident memory and the open
file descriptors of the router and the shard stayed flat (within 5%) between the end of the warm-up and
the end of the run. Figures are printed and written to ``$SOAK_REPORT`` (JSON) when it is set.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.e2e.conftest import stop_and_check
from tests.e2e.harness import Launched

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

TOTAL = int(os.environ.get("SOAK_REQUESTS", "2000"))
WARMUP = TOTAL // 10
LOAD = 0.7
MAX_NEW_TOKENS = 24


@dataclass
class Sample:
    rss: int
    fds: int


def sample(process: psutil.Process) -> Sample:
    return Sample(process.memory_info().rss, process.num_fds())


def kinds(rng: random.Random) -> str:
    draw = rng.random()
    if draw < 0.05:
        return "cancelled"
    if draw < 0.10:
        return "invalid"
    return rng.choice(["generate", "generate_stream", "chat", "chat_stream", "completions"])


INVALID = [
    ("/generate", {"inputs": "", "parameters": {}}),
    ("/generate", {"inputs": "Hi", "parameters": {"temperature": -1}}),
    ("/generate_stream", {"inputs": "Hi", "parameters": {"top_p": 2}}),
    ("/v1/chat/completions", {"model": "tgi", "messages": "not a list"}),
    ("/v1/completions", {"model": "tgi", "prompt": "Hi", "max_tokens": -3}),
    ("/generate", {"inputs": 42}),
]


async def one(session: aiohttp.ClientSession, url: str, kind: str, rng: random.Random, model: str) -> str:
    """Sends one request of ``kind``; returns an outcome label ("ok", "cancelled", "4xx", or a failure)."""
    prompt = f"Soak request {rng.randrange(10**6)}: tell me something."
    tgi = {
        "inputs": prompt,
        "parameters": {"max_new_tokens": MAX_NEW_TOKENS, "do_sample": rng.random() < 0.5},
    }
    messages = [{"role": "user", "content": prompt}]
    if kind == "invalid":
        path, body = rng.choice(INVALID)
        async with session.post(url + path, json=body) as response:
            await response.read()
            return "4xx" if 400 <= response.status < 500 else f"invalid got {response.status}"
    if kind == "cancelled":
        try:
            async with session.post(
                url + "/generate_stream",
                json=tgi,
                timeout=aiohttp.ClientTimeout(total=rng.uniform(0.01, 0.3)),
            ) as response:
                await response.read()
        except (TimeoutError, aiohttp.ClientError):
            pass
        return "cancelled"
    path, body, streaming = {
        "generate": ("/generate", tgi, False),
        "generate_stream": ("/generate_stream", tgi, True),
        "chat": (
            "/v1/chat/completions",
            {"model": model, "messages": messages, "max_tokens": MAX_NEW_TOKENS},
            False,
        ),
        "chat_stream": (
            "/v1/chat/completions",
            {"model": model, "messages": messages, "max_tokens": MAX_NEW_TOKENS, "stream": True},
            True,
        ),
        "completions": (
            "/v1/completions",
            {"model": model, "prompt": prompt, "max_tokens": MAX_NEW_TOKENS},
            False,
        ),
    }[kind]
    async with session.post(url + path, json=body) as response:
        raw = await response.read()
        if response.status != 200:
            return f"{kind} got {response.status}"
        if streaming and (b'"error"' in raw or not raw.rstrip().endswith((b"}", b"[DONE]"))):
            return f"{kind} stream error"
        return "ok"


async def closed_loop_rate(url: str, model: str, concurrency: int, count: int) -> float:
    """Completed requests per second with ``concurrency`` clients sending back to back."""
    rng = random.Random(1)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        remaining = count

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                await one(session, url, "generate", rng, model)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count / (time.monotonic() - started)


async def open_loop(url: str, model: str, rate: float, processes: dict[str, psutil.Process]) -> dict:
    rng = random.Random(0)
    outcomes: Counter[str] = Counter()
    samples: dict[str, list[Sample]] = {name: [] for name in processes}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = []
        started = time.monotonic()
        for i in range(TOTAL):
            if i == WARMUP:
                await asyncio.gather(*tasks)  # a settled point to measure from
                for name, process in processes.items():
                    samples[name].append(sample(process))
            kind = kinds(rng)
            tasks.append(asyncio.ensure_future(one(session, url, kind, random.Random(i), model)))
            await asyncio.sleep(rng.expovariate(rate))
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            outcomes[result if isinstance(result, str) else f"exception {type(result).__name__}"] += 1
        elapsed = time.monotonic() - started
    await asyncio.sleep(1.0)  # let the server release what the last requests held
    for name, process in processes.items():
        samples[name].append(sample(process))
    return {"outcomes": dict(outcomes), "elapsed_s": elapsed, "samples": samples}


def test_soak(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = Launched(["--model-id", str(tiny_model_dir), "--max-concurrent-requests", "256"])
    server.start(tmp_path)
    try:
        server.wait_healthy(120)
        model = str(tiny_model_dir)
        children = {" ".join(p.cmdline()): p for p in server.children()}
        processes = {
            "router": next(p for cmd, p in children.items() if "-m router" in cmd),
            "shard": next(p for cmd, p in children.items() if "-m shard" in cmd),
        }
        capacity = asyncio.run(closed_loop_rate(server.url, model, concurrency=32, count=200))
        result = asyncio.run(open_loop(server.url, model, LOAD * capacity, processes))
    finally:
        stop_and_check(server)

    outcomes = result["outcomes"]
    growth = {
        name: {
            "rss_mb": [round(s.rss / 2**20, 1) for s in values],
            "rss_growth_pct": round(100 * (values[-1].rss - values[0].rss) / values[0].rss, 2),
            "fds": [s.fds for s in values],
            "fd_growth_pct": round(100 * (values[-1].fds - values[0].fds) / values[0].fds, 2),
        }
        for name, values in result["samples"].items()
    }
    report = {
        "requests": TOTAL,
        "capacity_rps": round(capacity, 1),
        "offered_rps": round(LOAD * capacity, 1),
        "achieved_rps": round(TOTAL / result["elapsed_s"], 1),
        "elapsed_s": round(result["elapsed_s"], 1),
        "outcomes": outcomes,
        "processes": growth,
    }
    print("\n" + json.dumps(report, indent=2))
    if os.environ.get("SOAK_REPORT"):
        Path(os.environ["SOAK_REPORT"]).write_text(json.dumps(report, indent=2) + "\n")
    unexpected = {k: v for k, v in outcomes.items() if k not in ("ok", "cancelled", "4xx")}
    assert unexpected == {}
    assert sum(outcomes.values()) == TOTAL
    for name, figures in growth.items():
        assert figures["rss_growth_pct"] < 5, f"{name} memory grew {figures['rss_growth_pct']}%"
        assert figures["fd_growth_pct"] <= 5, f"{name} file descriptors grew {figures['fd_growth_pct']}%"
