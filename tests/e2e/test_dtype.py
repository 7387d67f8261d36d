"""--dtype's default through the real launcher: a start without --dtype serves the model's own dtype where the
CPU runs it natively (bfloat16 on AMX or AVX512-BF16 for a 16-bit checkpoint or a quantized GGUF, such as the
default model), float32 elsewhere; /info reports it and the launcher's log says why."""

from __future__ import annotations

import re
from pathlib import Path

import openai
import pytest
import requests
import torch

from .conftest import DEFAULT_MODEL_START_TIMEOUT_S, stop_and_check
from .harness import Launched

pytestmark = pytest.mark.timeout(900)


def cpu_runs_bfloat16() -> bool:
    """Whether this machine multiplies bfloat16 natively, read here from /proc/cpuinfo's flags and torch's
    kernel capability (not from shard/dtypes.py, whose choice the tests check)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []
    )
    native = "amx_bf16" in flags or "avx512_bf16" in flags
    return native and torch.backends.cpu.get_cpu_capability() == "AVX512"


def serve_info(server: Launched, timeout: float) -> dict:
    server.wait_healthy(timeout)
    return requests.get(f"{server.url}/info", timeout=10).json()


def client(server: Launched) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


def test_the_default_model_serves_in_the_dtype_this_cpu_runs_natively(
    test_cache: Path, tmp_path: Path
) -> None:
    expected = "bfloat16" if cpu_runs_bfloat16() else "float32"
    server = Launched(["--huggingface-hub-cache", str(test_cache / "hub")]).start(tmp_path)
    try:
        info = serve_info(server, DEFAULT_MODEL_START_TIMEOUT_S)
        assert info["model_dtype"] == expected
        log = server.log()
        assert re.search(
            rf"dtype {expected}: a Q4_1 GGUF \(SmolLM2-135M-Instruct\.Q4_1\.gguf, mostly Q4_1\)", log
        ), log[-3000:]
        question = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client(server).chat.completions.create(
            model="tgi", messages=question, temperature=0, max_tokens=20
        )
        assert "Paris" in (reply.choices[0].message.content or "")
    finally:
        stop_and_check(server)


@pytest.fixture(scope="module")
def bf16_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama saved in bfloat16 (its config.json says so), with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-bf16")
    AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(path)
    return path


def test_a_bfloat16_checkpoint_follows_the_cpu(bf16_model_dir: Path, tmp_path: Path) -> None:
    """On this machine as it is, and with torch's kernels held at AVX2 (ATEN_CPU_CAPABILITY=avx2, what an
    AVX2-only CPU gives): float32 there, with the reason; both serve."""
    native = cpu_runs_bfloat16()
    for env, expected in (
        ({}, "bfloat16" if native else "float32"),
        ({"ATEN_CPU_CAPABILITY": "avx2"}, "float32"),
    ):
        server = Launched(["--model-id", str(bf16_model_dir)], env=env).start(tmp_path)
        try:
            info = serve_info(server, 180)
            assert info["model_dtype"] == expected, env
            log = server.log()
            assert f"dtype {expected}: bfloat16 weights (config.json dtype bfloat16)" in log, log[-3000:]
            if expected == "float32":
                assert "this CPU has no native bfloat16 products (torch CPU capability AVX2" in log
            else:
                assert "this CPU multiplies bfloat16 natively" in log
            completion = client(server).completions.create(model="tgi", prompt="Hello", max_tokens=5)
            assert completion.usage is not None and completion.usage.completion_tokens >= 1
        finally:
            stop_and_check(server)
