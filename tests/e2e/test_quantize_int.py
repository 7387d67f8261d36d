"""``--quantize int8`` (the paged backend's weight-only int8) end to end on the default model: the
launcher starts it and it still answers right."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .conftest import DEFAULT_MODEL_START_TIMEOUT_S, stop_and_check
from .harness import Launched

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def int8_server(test_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    server = Launched(["--huggingface-hub-cache", str(test_cache / "hub"), "--quantize", "int8"])
    server.start(tmp_path_factory.mktemp("logs-int8"))
    try:
        server.wait_healthy(DEFAULT_MODEL_START_TIMEOUT_S)
        yield server
    finally:
        stop_and_check(server)


def test_int8_answers_the_capital_of_france(int8_server: Launched) -> None:
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    response = requests.post(
        f"{int8_server.url}/generate",
        json={"inputs": prompt, "parameters": {"max_new_tokens": 20}},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    assert "Paris" in response.json()["generated_text"]
    assert "Quantized to int8" in int8_server.log()
    info = requests.get(f"{int8_server.url}/info", timeout=10).json()
    assert info["model_device_type"] == "cpu"
