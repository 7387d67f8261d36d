"""End-to-end fixtures: the real launcher on loopback, on the default model or on a tiny random one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from .harness import FLOAT32, Launched

DEFAULT_MODEL_START_TIMEOUT_S = 600.0


def stop_and_check(server: Launched) -> None:
    code = server.stop()
    assert code == 0, f"launcher exited with {code}:\n{server.log()[-3000:]}"
    assert server.leftovers() == [], "child processes outlived the launcher"
    assert server.stale_sockets() == []


@pytest.fixture(scope="session")
def default_server(test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    """The launcher serving the embedded default model (converted once into the test cache), in float32 on
    every machine (its tokens are compared with transformers' and with other servers')."""
    server = Launched(
        ["--huggingface-hub-cache", str(test_cache / "hub"), "--max-concurrent-requests", "64", *FLOAT32]
    )
    server.start(tmp_path_factory.mktemp("logs"))
    try:
        server.wait_healthy(DEFAULT_MODEL_START_TIMEOUT_S)
        yield server
    finally:
        stop_and_check(server)


@pytest.fixture(scope="session")
def default_model_dir(default_server: Launched, test_cache: Path) -> Path:
    """The converted default model directory the server loaded (resolved from the same cache)."""
    from launcher.weights import WeightsConfig, resolve

    return resolve(WeightsConfig(hub_cache=test_cache / "hub"), progress=False).path


@pytest.fixture(scope="module")
def client(default_server: Launched) -> openai.OpenAI:
    """An OpenAI client of the default server (test_anthropic.py has an Anthropic one of that name)."""
    return openai.OpenAI(base_url=f"{default_server.url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    """The default server's model name, as it lists it."""
    return client.models.list().data[0].id
