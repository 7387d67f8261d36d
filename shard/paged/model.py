"""The shared decoder of every architecture the paged runner covers (shard/paged/arch/), over a flat
token layout and a paged KV cache.

A ``ModelSpec`` says where a model departs from Llama's decoder (biases, q/k norms, sandwich norms, GeGLU,
attention scale, soft-capping, per-layer windows and rotary tables, fused checkpoint tensors, per-layer
mixture-of-experts MLPs: shard/paged/moe.py); nothing
here looks at a model type. Weights are read straight from the model's safetensors files, each rank
reading only its slice (so no rank ever holds the whole model when sharded). q/k/v and gate/up are fused
into one matrix each.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from torch import nn

from ..dist import Parallel
from .arch import architecture
from .attention import Scores, StepMeta, attend, paged_attention
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
from .moe import MoE, load_moe
from .quant import GROUP, MODES, QuantColumnLinear, QuantLinear, QuantRowLinear
from .spec import ModelSpec, UnsupportedModelError

__all__ = ["ModelSpec", "PagedModel", "UnsupportedModelError", "Weights", "quantize_model", "use_cpu_kernels"]

log = logging.getLogger(__name__)


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

    def get(
        self,
        name: str,
        dim: int | None = None,
        part: tuple[int, int] | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """The tensor ``name``, or its [start, end) slice along ``dim``, in the model's dtype (or
        ``dtype``)."""
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
        return tensor.to(dtype=dtype or self.dtype, device=self.device).contiguous()

    def norm(self, name: str, spec: ModelSpec) -> RMSNorm:
        """An RMSNorm whose weight is ``norm_offset + w`` (computed in float32, then in the model's dtype)."""
        weight = self.get(name, dtype=torch.float32) + spec.norm_offset
        return RMSNorm(weight.to(self.dtype), spec.rms_norm_eps)


def stacked_rows(
    w: Weights,
    names: list[str],
    fused: str | None,
    widths: list[int],
    parts: list[tuple[int, int]],
    unit: int,
) -> torch.Tensor:
    """This rank's rows of several projections stacked into one matrix (or bias): part i is rows
    [parts[i][0] * unit, parts[i][1] * unit) of ``names[i]``, or, from a checkpoint that fuses them into
    ``fused``, of its i-th block of ``widths[i]`` rows."""
    if fused is None:
        return torch.cat(
            [w.get(name, 0, (a * unit, b * unit)) for name, (a, b) in zip(names, parts, strict=True)]
        )
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    return torch.cat(
        [w.get(fused, 0, (o + a * unit, o + b * unit)) for o, (a, b) in zip(offsets, parts, strict=True)]
    )


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer: h += [out_norm](o(attention(rotary([qk_norm](qkv(norm(h))))))), then
    h += [out_norm](mlp(norm(h))), the bracketed parts where the spec has them."""

    def __init__(self, spec: ModelSpec, index: int, w: Weights, parallel: Parallel) -> None:
        super().__init__()
        prefix = f"model.layers.{index}"
        self.index = index
        names = spec.names
        d = spec.head_dim
        q_part = parallel.split(spec.num_heads, "attention heads")
        kv_part = parallel.split(spec.num_kv_heads, "key/value heads")
        self.num_heads = q_part[1] - q_part[0]
        self.num_kv_heads = kv_part[1] - kv_part[0]
        self.head_dim = d
        layer = spec.layers[index]
        self.rope = layer.rope
        self.scores = Scores(spec.attn_scale, spec.attn_softcap, layer.sliding_window)
        a = f"{prefix}.self_attn"

        def qkv(kind: str) -> torch.Tensor:
            widths = [spec.num_heads * d, spec.num_kv_heads * d, spec.num_kv_heads * d]
            fused = f"{a}.qkv_proj.{kind}" if names.fused_qkv else None
            projections = [f"{a}.{x}_proj.{kind}" for x in "qkv"]
            return stacked_rows(w, projections, fused, widths, [q_part, kv_part, kv_part], d)

        # Quantized layers replace them under --quantize int8|int4 (quantize_model).
        self.qkv: ColumnLinear | QuantLinear = ColumnLinear(
            qkv("weight"), qkv("bias") if spec.qkv_bias else None
        )
        o_bias = w.get(f"{a}.o_proj.bias") if spec.o_bias else None
        self.o: RowLinear | QuantLinear = RowLinear(
            w.get(f"{a}.o_proj.weight", 1, (q_part[0] * d, q_part[1] * d)), parallel, o_bias
        )
        self.q_norm = w.norm(f"{a}.q_norm.weight", spec) if spec.qk_norm else None
        self.k_norm = w.norm(f"{a}.k_norm.weight", spec) if spec.qk_norm else None
        self.mlp: MLP | MoE = (
            self.dense_mlp(spec, prefix, w, parallel)
            if layer.moe is None
            else load_moe(layer.moe, prefix, w.get, parallel, spec.activation)
        )
        self.input_norm = w.norm(f"{prefix}.{names.input_norm}.weight", spec)
        self.mlp_norm = w.norm(f"{prefix}.{names.mlp_norm}.weight", spec)
        out = names.attn_out_norm, names.mlp_out_norm
        self.attn_out_norm = None if out[0] is None else w.norm(f"{prefix}.{out[0]}.weight", spec)
        self.mlp_out_norm = None if out[1] is None else w.norm(f"{prefix}.{out[1]}.weight", spec)

    @staticmethod
    def dense_mlp(spec: ModelSpec, prefix: str, w: Weights, parallel: Parallel) -> MLP:
        m = f"{prefix}.mlp"
        ff = parallel.split(spec.intermediate_size, "MLP width")

        def gate_up(kind: str) -> torch.Tensor:
            fused = f"{m}.gate_up_proj.{kind}" if spec.names.fused_gate_up else None
            projections = [f"{m}.gate_proj.{kind}", f"{m}.up_proj.{kind}"]
            return stacked_rows(w, projections, fused, [spec.intermediate_size] * 2, [ff, ff], 1)

        down_bias = w.get(f"{m}.down_proj.bias") if spec.mlp_bias else None
        return MLP(
            ColumnLinear(gate_up("weight"), gate_up("bias") if spec.mlp_bias else None),
            RowLinear(w.get(f"{m}.down_proj.weight", 1, ff), parallel, down_bias),
            spec.activation,
        )

    def linears(self) -> list[tuple[nn.Module, str]]:
        """The layer's products as (owner, attribute): q/k/v, o, then the MLP's (each expert's in an MoE)."""
        mlp = self.mlp.linears() if isinstance(self.mlp, MoE) else [(self.mlp, "gate_up"), (self.mlp, "down")]
        return [(self, "qkv"), (self, "o"), *mlp]

    def forward(
        self, h: torch.Tensor, rope: RotaryStep, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: StepMeta
    ) -> torch.Tensor:
        qkv = self.normed_qk(self.product("qkv", self.input_norm(h), meta))
        q, k, v = rope.qkv(qkv, self.num_heads, self.num_kv_heads, self.head_dim)
        attn = self.product("o", paged_attention(q, k, v, k_pool, v_pool, meta, self.scores), meta)
        h = h + (attn if self.attn_out_norm is None else self.attn_out_norm(attn))
        mlp = self.run_mlp(self.mlp_norm(h), meta)
        return h + (mlp if self.mlp_out_norm is None else self.mlp_out_norm(mlp))

    def product(self, name: str, x: torch.Tensor, meta: StepMeta) -> torch.Tensor:
        """The attention's fused product ``name`` (``qkv`` or ``o``) of ``x``, with the step's LoRA adapters
        added on their own rows."""
        y = (self.qkv if name == "qkv" else self.o)(x)
        return y if meta.lora is None else meta.lora.add(self.index, name, x, y)

    def run_mlp(self, x: torch.Tensor, meta: StepMeta) -> torch.Tensor:
        """The MLP of ``x``, with the step's LoRA adapters (dense MLPs: experts take none)."""
        lora = meta.lora
        if lora is None or not isinstance(self.mlp, MLP):
            return self.mlp(x)
        return self.mlp(x, lambda name, inp, out: lora.add(self.index, name, inp, out))

    def normed_qk(self, qkv: torch.Tensor) -> torch.Tensor:
        """The fused q/k/v product with each head's queries and keys RMS-normalized (q/k norms), else as
        it is."""
        if self.q_norm is None or self.k_norm is None:
            return qkv
        tokens, d = qkv.shape[0], self.head_dim
        q, k, v = qkv.split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        q = self.q_norm(q.reshape(-1, d).contiguous()).view(tokens, -1)
        k = self.k_norm(k.reshape(-1, d).contiguous()).view(tokens, -1)
        return torch.cat([q, k, v], dim=-1)

    def attention(
        self, x: torch.Tensor, rope: RotaryStep, k_pool: torch.Tensor, v_pool: torch.Tensor, meta: StepMeta
    ) -> torch.Tensor:
        """The attention half on the CPU kernels (``PagedModel.fused``): normalized rows x -> the output
        projection, to add to the residual stream. The rotation and the KV cache write are one call."""
        qkv = self.normed_qk(self.product("qkv", x, meta))
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
        return self.product(
            "o", attend(qkv[:, : heads * d].view(-1, heads, d), k_pool, v_pool, meta, self.scores), meta
        )


class PagedModel(nn.Module):
    """The decoder of any architecture in shard/paged/arch/: embeddings, ``DecoderLayer``s, final norm and
    LM head, with ``spec``'s differences."""

    def __init__(
        self, config: Any, spec: ModelSpec, w: Weights, parallel: Parallel, max_positions: int
    ) -> None:
        super().__init__()
        self.spec = spec
        self.parallel = parallel
        # The vocabulary is split in equal ranges (the last may be shorter): any vocabulary size shards.
        self.vocab_part = -(-spec.vocab_size // parallel.world_size)
        start = parallel.rank * self.vocab_part
        vocab = (start, min(spec.vocab_size, start + self.vocab_part))
        embed = w.get("model.embed_tokens.weight", 0, vocab if parallel.world_size > 1 else None)
        self.embed = VocabEmbedding(embed, vocab[0], parallel)
        # Gemma's factor on the embeddings, in the model's dtype as transformers rounds it (made here: a step
        # captured in a CUDA graph cannot copy it from the host).
        self.embed_scale = (
            None
            if spec.embed_scale is None
            else torch.tensor(spec.embed_scale, dtype=w.dtype, device=w.device)
        )
        self.layers = nn.ModuleList(DecoderLayer(spec, i, w, parallel) for i in range(spec.num_layers))
        self.norm = w.norm("model.norm.weight", spec)
        # None once quantize_model has replaced an untied head by ``head``.
        self.lm_head: nn.Parameter | None
        if spec.tie_word_embeddings or not w.has("lm_head.weight"):
            self.lm_head = self.embed.weight
        else:
            self.lm_head = nn.Parameter(
                w.get("lm_head.weight", 0, vocab if parallel.world_size > 1 else None), requires_grad=False
            )
        tables = architecture(config).rotary(config)
        # One per rotary table the layers use (Gemma 3: its sliding and global layers'), by LayerSpec.rope.
        self.rotaries = {
            key: Rotary.of(tables[key], max_positions, w.dtype)
            for key in sorted({layer.rope for layer in spec.layers})
        }
        for rotary in self.rotaries.values():
            rotary.to(w.device)
        self.head: nn.Module | None = None  # a quantized LM head (shard/paged/quant.py) replaces F.linear
        self.dense_head = False  # see layers.linear
        self.head_packed: torch.Tensor | None = None
        # step_cpu.cpp's attention, RMSNorm and rotary kernels (use_cpu_kernels, for models whose layers
        # all have Llama's shape: ModelSpec.kernel_layers); with it off the backend builds the torch path's
        # gathered slots and masks.
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
        long_rope: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Runs one step's tokens; returns float32 logits [len(logit_rows), vocab] for the rows asked.
        ``long_rope`` (bool [tokens], LongRoPE): the tokens whose sequences rotate long throughout
        (``Rotary.rows``)."""
        h = self.embed(ids)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        ropes = {key: rotary.step(positions, long_rope) for key, rotary in self.rotaries.items()}
        if self.fused:
            h = self._layers_fused(h, ropes[""], cache, meta)
            h = h if logit_rows is None else h.index_select(0, logit_rows)
        else:
            layers = zip(self.decoder_layers, cache.k_layers, cache.v_layers, strict=True)
            for layer, k_pool, v_pool in layers:
                h = layer(h, ropes[layer.rope], k_pool, v_pool, meta)
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
        cap = self.spec.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def _layers_fused(
        self, h: torch.Tensor, rope: RotaryStep, cache: PagedKVCache, meta: StepMeta
    ) -> torch.Tensor:
        """The decoder layers on the CPU kernels, then the final norm: each residual add rides on the RMSNorm
        after it (``add_rms_norm_``, h updated in place), so a layer is two norms, four products, attention
        and SwiGLU, with no other operation between them. A decode-only step whose products all have a
        kernel runs them in one call (step_cpu.cpp's ``decode_layers``)."""
        plan = self.decode_plan()
        if plan is not None and not meta.prefills and meta.lora is None and h.shape[0] <= plan.max_rows:
            r, first = rope.rotary, self.decoder_layers[0]
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
            post = layer.mlp_norm
            x = add_norm(h, layer.attention(x, rope, k_pool, v_pool, meta), post.weight, post.eps)
            x = add_norm(h, layer.run_mlp(x, meta), after.weight, after.eps)
        return x

    def decode_plan(self) -> DecodePlan | None:
        """What ``decode_layers`` takes for this model (made on first use, once the layers are final); None
        when it does not apply: not float32, several ranks, q/k norms, a bias past q/k/v, experts, or a
        product without a kernel."""
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


def make_decode_plan(model: PagedModel) -> DecodePlan | None:
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
        if isinstance(layer.mlp, MoE):  # decode_layers runs dense MLPs only
            return None
        modules = (layer.qkv, layer.o, layer.mlp.gate_up, layer.mlp.down)
        products = [p for p in (product(m) for m in modules) if p is not None]
        if len(products) < len(modules) or any(getattr(m, "bias", None) is not None for m in modules[1:]):
            return None
        if layer.q_norm is not None:
            return None
        weights += [layer.input_norm.weight, layer.mlp_norm.weight]
        for kind, a, b in products:
            kinds.append(kind)
            weights += [a, b]
        weights.append(none if layer.qkv.bias is None else layer.qkv.bias)
    return DecodePlan(weights, kinds, min(rows))


def quantize_model(model: PagedModel, mode: str) -> None:
    """Replaces every decoder layer's linear layers (q/k/v, o, gate/up, down; each expert's gate/up and
    down in an MoE layer) and the LM head, in place (shard/paged/quant.py's layers).

    The LM head is int8 in both modes. A layer whose input width the kernels cannot take stays float."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; known: {', '.join(MODES)}")
    head = model.lm_head
    if head is None:
        raise ValueError("the model is quantized already")
    before = after = 0
    for layer in model.decoder_layers:
        for owner, name in layer.linears():
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
                bias = None if old.bias is None else old.bias.data
                new: QuantLinear = QuantRowLinear(weight, mode, old.parallel, bias)
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


def use_cpu_kernels(model: PagedModel, unquantized: bool) -> bool:
    """Runs a CPU model's RMSNorms, SwiGLU, and (when its layers have Llama's shape,
    ``ModelSpec.kernel_layers``) attention and rotary embedding through step_cpu.cpp's kernels. With
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
    if spec.kernel_layers and (
        spec.head_dim % 16 or spec.head_dim > 128
    ):  # the attention and rotary kernels'
        return False
    if not load_kernels():
        return False
    single_row_dense = norm.dtype == torch.float32
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.fused = True
        elif isinstance(module, MLP):
            module.fused = module.activation == "silu"
        elif unquantized and isinstance(module, ColumnLinear | RowLinear) and module.weight is not None:
            module.packed = pack_weight(module.weight.data)
            # quant_cpu.cpp's dense kernel takes input widths in whole blocks of 32 (a rank's slice of an odd
            # width may not be)
            module.dense = single_row_dense and module.weight.shape[1] % 32 == 0
            if module.packed is not None and not single_row_dense:
                module.weight = None  # the packed copy serves every product
    model.fused = spec.kernel_layers
    for rotary in model.rotaries.values():
        rotary.fused = model.fused
    head = model.lm_head
    if unquantized and model.head is None and head is not None:
        model.head_packed = pack_weight(head.data)
        model.dense_head = single_row_dense and head.dim() == 2 and head.is_contiguous()
    return True
