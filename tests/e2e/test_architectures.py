"""Architectures other than Llama through the real launcher (issue 19): a Gemma 2, a Qwen3-MoE, a Qwen2-MoE
and a Phi-3 with LongRoPE on the paged backend, and a GPT-2 on the transformers backend through
``--backend auto``. Each serves
transformers' own greedy tokens for the prompts the router tokenized, with requests running side by side
and a prompt sent again finding its blocks in the prefix cache."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.unit.shard.paged.test_architectures import CONFIGS, build, reference

from .conftest import stop_and_check
from .harness import Launched, metric

pytestmark = pytest.mark.timeout(300)

NEW_TOKENS = 40
SHORT = "The capital of France is"
# Longer than Gemma 2's 8-token window and several 16-token blocks.
LONG = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome. " * 2


def generate(server: Launched, inputs: str, prompt_ids: bool = True) -> tuple[list[int], list[int]]:
    """The prompt's ids as the router tokenized them (``prompt_ids``: a request that asks for them computes
    its whole prompt, without the prefix cache), and the greedy tokens."""
    response = requests.post(
        f"{server.url}/generate",
        json={
            "inputs": inputs,
            "parameters": {
                "max_new_tokens": NEW_TOKENS,
                "details": True,
                "decoder_input_details": prompt_ids,
                "ignore_eos_token": True,
            },
        },
        timeout=120,
    )
    assert response.status_code == 200, response.text
    details = response.json()["details"]
    return [t["id"] for t in details.get("prefill", [])], [t["id"] for t in details["tokens"]]


def serve_and_compare(model: Path, backend: str, log_dir: Path) -> Launched:
    """Starts the launcher on ``model``, sends the short and the long prompt side by side, then the long
    one again, and checks each answer against transformers' greedy tokens; returns the stopped server."""
    server = Launched(["--model-id", str(model), "--backend", backend]).start(log_dir)
    try:
        server.wait_healthy(240)
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda text: generate(server, text), [SHORT, LONG]))
        hits = metric(server, "tgi_prefix_cache_hits") if backend == "paged" else 0.0
        _, again = generate(server, LONG, prompt_ids=False)
        answers.append((answers[1][0], again))
        expected = reference(model, [prompt for prompt, _ in answers], NEW_TOKENS)
        assert [tokens for _, tokens in answers] == expected
        info = requests.get(f"{server.url}/info", timeout=10).json()
        assert info["model_backend"] == ("transformers" if backend == "auto" else backend)
        if backend == "paged":
            assert metric(server, "tgi_prefix_cache_hits") - hits >= 2  # the long prompt, sent again
    finally:
        stop_and_check(server)
    return server


@pytest.mark.parametrize("arch", ["gemma2", "qwen3_moe", "qwen2_moe"])
def test_paged_architectures_serve_transformers_greedy_tokens(
    arch: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = build(tmp_path / arch, tiny_model_dir, CONFIGS[arch])
    serve_and_compare(model, "paged", tmp_path)


def test_a_gpt2_model_serves_through_auto_on_the_transformers_backend(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=len(tokenizer), n_positions=512,
                        bos_token_id=None, eos_token_id=None)  # fmt: skip
    model = GPT2LMHeadModel(config)
    model.lm_head.weight.data.mul_(20.0)  # greedy picks that are not near-ties
    path = tmp_path / "gpt2"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    serve_and_compare(path, "auto", tmp_path)
    log = next(tmp_path.glob("launcher-*.log")).read_text()
    # The launcher says what the fast path lacks, naming the model type it cannot run.
    assert "WARNING" in log and "The paged backend cannot run this model" in log and "gpt2" in log
    assert "without prefix caching, chunked prefill, tensor parallelism or int8/int4" in log


def test_phi3_longrope_serves_transformers_greedy_tokens_across_the_switch(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Phi-3 with LongRoPE switching at 24 positions: the short prompt runs short until its 25th token, where
    it is run whole again with the long factors (as transformers' generate does), the long one runs long
    throughout (side by side in the same steps), and sent again it finds its blocks in the prefix cache;
    every answer is transformers' greedy tokens."""
    from transformers import AutoTokenizer

    model = build(tmp_path / "phi3-longrope", tiny_model_dir, CONFIGS["phi3-longrope"])
    tokenizer = AutoTokenizer.from_pretrained(model)
    short, long = (len(tokenizer(text).input_ids) for text in (SHORT, LONG))
    assert short <= 24 < short + NEW_TOKENS and long > 24  # both sides of the switch
    serve_and_compare(model, "paged", tmp_path)
