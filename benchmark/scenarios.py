"""``text-generation-benchmark scenario``: two serving situations that a plain sweep does not show.

- ``interference``: N streams decode steadily; then one long prompt (about 1,000 tokens) arrives. Reports
  the running streams' inter-token latency (p50/p99) before it arrived and while it was prefilled, and
  their ratio: with chunked prefill the streams keep their pace; without it they stall for the prefill.
- ``prefix``: time to first token for a long prompt whose prefix the server has seen (a shared system
  prompt, a conversation's earlier turns) against the same length cold. Reports both and the ratio.

Both talk to any OpenAI-compatible server (``/v1/completions``, streaming).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from benchmark.metrics import percentile

WORDS = [
    "river",
    "mountain",
    "lantern",
    "copper",
    "meadow",
    "harbor",
    "violet",
    "thunder",
    "orchard",
    "canyon",
    "velvet",
    "ember",
    "glacier",
    "compass",
    "lattice",
    "willow",
    "saffron",
    "quarry",
    "beacon",
    "marble",
    "falcon",
    "prairie",
    "cobalt",
    "ember",
    "tundra",
]


def filler(rng: random.Random, words: int) -> str:
    """A prompt of ``words`` common words (about one token each for most tokenizers)."""
    return " ".join(rng.choice(WORDS) for _ in range(words))


@dataclass
class StreamTimes:
    """When each token of one stream arrived (monotonic seconds)."""

    times: list[float] = field(default_factory=list)


class Client:
    def __init__(self, url: str, model: str | None, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        if self.model is None:
            async with self.session.get(f"{self.url}/v1/models", headers=self.headers) as r:
                self.model = (await r.json())["data"][0]["id"]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.session is not None
        await self.session.close()

    async def stream(self, prompt: str, max_tokens: int, times: StreamTimes | None = None) -> float:
        """Streams a completion; returns the time to its first token (seconds)."""
        assert self.session is not None
        body = {
            "model": self.model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "temperature": 0, "min_tokens": max_tokens, "ignore_eos": True,
        }  # fmt: skip
        started = time.monotonic()
        first: float | None = None
        async with self.session.post(f"{self.url}/v1/completions", json=body, headers=self.headers) as r:
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                    continue
                now = time.monotonic()
                first = first if first is not None else now - started
                if times is not None:
                    times.times.append(now)
        if first is None:
            raise RuntimeError("the stream ended without a token")
        return first


def gaps_within(streams: list[StreamTimes], start: float, end: float) -> list[float]:
    """Inter-token gaps of all streams whose later token arrived in [start, end]."""
    out = []
    for s in streams:
        for a, b in zip(s.times, s.times[1:], strict=False):
            if start <= b <= end:
                out.append(b - a)
    return out


def summarize(gaps: list[float]) -> dict[str, float]:
    if not gaps:
        return {"count": 0, "p50_ms": None, "p99_ms": None}
    gaps = sorted(gaps)
    return {"count": len(gaps), "p50_ms": 1000 * percentile(gaps, 50), "p99_ms": 1000 * percentile(gaps, 99)}


async def interference(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    async with Client(args.url, args.model, args.api_key) as client:
        streams = [StreamTimes() for _ in range(args.streams)]
        tasks = [
            asyncio.ensure_future(client.stream(filler(rng, 16), args.stream_tokens, s)) for s in streams
        ]
        await asyncio.sleep(args.settle)
        steady_start = time.monotonic()
        await asyncio.sleep(args.window)
        arrived = time.monotonic()
        long_ttft = await client.stream(filler(rng, args.prompt_words), 1)
        done = time.monotonic()
        await asyncio.sleep(0.2)
        if any(t.done() for t in tasks):
            raise RuntimeError("a stream ended before the measurement: raise --stream-tokens")
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    steady = summarize(gaps_within(streams, steady_start, arrived))
    during = summarize(gaps_within(streams, arrived, done))
    return {
        "streams": args.streams,
        "prompt_words": args.prompt_words,
        "long_prompt_ttft_s": long_ttft,
        "steady_itl": steady,
        "during_itl": during,
        "p99_ratio": during["p99_ms"] / steady["p99_ms"] if steady["count"] and during["count"] else None,
    }


async def prefix(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    cold: list[float] = []
    warm: list[float] = []
    async with Client(args.url, args.model, args.api_key) as client:
        for _ in range(args.repeats):
            shared = filler(rng, args.prompt_words)
            cold.append(await client.stream(f"{shared} {filler(rng, 8)}", 1))
            warm.append(await client.stream(f"{shared} {filler(rng, 8)}", 1))
    c, w = statistics.median(cold), statistics.median(warm)
    return {
        "prompt_words": args.prompt_words,
        "repeats": args.repeats,
        "cold_ttft_s": cold,
        "warm_ttft_s": warm,
        "cold_ttft_median_s": c,
        "warm_ttft_median_s": w,
        "speedup": c / w if w else None,
    }


def run(args: argparse.Namespace) -> int:
    scenario = {"interference": interference, "prefix": prefix}[args.scenario]
    result = {"scenario": args.scenario, "url": args.url, **asyncio.run(scenario(args))}
    text = json.dumps(result, indent=2)
    print(text if args.scenario == "interference" else json.dumps(
        {k: v for k, v in result.items() if not isinstance(v, list)}, indent=2))  # fmt: skip
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


def register(commands: Any) -> None:
    """Adds the ``scenario`` subcommand to ``text-generation-benchmark``'s subparsers."""
    p = commands.add_parser(
        "scenario",
        help="long-prompt interference and prefix-cache time to first token",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenario", choices=("interference", "prefix"))
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--streams", type=int, default=8, help="interference: running streams")
    p.add_argument("--stream-tokens", type=int, default=400, help="interference: tokens per running stream")
    p.add_argument("--settle", type=float, default=3.0, help="interference: seconds before measuring")
    p.add_argument("--window", type=float, default=3.0, help="interference: steady window in seconds")
    p.add_argument("--prompt-words", type=int, default=900, help="words in the long prompt (~1,000 tokens)")
    p.add_argument("--repeats", type=int, default=3, help="prefix: cold/warm pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="write the result as JSON here")
    p.set_defaults(handler=run)
