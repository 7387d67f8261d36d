"""KV memory pressure end to end: a pool far too small for what is asked slows requests, never fails them."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import requests

from .conftest import stop_and_check
from .harness import Launched, metric

pytestmark = pytest.mark.timeout(600)

POOL_TOKENS = 320


@pytest.fixture(scope="module")
def small_pool(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    server = Launched(
        [
            "--model-id", str(tiny_model_dir),
            "--max-batch-total-tokens", str(POOL_TOKENS),
            "--max-total-tokens", "160",
            "--max-input-length", "96",
            "--max-batch-prefill-tokens", "96",
            "--max-concurrent-requests", "128",
        ]
    )  # fmt: skip
    server.start(tmp_path_factory.mktemp("kv-pressure"))
    try:
        server.wait_healthy(300)
        yield server
    finally:
        stop_and_check(server)


def prompts() -> list[str]:
    words = ["alpha", "beta", "gamma", "delta", "echo", "fox", "golf", "hotel", "india", "juliet"]
    return [" ".join(words[(i + j) % 10] for j in range(3 + i % 6)) for i in range(64)]


async def _generate(session: aiohttp.ClientSession, url: str, inputs: str) -> tuple[int, list[int]]:
    body = {"inputs": inputs, "parameters": {"max_new_tokens": 48, "details": True, "ignore_eos_token": True}}
    async with session.post(f"{url}/generate", json=body) as response:
        data = await response.json()
        if response.status != 200:
            return response.status, []
        return response.status, [t["id"] for t in data["details"]["tokens"]]


def test_sixty_four_requests_over_a_pool_several_times_too_small_all_complete(small_pool: Launched) -> None:
    assert requests.get(f"{small_pool.url}/info", timeout=10).json()["max_batch_total_tokens"] == POOL_TOKENS
    texts = prompts()

    async def run(concurrent: bool) -> list[tuple[int, list[int]]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=500)) as session:
            if concurrent:
                return await asyncio.gather(*(_generate(session, small_pool.url, t) for t in texts))
            return [await _generate(session, small_pool.url, t) for t in texts]

    alone = asyncio.run(run(concurrent=False))
    assert metric(small_pool, "tgi_kv_cache_preemptions") == 0
    # Alone, each request drafts from its text where that pays (the tiny model repeats itself): the
    # concurrent run below, which preempts and drafts less, must give the same tokens.
    assert metric(small_pool, "tgi_speculative_drafted_tokens") > 0
    assert (
        0
        < metric(small_pool, "tgi_speculative_accepted_tokens")
        <= metric(small_pool, "tgi_speculative_drafted_tokens")
    )
    together = asyncio.run(run(concurrent=True))
    assert [status for status, _ in together] == [200] * 64
    # Each request holds its prompt and 48 tokens: about 20 times what the pool holds, in all.
    assert together == alone  # greedy: the same tokens, preempted and recomputed or not
    assert metric(small_pool, "tgi_kv_cache_preemptions") > 0
    assert metric(small_pool, "tgi_kv_cache_tokens") == POOL_TOKENS
    failures = requests.get(f"{small_pool.url}/metrics", timeout=10).text
    assert not re.search(r'^tgi_request_failure_total\{err="generation"\} [1-9]', failures, re.MULTILINE)
