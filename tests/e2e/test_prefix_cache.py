"""The prefix cache through the real launcher: a long prompt sent again hits it, unless the second request
names another cache_salt (vLLM's per-tenant salt, issue 17); bad salts are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from .conftest import stop_and_check
from .harness import Launched

pytestmark = pytest.mark.timeout(300)

# About 90 tokens of the tiny model's tokenizer: five full blocks of 16 (the paged backend's block size).
PROMPT = "The capital of France is Paris. The capital of Germany is Berlin. " * 6


def cache_metrics(server: Launched) -> tuple[float, float]:
    """(tgi_prefix_cache_queries, tgi_prefix_cache_hits): prompt blocks looked up, and found."""
    values = {}
    for line in requests.get(f"{server.url}/metrics", timeout=10).text.splitlines():
        name, _, value = line.partition(" ")
        values[name] = value
    return float(values["tgi_prefix_cache_queries"]), float(values["tgi_prefix_cache_hits"])


def generate(server: Launched, **parameters: object) -> requests.Response:
    return requests.post(
        f"{server.url}/generate",
        json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2, **parameters}},
        timeout=60,
    )


def hits_of(server: Launched, send) -> float:
    """The prefix-cache hits one request made; checks that it looked the cache up at all (a lookup stops
    at the first block missing)."""
    queries, hits = cache_metrics(server)
    response = send()
    assert response.status_code == 200, response.text
    queries_after, hits_after = cache_metrics(server)
    assert queries_after - queries >= 1
    return hits_after - hits


def test_same_salt_hits_the_prefix_cache_and_another_salt_does_not(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    server = Launched(["--model-id", str(tiny_model_dir)]).start(tmp_path)
    try:
        server.wait_healthy(120)
        tokens = requests.post(f"{server.url}/tokenize", json={"prompt": PROMPT}, timeout=10).json()["count"]
        blocks = (tokens - 1) // 16  # full blocks before the last token (whose logits must be computed)
        assert blocks >= 3
        assert hits_of(server, lambda: generate(server, cache_salt="tenant-a")) == 0  # the first one
        assert hits_of(server, lambda: generate(server, cache_salt="tenant-a")) == blocks
        assert hits_of(server, lambda: generate(server, cache_salt="tenant-b")) == 0
        assert hits_of(server, lambda: generate(server)) == 0  # no salt: apart from every salt
        assert hits_of(server, lambda: generate(server)) == blocks

        # The OpenAI route carries the salt too: tenant-b's blocks are cached now, tenant-c's are not.
        def completion(salt: str):
            return lambda: requests.post(
                f"{server.url}/v1/completions",
                json={"prompt": PROMPT, "max_tokens": 2, "cache_salt": salt},
                timeout=60,
            )

        assert hits_of(server, completion("tenant-b")) == blocks
        assert hits_of(server, completion("tenant-c")) == 0

        bad = generate(server, cache_salt="")
        assert bad.status_code == 422 and "`cache_salt`" in bad.json()["error"], bad.text
        bad = requests.post(
            f"{server.url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Hi"}], "cache_salt": 7},
            timeout=10,
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "cache_salt", bad.text
    finally:
        stop_and_check(server)
