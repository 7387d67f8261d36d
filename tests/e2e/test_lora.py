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
        off = requests.post(
            f"{server.url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/"}, timeout=10
        )
        assert off.status_code == 404 and "--enable-lora-runtime-updates" in off.text
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


def test_runtime_load_use_and_unload(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--enable-lora-runtime-updates: vLLM's load and unload routes, behind the API key; a loaded adapter
    serves PEFT's tokens at once, an unloaded one is refused by name; bad loads are 400s that change
    nothing."""
    sql = save_adapter(tiny_model_dir, tmp_path / "sql", 4, 8, ["q_proj", "up_proj"], False, seed=6)
    server = Launched(
        ["--model-id", str(tiny_model_dir), "--enable-lora-runtime-updates"], env={"API_KEY": "secret"}
    ).start(tmp_path)
    auth = {"Authorization": "Bearer secret"}

    def post(path: str, body: dict, headers: dict | None = auth) -> requests.Response:
        return requests.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)

    def tokens(adapter: str) -> requests.Response:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": NEW, "ignore_eos_token": True, "details": True,
                                                  "decoder_input_details": True, "adapter_id": adapter}}  # fmt: skip
        return post("/generate", body)

    try:
        server.wait_healthy(120)
        assert (
            post("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(sql)}, None).status_code
            == 401
        )
        assert tokens("sql").status_code == 422  # not loaded yet
        loaded = post("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(sql)})
        assert loaded.status_code == 200 and loaded.text == "Success: LoRA adapter 'sql' added successfully."
        models = requests.get(f"{server.url}/v1/models", headers=auth, timeout=10).json()["data"]
        assert [m["id"] for m in models][1:] == ["sql"]
        result = tokens("sql").json()
        prompt = [t["id"] for t in result["details"]["prefill"]]
        assert [t["id"] for t in result["details"]["tokens"]] == peft_tokens(tiny_model_dir, sql, prompt)

        again = post("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(sql)})
        assert again.status_code == 400 and "adapter 'sql' is loaded already" in again.text
        bad = post("/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": str(tiny_model_dir)})
        assert bad.status_code == 400 and "adapter_config.json not found" in bad.text, bad.text
        missing = post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/no/such"})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "lora_path"
        assert post("/v1/load_lora_adapter", {"lora_path": str(sql)}).json()["error"]["param"] == "lora_name"

        unloaded = post("/v1/unload_lora_adapter", {"lora_name": "sql"})
        assert (
            unloaded.status_code == 200
            and unloaded.text == "Success: LoRA adapter 'sql' removed successfully."
        )
        assert tokens("sql").status_code == 422
        gone = post("/v1/chat/completions", {"model": "sql", "messages": [{"role": "user", "content": "Hi"}]})
        assert gone.status_code == 404 and "`sql` does not exist" in gone.text
        unknown = post("/v1/unload_lora_adapter", {"lora_name": "sql"})
        assert unknown.status_code == 404 and "adapter 'sql' is not loaded" in unknown.text
    finally:
        stop_and_check(server)


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_eight_adapters_with_max_loras_two_under_concurrent_load(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The issue's soak, scaled to a test: 8 adapters, --max-loras 2, 48 concurrent requests spread over
    them and the base model; every request completes with the tokens it gets alone, loads and evictions
    are counted, and the shard's memory after a second round is what it was after the first."""
    names = [f"a{i}" for i in range(8)]
    dirs = {
        name: save_adapter(tiny_model_dir, tmp_path / name, 2 + i % 3, 8, ["q_proj", "v_proj", "up_proj"], False,
                           seed=20 + i)
        for i, name in enumerate(names)
    }  # fmt: skip
    adapters = ",".join(f"{name}={path}" for name, path in dirs.items())
    server = Launched(
        ["--model-id", str(tiny_model_dir), "--lora-adapters", adapters, "--max-loras", "2"]
    ).start(tmp_path)
    try:
        server.wait_healthy(120)
        alone = {name: generate(server, name)["generated_text"] for name in [*names, None]}
        load = [*names, None] * 5 + names[:3]
        for round_ in range(2):
            with ThreadPoolExecutor(16) as pool:
                results = list(pool.map(lambda name: generate(server, name), load))
            for name, result in zip(load, results, strict=True):
                assert result["generated_text"] == alone[name], (round_, name)
            shard = next(p for p in server.children() if p.cmdline()[1:3] == ["-m", "shard"])
            rss = shard.memory_info().rss
            if round_ == 0:
                first = rss
        assert rss < first * 1.1, (first, rss)  # flat: evicted adapters leave nothing behind
        text = requests.get(f"{server.url}/metrics", timeout=10).text
        loads, evictions = metric(text, "tgi_lora_loads"), metric(text, "tgi_lora_evictions")
        assert loads >= 8 and evictions == loads - 2, (loads, evictions)
        assert 'max_lora="2"' in text
    finally:
        stop_and_check(server)
