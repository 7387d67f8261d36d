"""The gateway's metrics under load, on the real processes: a KV pool of two blocks serves six requests at
once, so two run while the others wait. Every scrape must tell the truth of that moment (the gateway's
gauges agree with the tgi_* ones and with the pool); after the load, nothing waits, runs or holds memory.

The same server checks that /docs needs no other host: its page loads its script and style from the router.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from .conftest import stop_and_check
from .harness import Launched

pytestmark = pytest.mark.timeout(300)

REQUESTS = 6
# Each request fits one 16-token block (a prompt of at most 8 tokens, 8 new ones): the pool of two blocks
# runs two at a time. Each step sleeps 0.25 s (the test-only fault hook), so a scrape sees them run.
BODY = {
    "inputs": "Hello",
    "parameters": {"max_new_tokens": 8, "ignore_eos_token": True, "fault": "sleep"},
}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    server = Launched(
        [
            "--model-id", str(tiny_model_dir), "--fault-injection",
            "--max-input-length", "8", "--max-total-tokens", "16", "--max-batch-prefill-tokens", "16",
            "--max-batch-total-tokens", "32", "--served-model-name", "tiny-gateway",
        ]
    )  # fmt: skip
    server.start(tmp_path_factory.mktemp("gateway"))
    try:
        server.wait_healthy(120)
        yield server
    finally:
        stop_and_check(server)


def scrape(server: Launched) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def gauge(sample: dict, name: str, labels: dict[str, str] | None = None) -> float:
    (found, value), *rest = sample[name]
    assert not rest, (name, rest)
    if labels is not None:
        assert found == labels, (name, found)
    return value


def gateway(sample: dict) -> tuple[float, float, float]:
    """(waiting, running, KV cache usage) as the endpoint picker reads them, checked against the rest."""
    labels = {"model_name": "tiny-gateway"}
    waiting = gauge(sample, "vllm:num_requests_waiting", labels)
    running = gauge(sample, "vllm:num_requests_running", labels)
    usage = gauge(sample, "vllm:kv_cache_usage_perc", labels)
    assert gauge(sample, "vllm:gpu_cache_usage_perc", labels) == usage
    assert waiting == gauge(sample, "tgi_queue_size") and running == gauge(sample, "tgi_batch_current_size")
    pool = gauge(sample, "tgi_kv_cache_tokens")  # 0 until the first step reports the pool
    assert pool in (0, 32) and usage == pytest.approx(gauge(sample, "tgi_kv_cache_used_tokens") / (pool or 1))
    return waiting, running, usage


def test_gateway_metrics_under_load(server: Launched) -> None:
    statuses: list[int] = []

    def one() -> None:
        statuses.append(requests.post(f"{server.url}/generate", json=BODY, timeout=120).status_code)

    idle = scrape(server)
    assert gateway(idle) == (0, 0, 0)
    (lora_labels, stamp), *rest = idle["vllm:lora_requests_info"]
    assert not rest and lora_labels == {
        "running_lora_adapters": "",
        "waiting_lora_adapters": "",
        "max_lora": "0",
    }
    threads = [threading.Thread(target=one) for _ in range(REQUESTS)]
    for t in threads:
        t.start()
    seen = []
    while any(t.is_alive() for t in threads):
        seen.append(gateway(scrape(server)))
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert statuses == [200] * REQUESTS
    for waiting, running, usage in seen:
        assert 0 <= running <= 2 and 0 <= waiting + running <= REQUESTS, (waiting, running)
        assert 0 <= usage <= 1
        if running:
            assert usage >= 0.5, (waiting, running, usage)  # each running request holds a block of two
    assert any(running == 2 and waiting >= 1 for waiting, running, _ in seen), seen
    assert max(usage for *_, usage in seen) == 1.0
    # The step after the last token lets the finished requests go: nothing waits, runs or holds blocks.
    deadline = time.monotonic() + 10
    while gateway(after := scrape(server)) != (0, 0, 0) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gateway(after) == (0, 0, 0)
    assert gauge(after, "vllm:lora_requests_info") > stamp  # the time of the last update


def test_docs_load_nothing_from_other_hosts(server: Launched) -> None:
    page = requests.get(f"{server.url}/docs", timeout=10)
    assert page.status_code == 200 and "SwaggerUIBundle" in page.text
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources and all(s.startswith("/") for s in sources), sources  # this server's paths only
    for source in sources:
        if source == "/openapi.json":
            continue
        asset = requests.get(f"{server.url}{source}", timeout=10)
        assert asset.status_code == 200 and len(asset.content) > 10_000, source
        kind = "text/css" if source.endswith(".css") else "text/javascript"
        assert asset.headers["Content-Type"].startswith(kind)
    bundle = requests.get(f"{server.url}/docs/assets/swagger-ui-bundle.js", timeout=10).text
    assert "SwaggerUIBundle" in bundle
    assert requests.get(f"{server.url}/docs/assets/other.js", timeout=10).status_code == 404
