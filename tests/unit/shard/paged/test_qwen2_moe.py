"""Qwen2-MoE's own parts on the paged backend (shard/paged/arch/qwen2_moe.py): which layers are sparse, the
shared expert and its gate as loaded, and what is refused by name. Its greedy ids against transformers
are in test_architectures.py (CONFIGS), its layer, int8/int4 and bfloat16 in test_moe.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.sharding import sharding_problem
from shard.backends.paged import PagedBackend
from shard.paged.arch import model_spec
from shard.paged.model import UnsupportedModelError
from shard.paged.moe import MoE
from tests.unit.shard.paged.test_architectures import CPU, build, qwen2_moe_config


def test_sparse_layers_follow_decoder_sparse_step_and_mlp_only_layers() -> None:
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    sparse = [layer.moe is not None for layer in model_spec(config).layers]
    assert sparse == [False, True, False, False, False, True]
    assert not any(layer.moe for layer in model_spec(Qwen2MoeConfig(num_experts=0)).layers)


def test_the_shared_expert_and_its_gate_are_loaded(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Layer 0's shared expert is transformers' (gate, up, down) and its gate's weight, run as
    transformers runs them: sigmoid(gate(x)) * shared(x)."""
    from transformers import AutoModelForCausalLM

    path = build(tmp_path / "m", tiny_model_dir, qwen2_moe_config)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).model.layers[0].mlp
    layers = PagedBackend(
        path, CPU, kv_cache_bytes=2**20, block_size=4, cpu_kernels=False
    ).model.decoder_layers
    ours = layers[0].mlp
    assert isinstance(ours, MoE) and ours.shared is not None and ours.shared_gate is not None
    assert not isinstance(layers[1].mlp, MoE)
    assert torch.equal(ours.shared_gate, theirs.shared_expert_gate.weight)
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(4))
    want = torch.sigmoid(theirs.shared_expert_gate(x)) * theirs.shared_expert(x)
    got = torch.sigmoid(torch.nn.functional.linear(x, ours.shared_gate)) * ours.shared(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.std(0).mean() > 0 and torch.sigmoid(theirs.shared_expert_gate(x)).std() > 0.05


def test_unsupported_qwen2_moe_configs_are_named() -> None:
    from transformers import Qwen2MoeConfig

    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        model_spec(Qwen2MoeConfig(use_sliding_window=True, sliding_window=64, max_position_embeddings=4096))
    with pytest.raises(UnsupportedModelError, match="activation"):
        model_spec(Qwen2MoeConfig(hidden_act="gelu"))
    config = {
        "model_type": "qwen2_moe",
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 128,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 66,
    }
    assert sharding_problem(config, 2) is None
    problem = sharding_problem(config, 4)
    assert problem is not None and "shared_expert_intermediate_size" in problem
