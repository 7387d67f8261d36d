"""The LoRA benchmark's parts (benchmark/lora.sh): `serve --models` spreads the requests over several
models (TGI's adapter_id, OpenAI's model), `random-lora` writes an adapter that PEFT and the server both
load and agree on, and `lora-compare` pairs the rounds and judges the issue's 80% target."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from benchmark.args import name_list
from benchmark.config import ServeConfig
from benchmark.lora import MODULES, Run, compare, write_adapter
from benchmark.workload import make_requests

from .test_benchmark import FakeOpenAI, FakeServer, FakeTgi, run_cli

pytestmark = pytest.mark.timeout(120)

S = TypeVar("S", bound=FakeServer)


def serving(server: S) -> Iterator[S]:
    server.start()
    yield server
    server.stop()


@pytest.fixture
def tgi() -> Iterator[FakeTgi]:
    yield from serving(FakeTgi())


@pytest.fixture
def openai_server() -> Iterator[FakeOpenAI]:
    yield from serving(FakeOpenAI())


def test_models_are_spread_round_robin_over_the_requests() -> None:
    config = ServeConfig(models=("a", "b", "c"), input_tokens=8, seed=3)
    specs = make_requests(config, 7)
    assert [s.model for s in specs] == ["a", "b", "c", "a", "b", "c", "a"]
    # The prompts and lengths are those of a run without --models (the base model's run is comparable).
    plain = make_requests(ServeConfig(input_tokens=8, seed=3), 7)
    assert [(s.prompt, s.max_new_tokens) for s in specs] == [(s.prompt, s.max_new_tokens) for s in plain]
    assert all(s.model is None for s in plain)
    with pytest.raises(ValueError, match="give model or models, not both"):
        ServeConfig(model="x", models=("a",))
    with pytest.raises(ValueError, match="every name must be non-empty"):
        ServeConfig(models=("a", ""))
    assert name_list(" a0, a1 ") == ("a0", "a1")


def test_serve_models_name_tgi_adapters(tgi, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run.json"
    plain = ["--url", tgi.url, "--concurrency", "2", "--requests-per-level", "6", "--max-new-tokens", "3",
             "--no-progress"]  # fmt: skip
    assert run_cli([*plain, "--models", "a0,a1,a2", "--warmup", "3", "--output", str(out)]) == 0
    assert "spread over 3 models: a0, a1, a2" in capsys.readouterr().out
    warmup, measured = tgi.bodies[:3], tgi.bodies[3:]
    assert [b["parameters"]["adapter_id"] for b in warmup] == ["a0", "a1", "a2"]
    assert Counter(b["parameters"]["adapter_id"] for b in measured) == {"a0": 2, "a1": 2, "a2": 2}
    records = json.loads(out.read_text())["levels"][0]["records"]
    assert [r["model"] for r in records] == ["a0", "a1", "a2", "a0", "a1", "a2"]
    assert json.loads(out.read_text())["config"]["models"] == ["a0", "a1", "a2"]
    # Without --models no request names an adapter.
    tgi.bodies.clear()
    assert run_cli([*plain, "--warmup", "0"]) == 0
    assert all("adapter_id" not in b["parameters"] for b in tgi.bodies)


@pytest.mark.parametrize("api", ["openai-completions", "openai-chat"])
def test_serve_models_name_openai_models(openai_server, api: str) -> None:
    plain = ["--url", openai_server.url, "--api", api, "--concurrency", "2", "--requests-per-level", "4",
             "--max-new-tokens", "3", "--warmup", "0", "--no-progress"]  # fmt: skip
    assert run_cli([*plain, "--models", "x,y"]) == 0
    assert Counter(b["model"] for b in openai_server.bodies) == {"x": 2, "y": 2}
    openai_server.bodies.clear()
    assert run_cli(plain) == 0
    assert {b["model"] for b in openai_server.bodies} == {"fake-model"}  # the first of /v1/models
    assert run_cli([*plain, "--models", "x,y", "--model", "x"]) == 2  # one or the other
    assert run_cli([*plain, "--models", "x,,y"]) == 2


def test_random_lora_loads_in_peft_and_the_server_agrees(tiny_model_dir: Path, tmp_path: Path) -> None:
    """random-lora's adapter is PEFT's format: PEFT loads it, it changes the model's greedy tokens, and the
    paged backend serving it gives PEFT's tokens (float32)."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from shard.backends.paged import PagedBackend
    from shard.engines import make_engine
    from shard.types import RequestSpec
    from tests.engine_run import run_engine

    adapter = write_adapter(tiny_model_dir, tmp_path / "a", 8, 64.0, list(MODULES), seed=1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 64.0 and config["target_modules"] == list(MODULES)
    prompt = list(range(20, 40))
    base = LlamaForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)

    def greedy(model: torch.nn.Module) -> list[int]:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                                 do_sample=False, pad_token_id=0)  # fmt: skip
        return out[0, len(prompt) :].tolist()

    plain = greedy(base)
    peft = greedy(PeftModel.from_pretrained(base, adapter).eval())
    assert peft != plain
    paged = PagedBackend(tiny_model_dir, torch.device("cpu"), "float32", kv_cache_bytes=4 * 2**20,
                         lora_adapters=(f"a={adapter}",))  # fmt: skip
    engine = make_engine(paged, speculate=0)
    out = run_engine(
        engine, {0: [RequestSpec(1, prompt, max_new_tokens=12, ignore_eos=True, adapter_id="a")]}
    )
    assert out[1] == peft
    with pytest.raises(ValueError, match="targets must be among"):
        write_adapter(tiny_model_dir, tmp_path / "b", 8, 16, ["lm_head"])


def run(path: str, tokens_per_s: float, models: tuple[str, ...] = (), errors: int = 0) -> Run:
    return Run(Path(path), tokens_per_s, 128, errors, models)


def test_lora_compare_pairs_the_rounds_and_judges_the_target(tmp_path: Path) -> None:
    four = ("a0", "a1", "a2", "a3")
    table, ratio = compare(
        [run("b1", 300.0), run("b2", 280.0)], [run("a1", 250.0, four), run("a2", 230.0, four)]
    )
    assert ratio == pytest.approx(240 / 290)
    assert "0.83" in table and "met" in table and "NOT met" not in table
    assert "adapters: a0, a1, a2, a3; 512 requests, 0 failed" in table
    _, low = compare([run("b", 300.0)], [run("a", 200.0, four)])
    assert low < 0.8
    assert "NOT met" in compare([run("b", 300.0)], [run("a", 200.0, four)])[0]
    with pytest.raises(ValueError, match="in pairs"):
        compare([run("b", 300.0)], [])
    with pytest.raises(ValueError, match="the base runs must name no model list"):
        compare([run("b", 300.0, four)], [run("a", 200.0, four)])
    # Read from serve's own results file.
    path = tmp_path / "r.json"
    result = {"command": "serve", "config": {"models": list(four)},
              "levels": [{"metrics": {"output_tokens_per_s": 12.5, "num_requests": 4, "num_errors": 1}}]}  # fmt: skip
    path.write_text(json.dumps(result))
    assert Run.read(path) == Run(path, 12.5, 4, 1, four)
    path.write_text(json.dumps({**result, "levels": []}))
    with pytest.raises(ValueError, match="not the results of a one-level `serve` run"):
        Run.read(path)
