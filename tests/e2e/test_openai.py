"""The official openai SDK against the server, unchanged: chat, completions, streaming, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest
import requests

from .conftest import stop_and_check
from .harness import Launched

pytestmark = pytest.mark.timeout(600)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]


def test_chat_names_paris(client: openai.OpenAI, model: str, default_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    response = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=20)
    choice = response.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    rendered = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    prompt_ids = tokenizer.encode(rendered, add_special_tokens=False)
    assert response.usage.prompt_tokens == len(prompt_ids)
    answer_ids = tokenizer.encode(choice.message.content, add_special_tokens=False)
    assert response.usage.completion_tokens == len(answer_ids) + 1  # + the end-of-turn token
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_unprefixed_routes(default_server: Launched) -> None:
    body = {"messages": QUESTION, "temperature": 0, "max_tokens": 20}
    response = requests.post(f"{default_server.url}/chat/completions", json=body, timeout=120)
    assert "Paris" in response.json()["choices"][0]["message"]["content"]
    response = requests.post(
        f"{default_server.url}/completions",
        json={"prompt": "The capital of France is", "max_tokens": 3},
        timeout=60,
    )
    assert response.json()["object"] == "text_completion"


def test_streamed_equals_non_streamed_for_a_seed(client: openai.OpenAI, model: str) -> None:
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]
    kwargs = {"model": model, "messages": messages, "temperature": 0.9, "seed": 1234, "max_tokens": 40}
    whole = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert whole.choices[0].message.content == again.choices[0].message.content
    stream = client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_samples(client: openai.OpenAI, model: str) -> None:
    response = client.chat.completions.create(
        model=model, messages=QUESTION, n=2, temperature=1.0, seed=5, max_tokens=12
    )
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.message.content for c in response.choices)
    stream = client.chat.completions.create(model=model, messages=QUESTION, n=2, max_tokens=5, stream=True)
    indexes = {c.choices[0].index for c in stream if c.choices}
    assert indexes == {0, 1}


def test_chat_logprobs(client: openai.OpenAI, model: str) -> None:
    response = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=10, logprobs=True, top_logprobs=3
    )
    content = response.choices[0].logprobs.content
    assert len(content) >= 1
    assert "".join(entry.token for entry in content) == response.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the most likely
        assert entry.logprob <= 0 and bytes(entry.bytes).decode(errors="replace")


def test_stop_is_excluded_from_the_answer(client: openai.OpenAI, model: str) -> None:
    response = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=20, stop=[" Paris"]
    )
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and "Paris" not in choice.message.content
    assert choice.message.content.startswith("The capital of France is")


def test_completions(client: openai.OpenAI, model: str, default_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    prompt = "The capital of France is"
    response = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=5, logprobs=2)
    choice = response.choices[0]
    assert choice.finish_reason == "length" and response.usage.completion_tokens == 5
    assert response.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert len(choice.logprobs.tokens) == 5 and all(len(t) <= 2 for t in choice.logprobs.top_logprobs)
    echoed = client.completions.create(
        model=model, prompt=prompt, temperature=0, max_tokens=5, echo=True, logprobs=0
    )
    assert echoed.choices[0].text == prompt + choice.text
    assert echoed.choices[0].logprobs.token_logprobs[0] is None

    ids = tokenizer.encode(prompt)
    several = client.completions.create(model=model, prompt=[prompt, ids], temperature=0, max_tokens=5)
    assert [c.text for c in several.choices] == [choice.text, choice.text]
    stream = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=5, stream=True)
    assert "".join(c.choices[0].text for c in stream) == choice.text
    best = client.completions.create(model=model, prompt=prompt, max_tokens=5, n=1, best_of=2, seed=3)
    assert len(best.choices) == 1 and best.usage.completion_tokens == 10


def test_vllm_extras(client: openai.OpenAI, model: str) -> None:
    response = client.completions.create(
        model=model,
        prompt="Once upon a time",
        max_tokens=8,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "min_tokens": 8, "ignore_eos": True,
                    "skip_special_tokens": True, "stop_token_ids": [2]},
        seed=9,
    )  # fmt: skip
    assert response.usage.completion_tokens == 8
    biased = client.completions.create(
        model=model, prompt="The capital of France is", temperature=0, max_tokens=1, logit_bias={"42": 100}
    )
    assert biased.choices[0].logprobs is None and biased.usage.completion_tokens == 1


def test_errors_arrive_as_typed_exceptions(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model, messages=QUESTION, temperature=3)
    assert error.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi " * 1500}])
    assert error.value.body["code"] == "context_length_exceeded" and "1024" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4000)
    assert error.value.body["code"] == "context_length_exceeded" and "2048" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError, match="response_format"):  # json_schema without its spec
        client.chat.completions.create(
            model=model, messages=QUESTION, response_format={"type": "json_schema"}
        )
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.completions.create(model=model, prompt="x", extra_body={"tools": []})
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(
            model=model,
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
            ],
        )
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=model, prompt="def f(", suffix="return 1")
    with pytest.raises(openai.BadRequestError, match="frobnicate"):
        client.completions.create(model=model, prompt="x", extra_body={"frobnicate": True})


def test_tokenize_and_version(default_server: Launched) -> None:
    body = requests.post(f"{default_server.url}/tokenize", json={"messages": QUESTION}, timeout=30).json()
    assert body["prompt"].endswith("<|im_start|>assistant\n") and body["count"] == len(body["tokens"])
    body = requests.post(f"{default_server.url}/tokenize", json={"prompt": "Hello world"}, timeout=30).json()
    assert body["count"] == 2
    assert requests.get(f"{default_server.url}/version", timeout=30).json()["version"]


LLAMA2 = {
    "TGICHAT_USER_PRE": " [INST] ",
    "TGICHAT_USER_POST": " [/INST] ",
    "TGICHAT_SYS_PRE": " [INST] <<SYS>> ",
    "TGICHAT_SYS_POST": " <</SYS>> [/INST] ",
}


def test_tgichat_wrapping_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = Launched(["--model-id", str(tiny_model_dir)], env=LLAMA2).start(tmp_path)
    try:
        server.wait_healthy(120)
        messages = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Capital of France?"},
        ]
        rendered = requests.post(f"{server.url}/tokenize", json={"messages": messages}, timeout=30).json()[
            "prompt"
        ]
        assert rendered == (
            " [INST] <<SYS>> You are terse. <</SYS>> [/INST]  [INST] Hi! [/INST] Hello. [INST] Capital of France? [/INST] "
        )
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        response = client.chat.completions.create(model=str(tiny_model_dir), messages=messages, max_tokens=5)
        assert (
            response.usage.prompt_tokens
            == requests.post(f"{server.url}/tokenize", json={"messages": messages}, timeout=30).json()[
                "count"
            ]
        )
        assert response.usage.completion_tokens >= 1
    finally:
        stop_and_check(server)


def test_template_override_and_missing_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare-model"
    shutil.copytree(tiny_model_dir, bare)
    config_path = bare / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)

    server = Launched(["--model-id", str(bare), "--served-model-name", "tiny"]).start(tmp_path)
    try:
        server.wait_healthy(120)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="--chat-template"):
            client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=3)
        assert (
            client.completions.create(model="tiny", prompt="Hello", max_tokens=2).usage.completion_tokens == 2
        )
    finally:
        stop_and_check(server)

    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    server = Launched(["--model-id", str(bare), "--chat-template", template]).start(tmp_path)
    try:
        server.wait_healthy(120)
        rendered = requests.post(f"{server.url}/tokenize", json={"messages": QUESTION}, timeout=30).json()[
            "prompt"
        ]
        assert rendered == "<user>What is the capital of France?<assistant>"
    finally:
        stop_and_check(server)


def test_queue_full_is_a_rate_limit_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    args = ["--model-id", str(tiny_model_dir), "--max-concurrent-requests", "1", "--fault-injection"]
    server = Launched(args).start(tmp_path)
    try:
        server.wait_healthy(120)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        # A TGI stream holds the only slot for about 2 s on any machine: each of its 8 steps sleeps 0.25 s
        # (the shard's test-only fault hook); the slots are shared by both APIs.
        body = {
            "inputs": "Hi",
            "parameters": {"max_new_tokens": 8, "ignore_eos_token": True, "fault": "sleep"},
        }
        with requests.post(f"{server.url}/generate_stream", json=body, stream=True, timeout=60) as holder:
            events = (line for line in holder.iter_lines() if line.startswith(b"data:"))
            next(events)
            with pytest.raises(openai.RateLimitError) as error:
                client.completions.create(model=str(tiny_model_dir), prompt="Hi", max_tokens=2)
            assert error.value.response.headers["Retry-After"] == "1"
            assert sum(1 for _ in events) == 7  # the holder goes on to its end
    finally:
        stop_and_check(server)


def test_every_sequence_takes_a_slot_and_max_best_of_caps_n(tiny_model_dir: Path, tmp_path: Path) -> None:
    """n and best_of count each sequence against --max-concurrent-requests (429 when the free slots cannot
    hold them), and --max-best-of caps OpenAI's n and best_of as it caps TGI's best_of."""
    args = ["--model-id", str(tiny_model_dir), "--max-concurrent-requests", "3", "--max-best-of", "3",
            "--fault-injection"]  # fmt: skip
    server = Launched(args).start(tmp_path)
    try:
        server.wait_healthy(120)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        model = str(tiny_model_dir)
        sample = {"temperature": 1.0, "max_tokens": 2}
        # Past --max-best-of: a 400 naming the field and the limit, on both APIs.
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model=model, messages=QUESTION, n=4, **sample)
        assert error.value.body["param"] == "n" and "<= 3" in error.value.body["message"]
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(model=model, prompt="Hi", best_of=4, **sample)
        assert error.value.body["param"] == "best_of" and "<= 3" in error.value.body["message"]
        tgi = {"inputs": "Hi", "parameters": {"best_of": 4, "do_sample": True, "max_new_tokens": 2}}
        response = requests.post(f"{server.url}/generate", json=tgi, timeout=60)
        assert response.status_code == 422 and "`best_of` must be > 0 and <= 3" in response.json()["error"]
        # All three slots free: three sequences fit.
        assert len(client.chat.completions.create(model=model, messages=QUESTION, n=3, **sample).choices) == 3
        # A TGI stream holds one slot for about 2 s (8 steps of 0.25 s: the shard's test-only fault hook).
        body = {
            "inputs": "Hi",
            "parameters": {"max_new_tokens": 8, "ignore_eos_token": True, "fault": "sleep"},
        }
        with requests.post(f"{server.url}/generate_stream", json=body, stream=True, timeout=60) as holder:
            events = (line for line in holder.iter_lines() if line.startswith(b"data:"))
            next(events)
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model=model, messages=QUESTION, n=3, **sample)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model=model, prompt="Hi", n=1, best_of=3, **sample)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model=model, prompt=["Hi", "Ho", "He"], **sample)
            tgi["parameters"]["best_of"] = 3
            response = requests.post(f"{server.url}/generate", json=tgi, timeout=60)
            assert response.status_code == 429 and "3 sequences" in response.json()["error"]
            assert sum(1 for _ in events) == 7  # the holder goes on to its end
        assert len(client.completions.create(model=model, prompt="Hi", n=1, best_of=3, **sample).choices) == 1
    finally:
        stop_and_check(server)
