"""Mixture-of-experts layers on the paged backend (shard/paged/moe.py), on tiny random Mixtral, Qwen2-MoE (a
shared expert) and Qwen3-MoE models (test_architectures.py checks their greedy ids against transformers'
``generate``): the layer against transformers' own sparse MoE block, routing included; experts run
grouped; int8/int4 experts; tensor parallelism over two gloo processes."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from common.sharding import sharding_problem
from shard.backends.paged import PagedBackend
from shard.paged.arch import model_spec
from shard.paged.model import UnsupportedModelError
from shard.paged.moe import MoE
from shard.paged.quant import QuantColumnLinear, QuantRowLinear
from tests.e2e.harness import free_port
from tests.processes import run_ranks
from tests.unit.shard.paged.test_architectures import (
    CPU,
    build,
    mixtral_config,
    prompt_logits,
    prompts,
    qwen2_moe_config,
    qwen3_moe_config,
    run_paged,
)

pytestmark = pytest.mark.timeout(300)

MOE_CONFIGS: dict[str, Callable[[int], Any]] = {
    "mixtral": mixtral_config,
    "qwen3_moe": qwen3_moe_config,
    "qwen3_moe-norm_topk": functools.partial(qwen3_moe_config, norm_topk_prob=True),
    "qwen2_moe": qwen2_moe_config,
    "qwen2_moe-norm_topk": functools.partial(qwen2_moe_config, norm_topk_prob=True),
}


def backend(path: Path, **kwargs: Any) -> PagedBackend:
    return PagedBackend(path, CPU, kv_cache_bytes=2**20, block_size=4, **kwargs)


def first_moe(b: PagedBackend) -> MoE:
    mlp = b.model.decoder_layers[0].mlp
    assert isinstance(mlp, MoE)
    return mlp


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_the_layer_equals_transformers_sparse_block(tiny_model_dir: Path, tmp_path: Path, name: str) -> None:
    """Routing (softmax, top 2, renormalized or not) and the weighted sum of the experts, against the
    model's own block in transformers on the same rows."""
    from transformers import AutoModelForCausalLM

    path = build(tmp_path / name, tiny_model_dir, MOE_CONFIGS[name])
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).model.layers[0].mlp
    ours = first_moe(backend(path, cpu_kernels=False))
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(1))
    _, their_weights, their_experts = theirs.gate(x)
    weights, experts = ours.route(x)
    assert torch.equal(experts, their_experts)
    torch.testing.assert_close(weights, their_weights)
    want = theirs(x.unsqueeze(0))[0]
    torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)
    sums = weights.sum(-1)
    normalized = name == "mixtral" or name.endswith("norm_topk")
    assert torch.allclose(sums, torch.ones_like(sums)) == normalized


def test_experts_run_grouped(tiny_model_dir: Path, tmp_path: Path) -> None:
    """One product per expert that has tokens, over all of its tokens; experts without tokens do not run."""
    path = build(tmp_path / "m", tiny_model_dir, mixtral_config)
    moe = first_moe(backend(path))
    calls: list[tuple[int, int]] = []
    for e, expert in enumerate(moe.expert_mlps):
        expert.register_forward_hook(lambda _m, args, _out, e=e: calls.append((e, args[0].shape[0])))
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(2))
    _, chosen = moe.route(x)
    counts = torch.bincount(chosen.flatten(), minlength=4).tolist()
    moe(x)
    assert calls == [(e, n) for e, n in enumerate(counts) if n]
    assert sum(n for _, n in calls) == 20 * 2
    calls.clear()
    moe(x[:1])  # one token: its two experts only
    assert [e for e, _ in calls] == sorted(moe.route(x[:1])[1][0].tolist())


def perplexity(logits: torch.Tensor, text: list[int]) -> float:
    """The text's perplexity under the model (each token predicted from the ones before it)."""
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(text[1:]))
    return float(nll.exp())


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "qwen2_moe"])
def test_int8_and_int4_experts_follow_float32(tiny_model_dir: Path, tmp_path: Path, name: str) -> None:
    """Every expert's products quantized and served (greedy, chunked prompt); against float32 (Gaussian
    weights, 64 wide; measured int8 / int4 on these models: the layer 1.5% / 14%, the logits 1-2% /
    7-15%, the perplexity 0.2-0.6% / 1-3%):
    - one MoE layer on the same rows (the same routing: the router is not quantized): the products'
      own error, as the dense layers' (test_architectures.py);
    - the whole model's logits over a text (a prompt and float32's greedy continuation of it), where a
      token's top-2 choice may also flip, and the perplexity of that text."""
    path = build(tmp_path / name, tiny_model_dir, MOE_CONFIGS[name], sharp=False)
    float32 = backend(path)
    prompt = prompts()[1]
    text = prompt + run_paged(float32, [prompt])[0]
    want = prompt_logits(float32, text)
    rows = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    want_layer = first_moe(float32)(rows)
    for mode, layer_bound, bound, ppl_bound in (("int8", 0.02, 0.05, 0.02), ("int4", 0.2, 0.3, 0.15)):
        quant = backend(path, quantize=mode)
        moe = first_moe(quant)
        for expert in moe.expert_mlps + ([] if moe.shared is None else [moe.shared]):
            assert isinstance(expert.gate_up, QuantColumnLinear) and isinstance(expert.down, QuantRowLinear)
        assert ((moe(rows) - want_layer).norm() / want_layer.norm()).item() < layer_bound, mode
        got = prompt_logits(quant, text)
        assert ((got - want).norm() / want.norm()).item() < bound, mode
        assert abs(perplexity(got, text) / perplexity(want, text) - 1) < ppl_bound, mode
        assert len(run_paged(quant, [prompt])[0]) == 40


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_bfloat16_errs_as_transformers_does(tiny_model_dir: Path, tmp_path: Path, name: str) -> None:
    """bfloat16 on the paged backend against transformers' float32 logits over a prompt: within twice the
    error transformers' own bfloat16 makes (measured: the same, about 0.6-1%), and the same greedy picks.
    Rounding differs between the two (fused products, grouped experts), so equality is not asked; the
    model is unsharpened (sharp attention and large experts turn rounding into top-2 flips, in either)."""
    from transformers import AutoModelForCausalLM

    path = build(tmp_path / name, tiny_model_dir, MOE_CONFIGS[name], sharp=False)
    text = prompts()[1]
    ids = torch.tensor([text])

    def theirs(dtype: torch.dtype) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
        return model(ids).logits[0].float()

    want, their_bf16 = theirs(torch.float32), theirs(torch.bfloat16)
    ours = prompt_logits(PagedBackend(path, CPU, "bfloat16", kv_cache_bytes=2**20, block_size=4), text)

    def error(logits: torch.Tensor) -> float:
        return ((logits - want).norm() / want.norm()).item()

    assert error(ours) < 2 * error(their_bf16)
    assert torch.equal(ours.argmax(-1), want.argmax(-1))


def _rank(rank: int, port: int, path: Path, queue: Any) -> None:
    """One tensor-parallel rank on gloo: its tokens for the test's prompts."""
    from shard.dist import DistInfo, init_parallel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        parallel = init_parallel(DistInfo(rank, 2, rank), CPU)
        queue.put((rank, run_paged(backend(path, parallel=parallel), prompts())))
    except BaseException as e:  # reported, not lost in the child's stderr
        queue.put((rank, repr(e)))


def test_two_gloo_ranks_equal_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Qwen3-MoE (sparse and dense layers) split over two processes on gloo: each expert's inner dimension
    halved, one all-reduce per MoE layer; greedy tokens equal one rank's, chunked prompts and prefix hits
    included."""
    path = build(tmp_path / "tp", tiny_model_dir, qwen3_moe_config)
    one = run_paged(backend(path), prompts())
    results = run_ranks(_rank, 2, (free_port(), path), reporting=2, timeout=240)
    assert results == {0: one, 1: one}


def test_unsupported_moe_configs_are_named() -> None:
    from transformers import MixtralConfig

    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        model_spec(MixtralConfig(sliding_window=64, max_position_embeddings=4096))
    with pytest.raises(UnsupportedModelError, match="activation"):
        model_spec(MixtralConfig(hidden_act="gelu"))
    config = {
        "model_type": "qwen3_moe",
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 128,
        "moe_intermediate_size": 66,
    }
    assert sharding_problem(config, 2) is None
    problem = sharding_problem(config, 4)
    assert problem is not None and "moe_intermediate_size" in problem
