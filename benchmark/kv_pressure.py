"""KV memory pressure and fairness, as issue 17 asks: one OpenAI completions request with ``n`` samples
(``ignore_eos``) while waves of streaming users come and go. Prints the big request's status and time,
every user's status, the users' time to first token while the big request runs, and the server's KV
figures.

    python -m benchmark.kv_pressure http://127.0.0.1:3000 --n 128 --max-tokens 200

The server needs ``--max-best-of`` >= n and ``--max-concurrent-requests`` >= n + the users in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import aiohttp


async def _user(session: aiohttp.ClientSession, url: str, i: int, tokens: int, out: list) -> None:
    body = {"prompt": f"User {i} asks: what is the capital of country number {i}?", "max_tokens": tokens,
            "stream": True}  # fmt: skip
    started = time.monotonic()
    first = None
    async with session.post(f"{url}/v1/completions", json=body) as response:
        async for raw in response.content:
            if raw.startswith(b"data:") and first is None:
                first = time.monotonic() - started
        out.append((response.status, first))


async def run(
    url: str, n: int, max_tokens: int, wave: int, every: float, user_tokens: int, users_for: float | None
) -> dict:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as session:
        idle: list = []
        await _user(session, url, -1, user_tokens, idle)
        started = time.monotonic()
        body = {"prompt": "Once upon a time", "n": n, "max_tokens": max_tokens, "ignore_eos": True}
        big = asyncio.ensure_future(session.post(f"{url}/v1/completions", json=body))
        users: list = []
        tasks = []
        i = 0
        while not big.done() and (users_for is None or time.monotonic() - started < users_for):
            tasks += [
                asyncio.ensure_future(_user(session, url, i + k, user_tokens, users)) for k in range(wave)
            ]
            i += wave
            await asyncio.sleep(every)
        users_s = time.monotonic() - started
        response = await big
        answer = await response.json()
        seconds = time.monotonic() - started
        await asyncio.gather(*tasks)
        metrics = await (await session.get(f"{url}/metrics")).text()
    ttft = sorted(first for _, first in users if first is not None)
    choices = answer.get("choices", []) if response.status == 200 else []
    return {
        "idle_ttft_s": idle[0][1],
        "big_status": response.status,
        "big_s": round(seconds, 1),
        "big_choices": len(choices),
        "big_finish_reasons": sorted({c["finish_reason"] for c in choices}),
        "big_completion_tokens": answer.get("usage", {}).get("completion_tokens") if response.status == 200 else None,
        "big_tokens_expected": n * max_tokens,
        "users_for_s": round(users_s, 1),
        "users": len(users),
        "user_statuses": sorted({status for status, _ in users}),
        "user_ttft_p50_s": round(statistics.median(ttft), 3) if ttft else None,
        "user_ttft_p90_s": round(ttft[int(0.9 * (len(ttft) - 1))], 3) if ttft else None,
        "user_ttft_max_s": round(ttft[-1], 3) if ttft else None,
        "metrics": [
            line for line in metrics.splitlines()
            if line.startswith(("tgi_kv_cache_preemptions", "tgi_kv_cache_tokens ", "tgi_request_failure_total"))
        ],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=1500)
    parser.add_argument("--wave", type=int, default=8, help="users per wave")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between waves")
    parser.add_argument("--user-tokens", type=int, default=32)
    parser.add_argument(
        "--users-for",
        type=float,
        default=None,
        help="stop sending waves after this many seconds (default: until the big request ends)",
    )
    a = parser.parse_args()
    result = run(a.url, a.n, a.max_tokens, a.wave, a.every, a.user_tokens, a.users_for)
    print(json.dumps(asyncio.run(result), indent=1))


if __name__ == "__main__":
    main()
