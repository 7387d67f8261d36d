"""``text-generation-benchmark upcycle-moe``: a Mixtral whose experts are copies of a dense Llama's MLPs
computes the dense model's function (so its perplexity is the dense model's), through real routing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmark.cli import main
from shard.backends.paged import PagedBackend
from shard.paged.moe import MoE
from tests.unit.shard.paged.test_architectures import CPU, prompt_logits

pytestmark = pytest.mark.timeout(120)


def test_the_upcycled_moe_computes_the_dense_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "moe"
    argv = ["upcycle-moe", "--model-id", str(tiny_model_dir), "--experts", "3", "--top-k", "2"]
    assert main([*argv, "--output", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral"
    assert (config["num_local_experts"], config["num_experts_per_tok"]) == (3, 2)
    assert (out / "tokenizer.json").is_file()
    dense = PagedBackend(tiny_model_dir, CPU, kv_cache_bytes=2**20, block_size=4)
    moe = PagedBackend(out, CPU, kv_cache_bytes=2**20, block_size=4)
    layers = moe.model.decoder_layers
    assert all(isinstance(layer.mlp, MoE) for layer in layers)
    prompt = [3 + (i * 7) % 250 for i in range(40)]
    want = prompt_logits(dense, prompt)
    got = prompt_logits(moe, prompt)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # The routing is real: the prompt's tokens spread over every expert of the first layer.
    mlp = layers[0].mlp
    assert isinstance(mlp, MoE)
    x = torch.randn(40, config["hidden_size"], generator=torch.Generator().manual_seed(0))
    assert set(mlp.route(x)[1].flatten().tolist()) == {0, 1, 2}


def test_only_a_llama_without_biases_is_upcycled(tmp_path: Path) -> None:
    from benchmark.upcycle import moe_config

    with pytest.raises(ValueError, match="Llama"):
        moe_config({"model_type": "gemma2"}, 4, 2)
    with pytest.raises(ValueError, match="biases"):
        moe_config({"model_type": "llama", "mlp_bias": True}, 4, 2)
    with pytest.raises(ValueError, match="top 3 of 2"):
        moe_config({"model_type": "llama"}, 2, 3)
