"""Features compose in one server: a request with a watermark, a JSON schema and a seed, on int4 weights,
sharded over 3 processes on CPU, streams valid JSON, the same JSON again for the same seed.

The prompt is shorter than one KV block (16 tokens), so the repeat runs it whole again rather than from the
prefix cache: int4 and int8 round activations to int8, and that rounding can amplify the last-bit
differences between a prompt computed whole and one whose prefix came from the cache, so a repeated seeded
request is token-identical only when both prompts ran alike."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import requests

from .conftest import DEFAULT_MODEL_START_TIMEOUT_S, stop_and_check
from .harness import Launched

pytestmark = pytest.mark.timeout(900)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}
PROMPT = "A fictional software engineer as JSON:"  # under 16 tokens: see the module's docstring


def stream_text(server: Launched, watermark: bool, seed: int) -> tuple[str, list[int], str]:
    parameters = {
        "max_new_tokens": 200, "do_sample": True, "temperature": 0.8, "seed": seed, "watermark": watermark,
        "grammar": {"type": "json", "value": SCHEMA}, "details": True,
    }  # fmt: skip
    body = {"inputs": PROMPT, "parameters": parameters}
    with requests.post(f"{server.url}/generate_stream", json=body, stream=True, timeout=600) as response:
        assert response.status_code == 200, response.text
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith(b"data:")]
    assert events and all("error" not in e for e in events), events[-1:]
    final = events[-1]
    assert final["details"]["finish_reason"] == "eos_token", final["details"]
    text = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    return text, [e["token"]["id"] for e in events], final["generated_text"]


def test_watermark_json_schema_and_seed_on_int4_over_three_shards(test_cache: Path, tmp_path: Path) -> None:
    server = Launched(
        ["--huggingface-hub-cache", str(test_cache / "hub"), "--quantize", "int4", "--num-shard", "3"]
    ).start(tmp_path)
    try:
        server.wait_healthy(DEFAULT_MODEL_START_TIMEOUT_S)
        info = requests.get(f"{server.url}/info", timeout=10).json()
        assert info["num_shard"] == 3 and info["model_backend"] == "paged"
        text, ids, generated = stream_text(server, watermark=True, seed=7)
        assert text == generated
        jsonschema.validate(json.loads(text), SCHEMA)
        again, again_ids, _ = stream_text(server, watermark=True, seed=7)
        assert (again, again_ids) == (text, ids)  # the seed reproduces the stream exactly
        plain, _, _ = stream_text(server, watermark=False, seed=7)
        jsonschema.validate(json.loads(plain), SCHEMA)
        assert plain != text  # the watermark changed the choices
        print(f"\nwatermarked: {text}\nplain:       {plain}")
    finally:
        stop_and_check(server)
