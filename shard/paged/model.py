"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM...) over a flat token layout and a paged KV cache.

Weights are read straight from the model's safetensors files, each rank reading only its slice (so no
rank ever holds the whole model when sharded). q/k/v and gate/up are fused into one matrix each.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from safetensors import safe_open
from torch import nn

from common.sharding import PAGED_ARCHITECTURES

from ..dist import Parallel
from .attention import StepMeta, attend, paged_attention
from .kv_cache import PagedKVCache
from .layers import (
    MLP,
    ColumnLinear,
    RMSNorm,
    Rotary,
    RotaryStep,
    RowLinear,
    VocabEmbedding,
    linear,
    pack_weight,
)
from .quant import GROUP, MODES, QuantColumnLinear, QuantLinear, QuantRowLinear

log = logging.getLogger(__name__)

ARCHITECTURES = PAGED_ARCHITECTURES


class UnsupportedModelError(ValueError):
    """This runner does not cover the model (the transformers backend does)."""


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    max_position_embeddings: int

    @classmethod
    def from_config(cls, config) -> ModelSpec:
        """From a transformers config; raises UnsupportedModelError for what this runner cannot run."""
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise UnsupportedModelError(f"model type {model_type!r} (supported: {', '.join(ARCHITECTURES)})")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"activation {config.hidden_act!r}")
        if getattr(config, "mlp_bias", False):
            raise UnsupportedModelError("MLP biases")
        window = getattr(config, "sliding_window", None)
        sliding = window and getattr(config, "use_sliding_window", model_type == "mistral")
        if sliding and window < config.max_position_embeddings:
            raise UnsupportedModelError(f"sliding-window attention ({window} tokens)")
        heads = config.num_attention_heads
        return cls(
            model_type=model_type,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
            rms_norm_eps=config.rms_norm_eps,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            max_position_embeddings=config.max_position_embeddings,
        )


class Weights:
    """Reads tensors (or this rank's slice of them) from a directory of safetensors files."""

    def __init__(self, directory: Path, dtype: torch.dtype, device: torch.device) -> None:
        index = directory / "model.safetensors.index.json"
        if index.exists():
            names = json.loads(index.read_text())["weight_map"]
            self.files = {name: directory / file for name, file in names.items()}
        else:
            self.files = {}
            for path in sorted(directory.glob("*.safetensors")):
                with safe_open(path, "pt") as f:
                    self.files.update(dict.fromkeys(f.keys(), path))
        self.dtype = dtype
        self.device = device

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, dim: int | None = None, part: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor ``name``, or its [start, end) slice along ``dim``."""
        if name not in self.files:
            raise UnsupportedModelError(f"missing tensor {name}")
        with safe_open(self.files[name], "pt") as f:
            if part is None:
                tensor = f.get_tensor(name)
            elif dim is None:
                raise ValueError(f"a slice of {name} needs its dimension")
            else:
                s = f.get_slice(name)
                index = [slice(None)] * len(s.get_shape())
                index[dim] = slice(*part)
                tensor = s[tuple(index)]
        return tensor.to(dtype=self.dtype, device=self.device).contiguous()


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, w: Weights, prefix: str, parallel: Parallel) -> None:
        super().__init__()
        d = spec.head_dim
        q_part = parallel.split(spec.num_heads, "attention heads")
        kv_part = parallel.split(spec.num_kv_heads, "key/value heads")
        self.num_heads = q_part[1] - q_part[0]
        self.num_kv_heads = kv_part[1] - kv_part[0]
        self.head_dim = d
        a = f"{prefix}.self_attn"

        def rows(name: str, part: tuple[int, int]) -> torch.Tensor:
            return w.get(name, 0, (part[0] * d, part[1] * d))

        qkv = torch.cat([rows(f"{a}.q_proj.weight", q_part), rows(f"{a}.k_proj.weight", kv_part),
                         rows(f"{a}.v_proj.weight", kv_part)])  # fmt: skip
        bias = None
        if spec.qkv_bias:
            bias = torch.cat([rows(f"{a}.q_proj.bias", q_part), rows(f"{a}.k_proj.bias", kv_part),
                              rows(f"{a}.v_proj.bias", kv_part)])  # fmt: skip
        # Quantized layers replace them under --quantize int8|int4 (quantize_model).
        self.qkv: ColumnLinear | QuantLinear = ColumnLinear(qkv, bias)
        self.o: RowLinear | QuantLinear = RowLinear(
            w.get(f"{a}.o_proj.weight", 1, (q_part[0] * d, q_part[1] * d)), parallel
        )
        m = f"{prefix}.mlp"
        ff = parallel.split(spec.intermediate_size, "MLP width")
        gate_up = torch.cat([w.get(f"{m}.gate_proj.weight", 0, ff), w.get(f"{m}.up_proj.weight", 0, ff)])
        self.mlp = MLP(ColumnLinear(gate_up), RowLinear(w.get(f"{m}.down_proj.weight", 1, ff), parallel))
        self.input_norm = RMSNorm(w.get(f"{prefix}.input_layernorm.weight"), spec.rms_norm_eps)
        self.post_norm = RMSNorm(w.get(f"{prefix}.post_attention_layernorm.weight"), spec.rms_norm_eps)

    def forward(
        self, h: torch.Tensor, rope: RotaryStep, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: StepMeta
    ) -> torch.Tensor:
        qkv = self.qkv(self.input_norm(h))
        q, k, v = rope.qkv(qkv, self.num_heads, self.num_kv_heads, self.head_dim)
        h = h + self.o(paged_attention(q, k, v, k_pool, v_pool, meta))
        return h + self.mlp(self.post_norm(h))

    def attention(
        self, x: torch.Tensor, rope: RotaryStep, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: StepMeta
    ) -> torch.Tensor:
        """The attention half on the CPU kernels (``LlamaModel.fused``): normalized rows x -> the output
        projection, to add to the residual stream. The rotation and the KV cache write are one call."""
        qkv = self.qkv(x)
        heads, d, r = self.num_heads, self.head_dim, rope.rotary
        torch.ops.paged_step.rotary_store_(
            qkv,
            rope.positions,
            r.cos32,
            r.sin32,
            heads,
            self.num_kv_heads,
            d,
            k_pool,
            v_pool,
            meta.write_slots,
        )
        return self.o(attend(qkv[:, : heads * d].view(-1, heads, d), k_pool, v_pool, meta))


class LlamaModel(nn.Module):
    def __init__(self, config, spec: ModelSpec, w: Weights, parallel: Parallel, max_positions: int) -> None:
        super().__init__()
        self.spec = spec
        self.parallel = parallel
        # The vocabulary is split in equal ranges (the last may be shorter): any vocabulary size shards.
        self.vocab_part = -(-spec.vocab_size // parallel.world_size)
        start = parallel.rank * self.vocab_part
        vocab = (start, min(spec.vocab_size, start + self.vocab_part))
        embed = w.get("model.embed_tokens.weight", 0, vocab if parallel.world_size > 1 else None)
        self.embed = VocabEmbedding(embed, vocab[0], parallel)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, w, f"model.layers.{i}", parallel) for i in range(spec.num_layers)
        )
        self.norm = RMSNorm(w.get("model.norm.weight"), spec.rms_norm_eps)
        # None once quantize_model has replaced an untied head by ``head``.
        self.lm_head: nn.Parameter | None
        if spec.tie_word_embeddings or not w.has("lm_head.weight"):
            self.lm_head = self.embed.weight
        else:
            self.lm_head = nn.Parameter(
                w.get("lm_head.weight", 0, vocab if parallel.world_size > 1 else None), requires_grad=False
            )
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rope = LlamaRotaryEmbedding(config)
        self.rotary = Rotary(rope.inv_freq, rope.attention_scaling, max_positions, w.dtype)
        self.head: nn.Module | None = None  # a quantized LM head (shard/paged/quant.py) replaces F.linear
        self.dense_head = False  # see layers.linear
        self.head_packed: torch.Tensor | None = None
        self.rotary.to(w.device)
        # step_cpu.cpp's attention, RMSNorm and rotary kernels (use_cpu_kernels); with it off the backend
        # builds the torch path's gathered slots and masks.
        self.fused = False
        self._decode_plan: DecodePlan | None = None
        self._decode_plan_made = False

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        """``layers`` as what they are (nn.ModuleList's items are plain Modules to a type checker)."""
        return cast(list[DecoderLayer], list(self.layers))

    def weight_bytes(self) -> int:
        """Bytes of weights held, prepacked copies (oneDNN's opaque tensors) included; tied weights count
        once."""
        tensors = {t.data_ptr(): t for t in self.state_dict().values()}
        packed = [m.packed for m in self.modules() if isinstance(m, ColumnLinear | RowLinear)]
        packed = [t for t in [*packed, self.head_packed] if t is not None]
        return sum(t.numel() * t.element_size() for t in [*tensors.values(), *packed])

    @torch.inference_mode()
    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        meta: StepMeta,
        cache: PagedKVCache,
        logit_rows: torch.Tensor,
    ) -> torch.Tensor:
        """Runs one step's tokens; returns float32 logits [len(logit_rows), vocab] for the rows asked."""
        h = self.embed(ids)
        rope = self.rotary.step(positions)
        if self.fused:
            h = self._layers_fused(h, rope, cache, meta)
            h = h if logit_rows is None else h.index_select(0, logit_rows)
        else:
            for layer, k_pool, v_pool in zip(self.layers, cache.k_layers, cache.v_layers, strict=True):
                h = layer(h, rope, k_pool, v_pool, meta)
            h = self.norm(h if logit_rows is None else h.index_select(0, logit_rows))
        if self.head is not None:
            logits = self.head(h)
        else:
            logits = linear(h, self.lm_head, None, self.dense_head, self.head_packed)
        if self.parallel.world_size > 1:
            pad = self.vocab_part - logits.shape[-1]
            if pad:
                logits = torch.nn.functional.pad(logits, (0, pad))
            logits = self.parallel.all_gather(logits)[:, : self.spec.vocab_size]
        return logits.float()

    def _layers_fused(
        self, h: torch.Tensor, rope: RotaryStep, cache: PagedKVCache, meta: StepMeta
    ) -> torch.Tensor:
        """The decoder layers on the CPU kernels, then the final norm: each residual add rides on the RMSNorm
        after it (``add_rms_norm_``, h updated in place), so a layer is two norms, four products, attention
        and SwiGLU, with no other operation between them. A decode-only step whose products all have a
        kernel runs them in one call (step_cpu.cpp's ``decode_layers``)."""
        plan = self.decode_plan()
        if plan is not None and not meta.prefills and h.shape[0] <= plan.max_rows:
            r, first = self.rotary, self.decoder_layers[0]
            return torch.ops.paged_step.decode_layers(
                h, plan.weights, plan.kinds, cache.k_layers, cache.v_layers, rope.positions, r.cos32, r.sin32,
                meta.write_slots, meta.decode_table, meta.decode_lengths, meta.block_size, first.num_heads,
                first.num_kv_heads, first.head_dim, self.norm.eps, self.norm.weight,
            )  # fmt: skip
        add_norm = torch.ops.paged_step.add_rms_norm_
        layers = self.decoder_layers
        norms = [layer.input_norm for layer in layers[1:]] + [self.norm]
        x = layers[0].input_norm(h)
        for layer, after, k_pool, v_pool in zip(layers, norms, cache.k_layers, cache.v_layers, strict=True):
            post = layer.post_norm
            x = add_norm(h, layer.attention(x, rope, k_pool, v_pool, meta), post.weight, post.eps)
            x = add_norm(h, layer.mlp(x), after.weight, after.eps)
        return x

    def decode_plan(self) -> DecodePlan | None:
        """What ``decode_layers`` takes for this model (made on first use, once the layers are final); None
        when it does not apply: not float32, several ranks, or a product without a kernel."""
        if not self._decode_plan_made:
            self._decode_plan = make_decode_plan(self) if self.fused else None
            self._decode_plan_made = True
        return self._decode_plan


# step_cpu.cpp's decode_layers: its kinds of product.
DENSE, INT8, INT4 = 0, 1, 2


@dataclass(frozen=True)
class DecodePlan:
    """``decode_layers``' view of a model: per layer its 11 tensors (input and post-attention norms, then
    two per product for q/k/v, output, gate/up and down, then the q/k/v bias or an empty tensor) and the
    kinds of its 4 products; and the most rows a step may have for every product to take its kernel."""

    weights: list[torch.Tensor]
    kinds: list[int]
    max_rows: int


def make_decode_plan(model: LlamaModel) -> DecodePlan | None:
    if model.parallel.world_size > 1 or model.norm.weight.dtype != torch.float32:
        return None
    none = torch.empty(0)
    rows = [1 << 62]

    def product(module: nn.Module) -> tuple[int, torch.Tensor, torch.Tensor] | None:
        if isinstance(module, QuantLinear):
            if not module.fast:
                return None
            rows.append(module.large_m - 1)
            return (
                (INT8, module.q, module.scale)
                if module.mode == "int8"
                else (INT4, module.nibbles, module.scales)
            )
        if isinstance(module, ColumnLinear | RowLinear) and module.dense and module.weight is not None:
            rows.append(1)  # the dense kernel: single rows
            return DENSE, module.weight, none
        return None

    weights: list[torch.Tensor] = []
    kinds: list[int] = []
    for layer in model.decoder_layers:
        modules = (layer.qkv, layer.o, layer.mlp.gate_up, layer.mlp.down)
        products = [p for p in (product(m) for m in modules) if p is not None]
        if len(products) < len(modules) or any(getattr(m, "bias", None) is not None for m in modules[1:]):
            return None
        weights += [layer.input_norm.weight, layer.post_norm.weight]
        for kind, a, b in products:
            kinds.append(kind)
            weights += [a, b]
        weights.append(none if layer.qkv.bias is None else layer.qkv.bias)
    return DecodePlan(weights, kinds, min(rows))


def quantize_model(model: LlamaModel, mode: str) -> None:
    """Replaces every decoder layer's linear layers (q/k/v, o, gate/up, down) and the LM head, in place
    (shard/paged/quant.py's layers).

    The LM head is int8 in both modes. A layer whose input width the kernels cannot take stays float."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; known: {', '.join(MODES)}")
    head = model.lm_head
    if head is None:
        raise ValueError("the model is quantized already")
    before = after = 0
    for layer in model.decoder_layers:
        for owner, name in ((layer, "qkv"), (layer, "o"), (layer.mlp, "gate_up"), (layer.mlp, "down")):
            old = getattr(owner, name)
            if not isinstance(old, ColumnLinear | RowLinear) or old.weight is None:
                raise TypeError(f"cannot quantize {type(old).__name__}")
            weight = old.weight.data
            k = weight.shape[1]
            if mode == "int4" and k % GROUP:
                log.warning("%s: input width %d is not a multiple of %d: left in float", name, k, GROUP)
                continue
            before += weight.numel() * weight.element_size()
            if isinstance(old, RowLinear):
                new: QuantLinear = QuantRowLinear(weight, mode, old.parallel)
            else:
                new = QuantColumnLinear(weight, None if old.bias is None else old.bias.data, mode)
            after += new.nbytes()
            setattr(owner, name, new)
    model.head = quantized_head = QuantLinear(head.data, None, "int8")
    if head is not model.embed.weight:  # an untied head's float copy is no longer needed
        model.lm_head = None
    log.info(
        "Quantized to %s: decoder linear layers %.0f MB -> %.0f MB; LM head %.0f MB -> %.0f MB (int8)",
        mode, before / 1e6, after / 1e6, head.numel() * head.element_size() / 1e6, quantized_head.nbytes() / 1e6,
    )  # fmt: skip


def use_cpu_kernels(model: LlamaModel, unquantized: bool) -> bool:
    """Runs a CPU model's attention, RMSNorms and rotary embedding through step_cpu.cpp's kernels. With
    ``unquantized`` (float32/bfloat16 linear layers) also its products: prepacked for oneDNN, and in
    float32 single rows (one stream decoding) through quant_cpu.cpp's dense kernel, which keeps the plain
    weights too (twice the memory, for 25% faster single-row products); bfloat16 keeps only the packed
    copy. False (nothing changed) when the kernels cannot be built here or the model's dtype or shapes are
    outside them."""
    from .kernels import load_kernels

    norm = model.norm.weight
    if norm.device.type != "cpu" or norm.dtype not in (torch.float32, torch.bfloat16):
        return False
    spec = model.spec
    if spec.head_dim % 16 or spec.head_dim > 128:
        return False
    if not load_kernels():
        return False
    single_row_dense = norm.dtype == torch.float32
    for module in model.modules():
        if isinstance(module, RMSNorm | MLP):
            module.fused = True
        elif unquantized and isinstance(module, ColumnLinear | RowLinear) and module.weight is not None:
            module.packed = pack_weight(module.weight.data)
            module.dense = single_row_dense
            if module.packed is not None and not single_row_dense:
                module.weight = None  # the packed copy serves every product
    model.rotary.fused = model.fused = True
    head = model.lm_head
    if unquantized and model.head is None and head is not None:
        model.head_packed = pack_weight(head.data)
        model.dense_head = single_row_dense and head.dim() == 2 and head.is_contiguous()
    return True
