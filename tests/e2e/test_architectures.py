"""Architectures other than Llama through the real launcher (issue 19): a Gemma 2, a Qwen3-MoE, a Qwen2-MoE
and a Phi-3 with LongRoPE on the paged backend, and a GPT-2 on the transformers backend through
``--backend auto``. Each serves
transformers' own greedy tokens for the prompts the router tokenized, with requests running side by side
and a prompt sent again finding its blocks in the prefix cache."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest
import requests

from tests.unit.shard.paged.test_architectures import CONFIGS, build, reference
from tests.unit.shard.paged.test_sliding_window import mistral_config, qwen2_config

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


def serve_and_compare(
    model: Path, backend: str, log_dir: Path, then: Callable[[Launched], None] | None = None
) -> Launched:
    """Starts the launcher on ``model``, sends the short and the long prompt side by side, then the long
    one again, and checks each answer against transformers' greedy tokens (then runs ``then`` on the
    server); returns the stopped server."""
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
        if then is not None:
            then(server)
    finally:
        stop_and_check(server)
    return server


@pytest.mark.parametrize("arch", ["gemma2", "qwen3_moe", "qwen2_moe"])
def test_paged_architectures_serve_transformers_greedy_tokens(
    arch: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = build(tmp_path / arch, tiny_model_dir, CONFIGS[arch])
    serve_and_compare(model, "paged", tmp_path)


WINDOW = 24
# The long prompt with another ending: its first blocks are the long prompt's (prefix-cache hits).
LONGER = LONG + "The capital of Spain is"


def beside_a_stream(model: Path, bounded: bool, server: Launched) -> None:
    """While a 400-token stream of the long prompt decodes, ``LONGER`` arrives: it runs in chunks beside
    the stream's decodes (the step's budget), starting from the long prompt's cached blocks, and gives
    transformers' greedy tokens. ``bounded`` (every layer windowed, 24 tokens): once ``LONGER`` is done,
    the KV cache in use (/metrics, polled while the stream runs) is at most the window's blocks and a
    block of drafts (16 tokens each), also after the stream's 150th token, not its 200-odd tokens."""
    parameters = {"max_new_tokens": 400, "ignore_eos_token": True}
    seen = [0]  # stream events read so far
    samples: list[tuple[int, float]] = []  # (events read, KV tokens in use), polled once LONGER is done
    hits = metric(server, "tgi_prefix_cache_hits")
    streaming = threading.Event()
    streaming.set()

    def poll(beside: Future[tuple[list[int], list[int]]]) -> None:
        """Samples once LONGER is done and has left the shard (at the step after its last token: a few
        stream tokens later)."""
        done_at = None
        while streaming.is_set():
            if done_at is None and beside.done():
                done_at = seen[0]
            if done_at is not None and seen[0] >= done_at + 10:
                samples.append((seen[0], metric(server, "tgi_kv_cache_used_tokens")))
            time.sleep(0.01)

    with ThreadPoolExecutor(2) as pool:
        with requests.post(f"{server.url}/generate_stream", json={"inputs": LONG, "parameters": parameters},
                           stream=True, timeout=300) as response:  # fmt: skip
            assert response.status_code == 200, response.text
            beside = pool.submit(generate, server, LONGER, False)
            poller = pool.submit(poll, beside)
            for line in response.iter_lines():
                if line.startswith(b"data:"):
                    assert "error" not in json.loads(line[5:]), line
                    seen[0] += 1
        streaming.clear()
        poller.result()
        _, tokens = beside.result()
    assert seen[0] == 400
    ids = requests.post(f"{server.url}/tokenize", json={"prompt": LONGER}, timeout=10).json()["tokens"]
    assert tokens == reference(model, [ids], NEW_TOKENS)[0]
    assert metric(server, "tgi_prefix_cache_hits") - hits >= 2
    if bounded:
        held = (-(-(WINDOW - 1) // 16) + 1) * 16
        assert all(used <= held + 16 for _, used in samples), samples
        assert any(events >= 150 and used > 0 for events, used in samples), samples


@pytest.mark.parametrize(
    "name, make_config, bounded",
    [
        ("mistral", partial(mistral_config, window=WINDOW), True),
        ("qwen2", partial(qwen2_config, window=WINDOW), False),
    ],
    ids=["mistral", "qwen2"],
)
def test_sliding_window_models_serve_transformers_greedy_tokens(
    name: str, make_config: Callable[[int], object], bounded: bool, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Mistral (every layer's window 24 tokens: blocks leave the cache as it slides) and Qwen2 with
    use_sliding_window (its last two of three layers windowed, the first global: nothing leaves the
    cache): prompts longer than the window, side by side, sent again (prefix-cache hits) and run in
    chunks beside a long stream, all give transformers' greedy tokens."""
    model = build(tmp_path / name, tiny_model_dir, make_config)
    serve_and_compare(model, "paged", tmp_path, partial(beside_a_stream, model, bounded))


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
