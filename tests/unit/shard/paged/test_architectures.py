"""The paged runner's architectures (shard/paged/arch/) against transformers: on tiny random models of each
(float32, with the features that matter non-trivial: biases, q/k norms, soft-capping, sliding windows
shorter than the prompt, per-layer rotary tables, several experts with top-2 routing), greedy ids equal
transformers' ``generate`` (eager attention) over 40+ tokens, through the chunked engine with prompts run
in chunks and prefix-cache hits."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from shard.backends import load_backend
from shard.backends.paged import PagedBackend
from shard.config import ShardConfig
from shard.dist import Parallel
from shard.engines import make_engine
from shard.paged.arch import model_spec
from shard.paged.model import UnsupportedModelError
from shard.types import RequestSpec
from tests.engine_run import run_engine

pytestmark = pytest.mark.timeout(300)

CPU = torch.device("cpu")
NEW_TOKENS = 40
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
NO_SPECIAL = dict(eos_token_id=None, bos_token_id=None, pad_token_id=0)  # greedy runs all 40 tokens


def llama_config(vocab: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        num_hidden_layers=2,
        max_position_embeddings=512,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
        **TINY,
        **NO_SPECIAL,
    )


def qwen3_config(vocab: int) -> Any:
    from transformers import Qwen3Config

    # head_dim 32, not hidden / heads (16)
    return Qwen3Config(
        vocab_size=vocab,
        num_hidden_layers=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **TINY,
        **NO_SPECIAL,
    )


def gemma2_config(vocab: int) -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=vocab,
        num_hidden_layers=4,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=8,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=10.0,
        tie_word_embeddings=False,
        **TINY,
        **NO_SPECIAL,
    )


def gemma3_config(vocab: int) -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=vocab,
        num_hidden_layers=4,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=8,
        query_pre_attn_scalar=32,
        rope_local_base_freq=100.0,
        layer_types=["sliding_attention", "full_attention"] * 2,
        final_logit_softcapping=10.0,
        tie_word_embeddings=True,
        **TINY,
        **NO_SPECIAL,
    )


def phi3_config(vocab: int) -> Any:
    from transformers import Phi3Config

    return Phi3Config(
        vocab_size=vocab,
        num_hidden_layers=2,
        max_position_embeddings=512,
        original_max_position_embeddings=512,
        tie_word_embeddings=False,
        **TINY,
        **NO_SPECIAL,
    )


def phi3_longrope_config(vocab: int, long_factor: float = 2.0, partial: float = 1.0) -> Any:
    from transformers import Phi3Config

    # LongRoPE switching at 24 positions (an attention factor from 512 / 24): the 9-token prompt runs short
    # until its 25th token, then whole again, long; the 45-token ones run long throughout. Short factors near
    # 1, long ones from 1 to 1 + 7 ``long_factor`` over the head's 8 frequencies (``partial``: the share of
    # each head's 16 dimensions the rotation covers).
    half = int(TINY["hidden_size"] // TINY["num_attention_heads"] * partial) // 2
    return Phi3Config(
        vocab_size=vocab,
        num_hidden_layers=2,
        max_position_embeddings=512,
        original_max_position_embeddings=24,
        partial_rotary_factor=partial,
        rope_scaling={
            "rope_type": "longrope",
            "short_factor": [1.0 + 0.1 * i for i in range(half)],
            "long_factor": [1.0 + long_factor * i for i in range(half)],
        },
        tie_word_embeddings=False,
        **TINY,
        **NO_SPECIAL,
    )


def phi4_mini_config(vocab: int) -> Any:
    """Phi-4-mini's shape: LongRoPE over a partial rotary embedding (half of each head)."""
    return phi3_longrope_config(vocab, partial=0.5)


def mixtral_config(vocab: int) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab,
        num_hidden_layers=2,
        max_position_embeddings=512,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
        **TINY,
        **NO_SPECIAL,
    )


def qwen3_moe_config(vocab: int, norm_topk_prob: bool = False) -> Any:
    from transformers import Qwen3MoeConfig

    # Layers 0 and 2 sparse (6 experts of width 64, top 2, probabilities not renormalized), layer 1 dense.
    return Qwen3MoeConfig(
        vocab_size=vocab,
        num_hidden_layers=3,
        head_dim=32,
        max_position_embeddings=512,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        norm_topk_prob=norm_topk_prob,
        mlp_only_layers=[1],
        tie_word_embeddings=False,
        **TINY,
        **NO_SPECIAL,
    )


def qwen2_moe_config(vocab: int, norm_topk_prob: bool = False) -> Any:
    from transformers import Qwen2MoeConfig

    # Layers 0 and 2 sparse (6 experts of width 64, top 2, probabilities not renormalized, and a shared
    # expert of width 96 behind its sigmoid gate), layer 1 dense (mlp_only_layers); q/k/v biases.
    return Qwen2MoeConfig(
        vocab_size=vocab,
        num_hidden_layers=3,
        max_position_embeddings=512,
        num_experts=6,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=96,
        norm_topk_prob=norm_topk_prob,
        mlp_only_layers=[1],
        tie_word_embeddings=False,
        **TINY,
        **NO_SPECIAL,
    )


CONFIGS: dict[str, Callable[[int], Any]] = {
    "llama-bias": llama_config,
    "qwen3": qwen3_config,
    "gemma2": gemma2_config,
    "gemma3_text": gemma3_config,
    "phi3": phi3_config,
    "phi3-longrope": phi3_longrope_config,
    "phi4-mini": phi4_mini_config,
    "mixtral": mixtral_config,
    "qwen2_moe": qwen2_moe_config,
    "qwen3_moe": qwen3_moe_config,
}


def build(
    path: Path, tokenizer_dir: Path, make_config: Callable[[int], Any], seed: int = 0, sharp: bool = True
) -> Path:
    """A tiny random model of ``make_config``'s architecture, with the tiny tokenizer: biases and norm
    weights drawn away from their zero/one initial values, queries and keys scaled up with ``sharp``
    (attention that depends on its scale, soft-capping and window), logits scaled up (greedy picks that are not
    near-ties); MoE routers and shared-expert gates drawn at unit scale (decisive top-k choices, not
    near-ties; gates that vary by token) and, with ``sharp``,
    experts scaled up (their outputs, and so the routing and its weights, move the tokens)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = make_config(len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)
            elif sharp and name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight")):
                p.mul_(4.0)  # sharp attention: the scale, soft-capping and windows change the tokens
            elif sharp and name.endswith(("q_norm.weight", "k_norm.weight")):
                p.add_(3.0)  # the same through q/k norms
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith((".gate.weight", "shared_expert_gate.weight")):  # an MoE router or gate
                p.normal_(0.0, 1.0)
            elif sharp and ".experts." in name:
                p.mul_(4.0)
            elif name.endswith("embed_tokens.weight") and config.tie_word_embeddings:
                p.mul_(10.0)
        if not config.tie_word_embeddings:
            model.lm_head.weight.mul_(20.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=list(CONFIGS))
def arch_dir(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Path:
    return build(tmp_path_factory.mktemp(request.param), tiny_model_dir, CONFIGS[request.param])


def reference(path: Path, prompts: list[list[int]], steps: int = NEW_TOKENS) -> list[list[int]]:
    """transformers' greedy ``generate`` (float32, eager attention) for each prompt alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        tokens = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False
        )
        out.append(tokens[0, len(prompt) :].tolist())
    return out


def prompts() -> list[list[int]]:
    """A short prompt; a 45-token one (longer than the sliding window, run in chunks); and one sharing the
    latter's first 40 tokens (10 blocks of 4 from the prefix cache)."""
    long_prompt = [3 + (i * 7) % 250 for i in range(45)]
    return [list(range(3, 12)), long_prompt, [*long_prompt[:40], 17, 23, 99]]


def run_paged(backend: PagedBackend, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt through the chunked engine (16 prompt tokens a step: longer prompts run in chunks),
    one after another so that later ones find the earlier ones' blocks cached."""
    engine = make_engine(backend, prefill_tokens=16)
    out = []
    for i, prompt in enumerate(prompts):
        tokens = run_engine(engine, {0: [RequestSpec(i, prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True)]})
        out.append(tokens[i])
    engine.clear()
    return out


@pytest.mark.parametrize("cpu_kernels", [True, False])
def test_greedy_ids_equal_transformers(arch_dir: Path, cpu_kernels: bool) -> None:
    asked = prompts()
    expected = reference(arch_dir, asked)
    backend = PagedBackend(arch_dir, CPU, kv_cache_bytes=4 * 2**20, block_size=4, cpu_kernels=cpu_kernels)
    hits = backend.cache.allocator.hits
    assert run_paged(backend, asked) == expected
    assert backend.cache.allocator.hits - hits >= 10  # the third prompt's shared prefix
    assert backend.cache.allocator.num_free == backend.cache.allocator.num_blocks


def test_llama_biases_are_loaded_on_every_projection(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The o_proj bias and the MLP biases are read (the greedy test shows they are applied right)."""
    path = build(tmp_path / "m", tiny_model_dir, llama_config)
    backend = PagedBackend(path, CPU, kv_cache_bytes=2**20, block_size=4)
    layer = backend.model.decoder_layers[0]
    assert layer.o.bias is not None and layer.mlp.down.bias is not None and layer.mlp.gate_up.bias is not None
    assert backend.model.spec.o_bias and backend.model.spec.mlp_bias


def prompt_logits(backend: PagedBackend, prompt: list[int]) -> torch.Tensor:
    out = backend.prefill([prompt], [True])
    backend.release(out.state)
    logits = out.prompt_logits[0]
    assert logits is not None
    return logits


@pytest.mark.parametrize("make_config", [qwen3_config, llama_config], ids=["qwen3", "llama-bias"])
def test_int8_and_int4_follow_float32(
    tiny_model_dir: Path, tmp_path: Path, make_config: Callable[[int], Any]
) -> None:
    """Quantized q/k-normed (Qwen3) and biased (o_proj, MLP) layers: the prompt's logits stay within the
    quantization's error of float32's (relative error of the logits; Gaussian weights, 64 wide)."""
    path = build(tmp_path / "q", tiny_model_dir, make_config, sharp=False)
    prompt = list(range(3, 30))
    want = prompt_logits(PagedBackend(path, CPU, kv_cache_bytes=2**20, block_size=4), prompt)
    for mode, bound in (("int8", 0.05), ("int4", 0.3)):
        quant = PagedBackend(path, CPU, kv_cache_bytes=2**20, block_size=4, quantize=mode)
        got = prompt_logits(quant, prompt)
        assert ((got - want).norm() / want.norm()).item() < bound, mode


def test_gemma_layers_take_their_own_window_and_rotary(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = build(tmp_path / "g", tiny_model_dir, gemma3_config)
    backend = PagedBackend(path, CPU, kv_cache_bytes=2**20, block_size=4)
    layers = backend.model.decoder_layers
    assert [layer.scores.window for layer in layers] == [8, None, 8, None]
    assert [layer.rope for layer in layers] == ["sliding_attention", "full_attention"] * 2
    assert not backend.model.fused  # windows: the torch attention path
    local, full = (backend.model.rotaries[k] for k in ("sliding_attention", "full_attention"))
    assert not torch.equal(local.cos32, full.cos32)


def test_unsupported_features_are_named() -> None:
    from transformers import Gemma2Config

    with pytest.raises(UnsupportedModelError, match="activation"):
        model_spec(Gemma2Config(hidden_activation="relu"))


def test_auto_falls_back_to_transformers_for_other_types(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)).save_pretrained(path)
    assert load_backend(ShardConfig(path), CPU).info.name == "transformers"
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_backend(ShardConfig(path, backend="paged"), CPU)


class ThreadGroup:
    """Tensor parallelism between threads of one process: each rank's all-reduce and all-gather wait for
    every rank's tensor, then return the sum or the concatenation."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size)
        self.slots: list[torch.Tensor | None] = [None] * world_size

    def _exchange(self, rank: int, t: torch.Tensor) -> list[torch.Tensor]:
        self.slots[rank] = t
        self.barrier.wait()
        tensors = [s for s in self.slots if s is not None]
        self.barrier.wait()
        return tensors

    def parallel(self, rank: int) -> Parallel:
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            return torch.stack(self._exchange(rank, t)).sum(0)

        def all_gather(t: torch.Tensor) -> torch.Tensor:
            return torch.cat(self._exchange(rank, t), dim=-1)

        def agree(value: int) -> int:
            """The smallest rank's value, as shard/dist.py's: step budgets and drafts come from each rank's
            own timings, and without it the ranks' steps could differ in shape."""
            return int(torch.stack(self._exchange(rank, torch.tensor([value]))).min())

        return Parallel(rank, self.world_size, all_reduce, all_gather, agree)


@pytest.mark.parametrize(
    "make_config",
    [qwen3_config, gemma2_config, mixtral_config, qwen2_moe_config],
    ids=["qwen3", "gemma2", "mixtral", "qwen2_moe"],
)
def test_two_ranks_equal_one(tiny_model_dir: Path, tmp_path: Path, make_config: Callable[[int], Any]) -> None:
    """Two tensor-parallel ranks (threads summing each other's partial products) give one rank's tokens."""
    path = build(tmp_path / "tp", tiny_model_dir, make_config)
    prompt = [3 + (i * 5) % 200 for i in range(30)]
    one = run_paged(PagedBackend(path, CPU, kv_cache_bytes=2**20, block_size=4), [prompt])[0]
    group = ThreadGroup(2)
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            backend = PagedBackend(path, CPU, kv_cache_bytes=2**20, block_size=4, parallel=group.parallel(r))
            results[r] = run_paged(backend, [prompt])[0]
        except BaseException as e:
            errors.append(e)
            group.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results[0] == results[1] == one


def test_the_launchers_list_of_shardable_models_is_the_paged_registry() -> None:
    from common.sharding import PAGED_ARCHITECTURES
    from shard.paged.arch import ARCHITECTURES

    assert sorted(PAGED_ARCHITECTURES) == sorted(ARCHITECTURES)
