"""Quantization end to end on the default model: bitsandbytes int8 / NF4 / FP4 and CTranslate2 int8, each
through the launcher and the same continuous-batching path as full precision (which test_default_model
covers). One server per mode; short generations, to keep the suite's time in bounds.

The paged backend's own weight-only --quantize int8 is tested here too."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import aiohttp
import pytest
import requests

from .conftest import DEFAULT_MODEL_START_TIMEOUT_S, stop_and_check
from .harness import Launched
from .test_launcher import run_launcher

pytest.importorskip("bitsandbytes")
pytest.importorskip("ctranslate2")

QUESTION = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):"]


def start(test_cache: Path, log_dir: Path, *args: str) -> tuple[Launched, float]:
    """A launcher on the default model (the shared test cache); returns it and its seconds to healthy."""
    server = Launched(
        ["--huggingface-hub-cache", str(test_cache / "hub"), "--max-concurrent-requests", "16", *args]
    )
    started = time.monotonic()
    server.start(log_dir)
    try:
        server.wait_healthy(DEFAULT_MODEL_START_TIMEOUT_S)
    except BaseException:
        server.kill_all()
        raise
    return server, time.monotonic() - started


def generate(server: Launched, inputs: str, **parameters: object) -> requests.Response:
    return requests.post(
        f"{server.url}/generate", json={"inputs": inputs, "parameters": parameters}, timeout=600
    )


def answer(server: Launched, max_new_tokens: int = 12) -> str:
    response = generate(server, QUESTION, max_new_tokens=max_new_tokens)
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


async def _stream(session: aiohttp.ClientSession, url: str, prompt: str, n: int) -> list[dict]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": n, "ignore_eos_token": True}}
    events = []
    async with session.post(f"{url}/generate_stream", json=body) as response:
        assert response.status == 200
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events


def concurrent_streams(server: Launched, n: int) -> list[list[dict]]:
    async def run() -> list[list[dict]]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(_stream(session, server.url, p, n) for p in PROMPTS))

    return asyncio.run(run())


@pytest.mark.timeout(900)
@pytest.mark.parametrize("mode", ["bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4"])
def test_bitsandbytes(mode: str, test_cache: Path, tmp_path: Path) -> None:
    server, seconds = start(test_cache, tmp_path, "--quantize", mode)
    try:
        print(f"\n{mode}: healthy in {seconds:.1f} s")
        info = requests.get(f"{server.url}/info", timeout=10).json()
        assert info["model_backend"] == f"transformers+{mode}" and info["model_dtype"] == "float32"
        text = answer(server)
        print(f"{mode}: {text!r}")
        if mode == "bitsandbytes":
            assert "Paris" in text
        else:  # 4-bit: a sensible answer (both name Paris on this model today)
            assert "capital" in text or "Paris" in text
        if mode == "bitsandbytes-nf4":  # requests decode together, through the same batching path
            streams = concurrent_streams(server, 3)
            assert all(len(s) == 3 and s[-1]["generated_text"] for s in streams)
    finally:
        stop_and_check(server)


@pytest.mark.timeout(900)
def test_paged_int8_answers_the_capital_of_france(test_cache: Path, tmp_path: Path) -> None:
    server, _ = start(test_cache, tmp_path, "--quantize", "int8")
    try:
        assert "Paris" in answer(server, max_new_tokens=20)
        assert "Quantized to int8" in server.log()
        info = requests.get(f"{server.url}/info", timeout=10).json()
        assert info["model_device_type"] == "cpu"
    finally:
        stop_and_check(server)


def _ct2_entry(log: str) -> Path:
    match = re.search(r"Serving .* from (\S+-ct2-int8-[0-9a-f]+)", log)
    assert match, log[-3000:]
    return Path(match.group(1))


def _model_ready_s(log: str) -> float:
    match = re.search(r"Model ready in ([0-9.]+) s", log)
    return float(match.group(1)) if match else float("nan")


@pytest.mark.timeout(900)
def test_ct2_serves_and_its_second_start_uses_the_cache(test_cache: Path, tmp_path: Path) -> None:
    first, first_s = start(test_cache, tmp_path, "--quantize", "ct2")
    try:
        log = first.log()
        entry = _ct2_entry(log)
        converted = "to CTranslate2 int8 into" in log
        info = requests.get(f"{first.url}/info", timeout=10).json()
        assert info["model_backend"] == "ct2" and info["model_dtype"] == "int8"
        assert "CTranslate2 int8" in info["model_weights"]
        text = answer(first, 20)
        assert "Paris" in text, text
        # Streams that decode together; tokens come one per step.
        streams = concurrent_streams(first, 8)
        assert all(len(s) == 8 and s[-1]["details"] is None for s in streams)
        # Prompt log-probabilities (the server's perplexity path) and top tokens.
        response = generate(
            first, "The capital of France is", max_new_tokens=2, details=True, decoder_input_details=True,
            top_n_tokens=2,
        )  # fmt: skip
        assert response.status_code == 200, response.text
        details = response.json()["details"]
        assert details["prefill"][0]["logprob"] is None
        assert all(t["logprob"] < 0 for t in details["prefill"][1:])
        assert len(details["top_tokens"][0]) == 2
        # Parameters CTranslate2 cannot honour are refused, by name, on both APIs.
        response = generate(first, "Hi", typical_p=0.5)
        assert response.status_code == 422 and "typical_p" in response.json()["error"]
        response = generate(first, "Hi", watermark=True)  # CTranslate2's engine runs no logits processors
        assert response.status_code == 422 and "`watermark`" in response.json()["error"]
        response = requests.post(
            f"{first.url}/v1/completions",
            json={"prompt": "Hi", "max_tokens": 2, "logit_bias": {"5": 1}},
            timeout=60,
        )
        assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias"
    finally:
        stop_and_check(first)
    marker = (entry / ".complete.json").stat().st_mtime_ns
    model_bin = (entry / "ct2" / "model.bin").stat().st_mtime_ns

    second, second_s = start(test_cache, tmp_path, "--quantize", "ct2")
    try:
        log = second.log()
        assert f"Using cached conversion at {entry}" in log
        assert "to CTranslate2 int8 into" not in log, "the second start converted again"
        assert (entry / ".complete.json").stat().st_mtime_ns == marker
        assert (entry / "ct2" / "model.bin").stat().st_mtime_ns == model_bin
        assert "Paris" in answer(second, 20)
        conversion = json.loads((entry / ".complete.json").read_text()).get("seconds")
        print(
            f"\nct2 first start ({'converted' if converted else 'cached'}): healthy in {first_s:.1f} s; "
            f"second (cached): {second_s:.1f} s; the conversion took {conversion} s; "
            f"shard load {_model_ready_s(first.log()):.1f} s / {_model_ready_s(log):.1f} s"
        )
    finally:
        stop_and_check(second)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quantize", "gptq"], "`--quantize gptq` is not supported"),
        (["--quantize", "ct2", "--num-shard", "2"], "`--quantize ct2` runs in one shard"),
        (
            ["--quantize", "bitsandbytes-nf4", "--num-shard", "2"],
            "`--quantize bitsandbytes-nf4` runs in one shard",
        ),
        (["--quantize", "bitsandbytes", "--backend", "paged"], "runs on the transformers backend"),
        (["--quantize", "ct2", "--backend", "transformers"], "leave `--backend` at auto"),
        (["--quantize", "ct2", "--dtype", "float16"], "cannot run on cpu"),
        (["--quantize", "ct2", "--ct2-max-batches", "0"], "`ct2_max_batches` must be >= 1"),
    ],
)
def test_quantize_refusals_before_anything_starts(args: list[str], message: str) -> None:
    result = run_launcher(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
