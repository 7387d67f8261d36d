"""TGI's `watermark` parameter through the real server on the default model, checked by the detector."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from shard.processors.watermark import detect

from .harness import Launched

pytestmark = pytest.mark.timeout(600)

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Describe your favourite city and why you like it.",
    "List some ideas for a weekend trip.",
    "Explain how a bicycle works.",
]


def sampled_ids(server: Launched, prompt: str, watermark: bool, seed: int) -> list[int]:
    parameters = {
        "max_new_tokens": 100, "do_sample": True, "temperature": 1.0, "seed": seed, "watermark": watermark,
        "details": True, "ignore_eos_token": True,
    }  # fmt: skip
    response = requests.post(
        f"{server.url}/generate", json={"inputs": prompt, "parameters": parameters}, timeout=300
    )
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def test_watermarked_generations_are_detected_and_plain_ones_are_not(default_server: Launched) -> None:
    jobs = [(p, mark, seed) for seed, p in enumerate(PROMPTS) for mark in (True, False)]
    with ThreadPoolExecutor(len(jobs)) as pool:  # watermarked and plain requests share batches
        outputs = list(pool.map(lambda job: sampled_ids(default_server, *job), jobs))
    marked = [ids for (_, mark, _), ids in zip(jobs, outputs, strict=True) if mark]
    plain = [ids for (_, mark, _), ids in zip(jobs, outputs, strict=True) if not mark]
    marked_verdict = detect([t for ids in marked for t in ids])
    plain_verdict = detect([t for ids in plain for t in ids])
    print(f"\nwatermark z-scores: marked {marked_verdict.z_score:.1f}, plain {plain_verdict.z_score:.1f}")
    assert marked_verdict.watermarked, marked_verdict
    assert not plain_verdict.watermarked and plain_verdict.z_score < 3, plain_verdict
    # Each watermarked answer on its own already leans green.
    assert all(detect(ids).z_score > 1.5 for ids in marked), [detect(ids).z_score for ids in marked]


def test_watermark_must_be_a_boolean(default_server: Launched) -> None:
    response = requests.post(
        f"{default_server.url}/generate",
        json={"inputs": "Hi", "parameters": {"watermark": "yes"}},
        timeout=60,
    )
    assert response.status_code == 422 and "`watermark`" in response.json()["error"]
