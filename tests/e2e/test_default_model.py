"""The default model served end to end: correctness, TGI shapes, continuous batching, the TGI client."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import aiohttp
import pytest
import requests

from .harness import Launched

pytestmark = pytest.mark.timeout(600)

QUESTION = "What is the capital of France?"
PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "My favourite food is",
    "The quick brown fox",
    "In 1969, the first man on the moon was",
]


def chat(text: str) -> str:
    """The default model's ChatML format, as its chat template renders one user turn."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def generate(server: Launched, inputs: str, **parameters: object) -> dict:
    response = requests.post(
        f"{server.url}/generate", json={"inputs": inputs, "parameters": parameters}, timeout=300
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_capital_of_france(default_server: Launched) -> None:
    body = generate(default_server, chat(QUESTION), max_new_tokens=20, details=True)
    assert "Paris" in body["generated_text"]
    assert body["details"]["finish_reason"] == "eos_token"
    assert body["details"]["tokens"][-1]["special"] is True


def test_info_says_what_is_served(default_server: Launched) -> None:
    info = requests.get(f"{default_server.url}/info", timeout=10).json()
    assert info["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "gguf" in info["model_weights"].lower()
    assert info["model_dtype"] == "float32"
    assert info["model_device_type"] == "cpu"
    assert info["max_input_length"] == 1024 and info["max_total_tokens"] == 2048


def test_greedy_equals_transformers_generate(default_server: Launched, default_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    for prompt in PROMPTS[:3]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        expected = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)[
            0, ids.shape[1] :
        ]
        body = generate(default_server, prompt, max_new_tokens=16, details=True, ignore_eos_token=True)
        assert [t["id"] for t in body["details"]["tokens"]] == expected.tolist(), prompt


async def _generate_async(
    session: aiohttp.ClientSession, url: str, inputs: str, **params: object
) -> list[int]:
    async with session.post(f"{url}/generate", json={"inputs": inputs, "parameters": params}) as response:
        body = await response.json()
        assert response.status == 200, body
        return [t["id"] for t in body["details"]["tokens"]]


def test_greedy_ids_identical_alone_and_in_a_batch(default_server: Launched) -> None:
    params = {"max_new_tokens": 24, "details": True, "ignore_eos_token": True}
    alone = [generate(default_server, p, **params) for p in PROMPTS[:2]]
    alone_ids = [[t["id"] for t in body["details"]["tokens"]] for body in alone]

    async def batched() -> list[list[int]]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(
                *(_generate_async(session, default_server.url, p, **params) for p in PROMPTS)
            )

    together = asyncio.run(batched())
    assert together[:2] == alone_ids


async def _stream(
    session: aiohttp.ClientSession,
    url: str,
    inputs: str,
    first: asyncio.Event | None = None,
    **params: object,
) -> list[tuple[float, dict]]:
    """The stream's events with their arrival times; ``first`` is set on the first token."""
    events = []
    async with session.post(
        f"{url}/generate_stream", json={"inputs": inputs, "parameters": params}
    ) as response:
        assert response.status == 200
        async for raw in response.content:
            line = raw.decode().strip()
            if line.startswith("data:"):
                events.append((time.monotonic(), json.loads(line[5:])))
                if first is not None:
                    first.set()
    return events


def test_sixteen_streams_interleave(default_server: Launched) -> None:
    params = {"max_new_tokens": 24, "ignore_eos_token": True, "details": True}

    async def run() -> list[list[tuple[float, dict]]]:
        async with aiohttp.ClientSession() as session:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
            return await asyncio.gather(*(_stream(session, default_server.url, p, **params) for p in prompts))

    streams = asyncio.run(run())
    assert all(len(s) == 24 for s in streams)
    first_end = min(s[-1][0] for s in streams)
    # Every stream had tokens before the first stream finished: they decode together, not one by one.
    assert all(s[0][0] < first_end for s in streams)
    for events in streams:
        final = events[-1][1]
        assert final["details"]["generated_tokens"] == 24
        streamed = "".join(e["token"]["text"] for _, e in events if not e["token"]["special"])
        assert streamed == final["generated_text"]


def test_request_joins_while_others_decode(default_server: Launched) -> None:
    long_params = {"max_new_tokens": 150, "ignore_eos_token": True}

    async def run() -> tuple[list, list]:
        async with aiohttp.ClientSession() as session:
            firsts = [asyncio.Event() for _ in range(4)]
            long_tasks = [
                asyncio.create_task(_stream(session, default_server.url, p, first, **long_params))
                for p, first in zip(PROMPTS[:4], firsts, strict=True)
            ]
            await asyncio.gather(*(first.wait() for first in firsts))  # the long ones are decoding now
            short = await _stream(session, default_server.url, PROMPTS[5], max_new_tokens=4)
            return await asyncio.gather(*long_tasks), short

    long_streams, short = asyncio.run(run())
    long_end = min(s[-1][0] for s in long_streams)
    assert short[0][0] < long_end, "the new request waited for the running batch to finish"
    assert short[-1][0] < long_end


def test_stream_equals_non_stream(default_server: Launched) -> None:
    prompt = chat("Write a haiku about the sea.")
    body = generate(default_server, prompt, max_new_tokens=40, details=True)

    async def run() -> list:
        async with aiohttp.ClientSession() as session:
            return await _stream(session, default_server.url, prompt, max_new_tokens=40, details=True)

    events = [e for _, e in asyncio.run(run())]
    assert events[-1]["generated_text"] == body["generated_text"]
    assert [e["token"]["id"] for e in events] == [t["id"] for t in body["details"]["tokens"]]


def test_stop_sequence(default_server: Launched) -> None:
    body = generate(default_server, chat(QUESTION), max_new_tokens=20, stop=["Paris"], details=True)
    assert body["generated_text"].endswith("Paris")
    assert body["details"]["finish_reason"] == "stop_sequence"


def test_seeded_sampling_is_reproducible(default_server: Launched) -> None:
    params = {
        "max_new_tokens": 16,
        "do_sample": True,
        "temperature": 0.9,
        "top_k": 40,
        "seed": 1234,
        "details": True,
    }
    first = generate(default_server, PROMPTS[1], **params)
    second = generate(default_server, PROMPTS[1], **params)
    assert first["generated_text"] == second["generated_text"]
    assert first["details"]["seed"] == 1234


def test_text_generation_client(default_server: Launched) -> None:
    """Hugging Face's own TGI client works unchanged (it posts to the compat route POST /)."""
    from text_generation import Client

    client = Client(default_server.url, timeout=120)
    response = client.generate(chat(QUESTION), max_new_tokens=20, decoder_input_details=True, top_n_tokens=2)
    assert "Paris" in response.generated_text
    assert response.details.finish_reason.value == "eos_token"
    assert len(response.details.prefill) > 5 and response.details.prefill[0].logprob is None
    assert len(response.details.top_tokens[0]) == 2

    text = ""
    final = None
    for event in client.generate_stream(chat(QUESTION), max_new_tokens=20):
        if not event.token.special:
            text += event.token.text
        if event.details is not None:
            final = event
    assert final is not None and final.generated_text == text
    assert "Paris" in text


def test_validation_errors(default_server: Launched) -> None:
    url = f"{default_server.url}/generate"
    cases = [
        ({"inputs": "hi", "parameters": {"temperature": 0}}, "temperature"),
        ({"inputs": "hi", "parameters": {"top_k": 0.5}}, "top_k"),
        ({"inputs": "", "parameters": {}}, "inputs"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 5000}}, "max_new_tokens"),
        ({"inputs": "hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "stop"),
    ]
    for body, field in cases:
        response = requests.post(url, json=body, timeout=30)
        assert response.status_code == 422, (body, response.text)
        assert field in response.json()["error"] and response.json()["error_type"] == "validation"
    response = requests.post(url, data="not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400 and "JSON" in response.json()["error"]
    response = requests.post(url, data="x", headers={"Content-Type": "text/plain"}, timeout=30)
    assert response.status_code == 415
    assert requests.get(f"{default_server.url}/health", timeout=10).status_code == 200


def test_metrics_and_docs(default_server: Launched) -> None:
    generate(default_server, "Hello", max_new_tokens=2)
    text = requests.get(f"{default_server.url}/metrics", timeout=10).text
    for name in (
        "tgi_request_count",
        "tgi_request_success",
        "tgi_batch_inference_duration",
        "tgi_queue_size",
    ):
        assert name in text
    # The shard's own time per step, from the total_ns of its answers.
    forward = re.search(r'^tgi_batch_forward_duration_count\{method="decode"\} (\S+)$', text, re.M)
    assert forward is not None and float(forward.group(1)) >= 1
    assert requests.get(f"{default_server.url}/openapi.json", timeout=10).json()["paths"]["/generate"]
    assert "swagger" in requests.get(f"{default_server.url}/docs", timeout=10).text.lower()


def test_tgi_parameters_round_trip(default_server: Launched) -> None:
    prompt = "The three primary colors are"
    body = generate(default_server, prompt, max_new_tokens=6, best_of=2, do_sample=True, details=True)
    assert len(body["details"]["best_of_sequences"]) == 1
    assert body["details"]["seed"] is not None

    body = generate(default_server, prompt, max_new_tokens=4, return_full_text=True)
    assert body["generated_text"].startswith(prompt)

    body = generate(
        default_server, prompt, max_new_tokens=2, truncate=3, decoder_input_details=True, details=True
    )
    assert len(body["details"]["prefill"]) == 3

    for extra in ({"repetition_penalty": 1.3}, {"typical_p": 0.5, "seed": 3}, {"top_p": 0.9, "seed": 4}):
        body = generate(default_server, prompt, max_new_tokens=8, details=True, **extra)
        assert body["details"]["generated_tokens"] == 8 or body["details"]["finish_reason"] != "length"

    response = requests.post(
        f"{default_server.url}/generate",
        json={"inputs": prompt, "parameters": {"best_of": 2, "seed": 1, "do_sample": True}},
        timeout=30,
    )
    assert response.status_code == 422 and "seed" in response.json()["error"]


def test_compat_route_streams_and_answers_an_array(default_server: Launched) -> None:
    response = requests.post(
        f"{default_server.url}/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}, timeout=60
    )
    assert response.status_code == 200 and isinstance(response.json(), list)
    response = requests.post(
        f"{default_server.url}/",
        json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}, "stream": True},
        timeout=60,
    )
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.text.count("data:") == 3
