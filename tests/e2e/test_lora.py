"""LoRA adapters through the real launcher (issue 21): two random PEFT adapters given in TGI's
LORA_ADAPTERS; /v1/models lists them; TGI's adapter_id and OpenAI's model pick one, and each request's
greedy tokens equal PEFT's own model with that adapter, also when the adapters and the base model run
side by side; unknown adapters are a 422 (TGI) / 404 (OpenAI) naming them; a bad adapter stops the start
with its name."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.unit.shard.paged.test_lora import save_adapter

from .conftest import stop_and_check
from .harness import Launched, run_launcher

pytestmark = pytest.mark.timeout(300)

PROMPT = "The capital of France is Paris. The capital of Germany is"
NEW = 12


def peft_tokens(base: Path, adapter: Path | None, prompt: list[int]) -> list[int]:
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def generate(server: Launched, adapter: str | None) -> dict:
    parameters: dict[str, object] = {"max_new_tokens": NEW, "ignore_eos_token": True, "details": True,
                                     "decoder_input_details": True}  # fmt: skip
    if adapter is not None:
        parameters["adapter_id"] = adapter
    response = requests.post(
        f"{server.url}/generate", json={"inputs": PROMPT, "parameters": parameters}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_two_adapters_through_the_launcher(tiny_model_dir: Path, tmp_path: Path) -> None:
    adapters = {
        "sql": save_adapter(
            tiny_model_dir, tmp_path / "sql", 4, 8, ["q_proj", "v_proj", "down_proj"], False, seed=3
        ),
        "fr": save_adapter(
            tiny_model_dir, tmp_path / "fr", 8, 16, ["k_proj", "o_proj", "gate_proj"], False, seed=4
        ),
    }
    env = {"LORA_ADAPTERS": ",".join(f"{name}={path}" for name, path in adapters.items())}
    server = Launched(["--model-id", str(tiny_model_dir)], env=env).start(tmp_path)
    try:
        server.wait_healthy(120)
        models = requests.get(f"{server.url}/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models][1:] == ["sql", "fr"]
        assert all(m["parent"] == models[0]["id"] for m in models[1:])
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        assert 'max_lora="2"' in metrics and "vllm:lora_requests_info{" in metrics

        base = generate(server, None)
        prompt = [t["id"] for t in base["details"]["prefill"]]
        expected = {
            name: peft_tokens(tiny_model_dir, adapters.get(name), prompt) for name in ["", "sql", "fr"]
        }
        assert expected["sql"] != expected[""] and expected["fr"] != expected[""]
        # Side by side: each adapter and the base model, three times each, at once.
        names = [None, "sql", "fr"] * 3
        with ThreadPoolExecutor(len(names)) as pool:
            results = list(pool.map(lambda name: generate(server, name), names))
        for name, result in zip(names, results, strict=True):
            assert [t["id"] for t in result["details"]["tokens"]] == expected[name or ""], name

        # OpenAI's model picks the adapter: the same greedy text as TGI's adapter_id.
        for name in ("sql", "fr"):
            completion = requests.post(
                f"{server.url}/v1/completions",
                json={
                    "model": name,
                    "prompt": PROMPT,
                    "max_tokens": NEW,
                    "ignore_eos": True,
                    "temperature": 0,
                },
                timeout=60,
            )
            assert completion.status_code == 200, completion.text
            assert completion.json()["model"] == name
            assert completion.json()["choices"][0]["text"] == generate(server, name)["generated_text"]

        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        # 3 concurrent + 2 OpenAI/TGI pairs: 5 sequences each; the base model's are no adapter's.
        assert 'tgi_lora_requests_total{adapter="sql"} 5.0' in metrics, metrics
        assert 'tgi_lora_requests_total{adapter="fr"} 5.0' in metrics
        unknown = requests.post(
            f"{server.url}/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "sqll"}}, timeout=10
        )
        assert (
            unknown.status_code == 422 and "`adapter_id` 'sqll' is not a loaded LoRA adapter" in unknown.text
        )
        unknown = requests.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "sqll", "messages": [{"role": "user", "content": "Hi"}]},
            timeout=10,
        )
        assert unknown.status_code == 404 and "`sqll` does not exist" in unknown.text, unknown.text
        assert unknown.json()["error"]["param"] == "model"
    finally:
        stop_and_check(server)


def test_a_bad_adapter_stops_the_start_with_its_name(tiny_model_dir: Path, tmp_path: Path) -> None:
    good = save_adapter(tiny_model_dir, tmp_path / "good", 4, 8, ["q_proj"], False, seed=5)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    config = json.loads((good / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    done = run_launcher("--model-id", str(tiny_model_dir), "--lora-adapters", f"ok={good},dora={bad}",
                        "--shard-uds-path", str(tmp_path / "sock"), "--port", "0")  # fmt: skip
    assert done.returncode == 1
    assert "adapter 'dora': `use_dora` = True is not supported" in done.stdout + done.stderr
    missing = run_launcher("--model-id", str(tiny_model_dir), "--lora-adapters", "x=/no/such/adapter")
    assert missing.returncode != 0
    assert "adapter 'x': '/no/such/adapter' is not a local directory" in missing.stdout + missing.stderr
