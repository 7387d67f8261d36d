"""``text-generation-benchmark random-model``: a model directory with random weights.

The GPU benchmark (benchmark/gpu.sh) needs a model of a given size, not a given quality, and no hub is
reachable from the machines it runs on: this writes ``config.json``, ``generation_config.json``, one
``model.safetensors`` of normal(0, 0.02) weights (norms at 1) and a byte-level tokenizer (256 byte
tokens and an end token, no merges), which the shard, the router and transformers' ``generate`` all load
as they would a real checkpoint.

``--arch`` writes the same shape as another architecture, so that the step benchmark can set each
architecture's extras beside a dense Llama of the same active size: ``mixtral`` (8 experts, top 2, each
expert half the Llama's MLP width: the same products per token, 4x the MLP weights), ``qwen2_moe`` (8
experts of a quarter of the width, top 2, and a shared expert of half of it behind its gate: the same
active width) and ``gemma2`` (GeGLU, sandwich norms, soft-capping, alternating 4,096-token sliding
windows). These are made by transformers' own model class (its random initialization, std 0.02) and
saved as it saves them.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

END = "<|endoftext|>"


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = True

    def parameters(self) -> int:
        d = self.hidden // self.heads
        attention = self.hidden * d * (2 * self.heads + 2 * self.kv_heads)
        per_layer = attention + 3 * self.hidden * self.intermediate + 2 * self.hidden
        head = 0 if self.tied else self.vocab * self.hidden
        return self.vocab * self.hidden + self.layers * per_layer + self.hidden + head


SHAPES = {
    # Llama 3.2 1B: 1.24 billion parameters, 2.47 GB in bfloat16.
    "llama-1b": Shape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256),
    # The architectures side by side on a CPU (--arch; docs/benchmarks.md): 29 million parameters as Llama.
    "small": Shape(hidden=512, intermediate=1536, layers=8, heads=8, kv_heads=4, vocab=8192),
    # For tests: a few hundred thousand parameters.
    "tiny": Shape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512),
}


def tensors(shape: Shape, dtype: Any, seed: int) -> dict[str, Any]:
    """The checkpoint's tensors under Hugging Face Llama names."""
    import torch

    g = torch.Generator().manual_seed(seed)
    d = shape.hidden // shape.heads

    def normal(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=g) * 0.02).to(dtype)

    def ones(size: int) -> torch.Tensor:
        return torch.ones(size, dtype=dtype)

    out = {
        "model.embed_tokens.weight": normal(shape.vocab, shape.hidden),
        "model.norm.weight": ones(shape.hidden),
    }
    for i in range(shape.layers):
        p = f"model.layers.{i}"
        out |= {
            f"{p}.input_layernorm.weight": ones(shape.hidden),
            f"{p}.post_attention_layernorm.weight": ones(shape.hidden),
            f"{p}.self_attn.q_proj.weight": normal(shape.heads * d, shape.hidden),
            f"{p}.self_attn.k_proj.weight": normal(shape.kv_heads * d, shape.hidden),
            f"{p}.self_attn.v_proj.weight": normal(shape.kv_heads * d, shape.hidden),
            f"{p}.self_attn.o_proj.weight": normal(shape.hidden, shape.heads * d),
            f"{p}.mlp.gate_proj.weight": normal(shape.intermediate, shape.hidden),
            f"{p}.mlp.up_proj.weight": normal(shape.intermediate, shape.hidden),
            f"{p}.mlp.down_proj.weight": normal(shape.hidden, shape.intermediate),
        }
    if not shape.tied:
        out["lm_head.weight"] = normal(shape.vocab, shape.hidden)
    return out


def write_tokenizer(path: Path) -> int:
    """A byte-level tokenizer: the 256 byte tokens, then the end token. Returns the end token's id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[END] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END, pad_token=END)
    fast.save_pretrained(path)
    return vocab[END]


ARCHS = ("llama", "mixtral", "qwen2_moe", "gemma2")
EXPERTS, TOP_K = 8, 2  # --arch mixtral and qwen2_moe


def config_of(arch: str, shape: Shape, end: int, dtype_name: str) -> Any:
    """The transformers config of ``shape`` as ``arch`` (see the module docstring)."""
    from transformers import Gemma2Config, LlamaConfig, MixtralConfig, Qwen2MoeConfig

    common: dict[str, Any] = dict(
        vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, max_position_embeddings=8192,
        tie_word_embeddings=shape.tied, eos_token_id=end, bos_token_id=end, pad_token_id=end,
        torch_dtype=dtype_name,
    )  # fmt: skip
    if arch == "llama":
        return LlamaConfig(
            intermediate_size=shape.intermediate,
            rms_norm_eps=1e-5,
            **common,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        )
    if arch == "mixtral":
        return MixtralConfig(
            intermediate_size=shape.intermediate // TOP_K, num_local_experts=EXPERTS, num_experts_per_tok=TOP_K,
            **common,
        )  # fmt: skip
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(
            intermediate_size=shape.intermediate, moe_intermediate_size=shape.intermediate // (2 * TOP_K),
            shared_expert_intermediate_size=shape.intermediate // 2, num_experts=EXPERTS,
            num_experts_per_tok=TOP_K, norm_topk_prob=True, **common,
        )  # fmt: skip
    if arch == "gemma2":
        d = shape.hidden // shape.heads
        return Gemma2Config(
            intermediate_size=shape.intermediate, head_dim=d, query_pre_attn_scalar=d, sliding_window=4096,
            **common,
        )  # fmt: skip
    raise ValueError(f"unknown architecture {arch!r} (known: {', '.join(ARCHS)})")


def write_model(
    path: Path, shape: Shape, dtype_name: str = "bfloat16", seed: int = 0, arch: str = "llama"
) -> Path:
    """Writes the model directory (created if needed) and returns it."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    dtype = getattr(torch, dtype_name)
    path.mkdir(parents=True, exist_ok=True)
    end = write_tokenizer(path)
    if end >= shape.vocab:
        raise ValueError(f"a vocabulary of {shape.vocab} cannot hold the tokenizer's {end + 1} tokens")
    config = config_of(arch, shape, end, dtype_name)
    GenerationConfig(eos_token_id=end, bos_token_id=end, pad_token_id=end).save_pretrained(path)
    if arch != "llama":
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config, dtype=dtype).save_pretrained(path, safe_serialization=True)
        return path
    config.save_pretrained(path)
    save_file(tensors(shape, dtype, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def run_command(args: argparse.Namespace) -> int:
    shape = SHAPES[args.shape]
    started = time.perf_counter()
    try:
        write_model(Path(args.output), shape, args.dtype, args.seed, args.arch)
    except (OSError, ValueError) as e:
        print(f"text-generation-benchmark random-model: error: {e}", file=sys.stderr)
        return 1
    size = (
        f"{shape.parameters() / 1e6:,.1f} million parameters" if args.arch == "llama" else "its active size"
    )
    print(
        f"{args.shape} ({args.arch}, {size}, {args.dtype}) written to {args.output} in "
        f"{time.perf_counter() - started:.1f} s"
    )
    return 0


def register(commands: Any) -> None:
    """Adds the ``random-model`` subcommand to ``text-generation-benchmark``'s subparsers."""
    from benchmark.args import non_negative_int

    p = commands.add_parser(
        "random-model",
        help="write a Llama-shaped model directory with random weights (for GPU benchmarks)",
        description="Writes config, random safetensors weights and a byte-level tokenizer for a Llama shape.",
    )
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b", help="(default: %(default)s)")
    p.add_argument("--arch", choices=ARCHS, default="llama",
                   help="the shape as this architecture, at the same active size (default: %(default)s)")  # fmt: skip
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--seed", type=non_negative_int, default=0, help="(default: %(default)s)")
    p.add_argument("--output", metavar="DIR", required=True, help="model directory to write")
    p.set_defaults(handler=run_command)
