"""What the shared decoder (shard/paged/model.py) needs to know about a model: its sizes, and the few ways an
architecture departs from Llama's decoder. Each model type's module in shard/paged/arch/ reads its
transformers config into a ``ModelSpec``; the decoder never looks at a model type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """This runner does not cover the model (the transformers backend does)."""


ACTIVATIONS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class LayerNames:
    """Where a decoder layer's tensors are, under ``model.layers.{i}.``.

    ``mlp_norm`` is the norm before the MLP (Llama calls it ``post_attention_layernorm``);
    ``attn_out_norm`` and ``mlp_out_norm``, when named, normalize the attention and MLP outputs before
    their residual adds (Gemma's sandwich norms). ``fused_qkv``/``fused_gate_up``: the checkpoint holds
    ``self_attn.qkv_proj`` and ``mlp.gate_up_proj`` (Phi-3) instead of the separate projections."""

    input_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attn_out_norm: str | None = None
    mlp_out_norm: str | None = None
    fused_qkv: bool = False
    fused_gate_up: bool = False


@dataclass(frozen=True)
class MoESpec:
    """A mixture-of-experts MLP (shard/paged/moe.py): a router (``{block}.{router}.weight``, [experts,
    hidden]) picks ``top_k`` of ``num_experts`` SwiGLU experts per token, each ``intermediate_size`` wide,
    whose tensors are ``{block}.{experts}.{e}.{gate|up|down}.weight`` (``projections`` names them).

    Routing, as transformers defines it for both families: softmax over the router's logits in float32,
    the top_k probabilities, divided by their sum when ``normalize`` (Mixtral always; Qwen3-MoE's
    ``norm_topk_prob``). ``weights_in_model_dtype``: the weights are rounded to the model's dtype before
    they scale the experts' outputs (Qwen3-MoE); else they stay float32 (Mixtral)."""

    num_experts: int
    top_k: int
    intermediate_size: int
    normalize: bool
    weights_in_model_dtype: bool
    block: str
    router: str = "gate"
    experts: str = "experts"
    projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # A shared expert (Qwen2-MoE): a SwiGLU MLP this wide (0: none), ``{block}.{shared_expert}``, that every
    # token runs besides its routed experts; its output, scaled by the sigmoid of ``{block}.{shared_gate}``
    # ([1, hidden]), is added to theirs.
    shared_intermediate_size: int = 0
    shared_expert: str = "shared_expert"
    shared_gate: str = "shared_expert_gate"


@dataclass(frozen=True)
class LayerSpec:
    """One decoder layer's attention: its sliding window (a query attends to the keys of the last
    ``sliding_window`` positions, itself included; None: all earlier positions) and which rotary table
    rotates its queries and keys (a key of ``Architecture.rotary``'s tables); and its MLP: a mixture of
    experts (``moe``) or the dense one (None)."""

    sliding_window: int | None = None
    rope: str = ""
    moe: MoESpec | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only model as the shared decoder runs it.

    Norms compute ``x / rms(x) * (norm_offset + w)`` (Gemma: 1 + w). ``attn_scale``: the factor on
    q.k (None: 1 / sqrt(head_dim)); ``attn_softcap``/``final_softcap``: ``c * tanh(x / c)`` on the
    attention scores and on the logits; ``embed_scale``: a factor on the embeddings (Gemma: sqrt(hidden)).
    ``qk_norm``: each head's queries and keys are RMS-normalized (``self_attn.q_norm``/``k_norm``) before
    the rotation. ``rotary_dim``: the rotation covers each head's first ``rotary_dim`` dimensions only
    (partial rotary embeddings, Phi-4-mini), the others pass as they are; None: all of them."""

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
    max_position_embeddings: int
    layers: tuple[LayerSpec, ...]
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    rotary_dim: int | None = None
    norm_offset: float = 0.0
    activation: str = "silu"
    embed_scale: float | None = None
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    names: LayerNames = LayerNames()

    @property
    def kernel_layers(self) -> bool:
        """Whether every layer has Llama's shape as the CPU kernels run it (``PagedModel._layers_fused``):
        SiLU, no sandwich norms, default attention scale, no soft-capping, no window, and a rotation of whole
        heads. Other models run their layers on the torch path (the kernels still serve their norms and
        products)."""
        return (
            self.activation == "silu"
            and self.names.attn_out_norm is None
            and self.names.mlp_out_norm is None
            and self.attn_scale is None
            and self.attn_softcap is None
            and self.rotary_dim is None
            and all(layer.sliding_window is None for layer in self.layers)
        )

    @property
    def kv_window(self) -> int | None:
        """How far back any layer reads: the largest window when every layer has one (a query at position
        p then reads no key before ``p - kv_window + 1``, so the blocks wholly before that leave the
        cache: ``PagedKVCache.slide``); None when some layer attends to every earlier position."""
        windows = [layer.sliding_window for layer in self.layers]
        if not windows or any(w is None for w in windows):
            return None
        return max(w for w in windows if w is not None)

    @property
    def has_experts(self) -> bool:
        """Whether any layer's MLP is a mixture of experts."""
        return any(layer.moe is not None for layer in self.layers)


@dataclass(frozen=True)
class RopeTable:
    """A rotary table's inverse frequencies [head_dim / 2] and the factor on its cos/sin. LongRoPE (Phi-3):
    ``long_inv_freq`` rotates the positions from ``long_from`` (``original_max_position_embeddings``) on,
    and every position of a sequence that holds more tokens than that (``layers.Rotary``)."""

    inv_freq: torch.Tensor
    scaling: float
    long_inv_freq: torch.Tensor | None = None
    long_from: int | None = None


@dataclass(frozen=True)
class Architecture:
    """One model type family's differences over the shared decoder: how its config reads as a
    ``ModelSpec``, and its rotary tables (by ``LayerSpec.rope`` key) from transformers' own rotary
    embedding for that config."""

    model_types: tuple[str, ...]
    spec: Callable[[Any], ModelSpec]
    rotary: Callable[[Any], dict[str, RopeTable]]


def rope_tables(module: nn.Module, keys: tuple[str, ...] = ("",)) -> dict[str, RopeTable]:
    """The tables of a transformers rotary embedding module: its ``inv_freq`` and ``attention_scaling``
    (key ""), or per layer type ``{type}_inv_freq`` and ``{type}_attention_scaling`` (Gemma 3)."""
    tables = {}
    for key in keys:
        prefix = f"{key}_" if key else ""
        inv_freq = getattr(module, f"{prefix}inv_freq")
        tables[key] = RopeTable(inv_freq, float(getattr(module, f"{prefix}attention_scaling")))
    return tables


def config_spec(config: Any, layers: tuple[LayerSpec, ...] | None = None, **differences: Any) -> ModelSpec:
    """A spec with the sizes every decoder-only config names alike (``head_dim`` when given, else hidden
    over heads), global attention on every layer unless ``layers`` says otherwise, and an architecture's
    ``differences`` (``ModelSpec``'s other fields)."""
    heads = config.num_attention_heads
    num_layers = config.num_hidden_layers
    return ModelSpec(
        model_type=config.model_type,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        vocab_size=config.vocab_size,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        max_position_embeddings=config.max_position_embeddings,
        layers=layers if layers is not None else (LayerSpec(),) * num_layers,
        **differences,
    )


def require_silu(config: Any) -> None:
    """SwiGLU's SiLU is the only activation these families run (a config without one means SiLU)."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"activation {act!r}")


SLIDING, FULL = "sliding_attention", "full_attention"


def sliding_layers(config: Any, per_layer: bool) -> tuple[LayerSpec, ...]:
    """Each layer's window as transformers applies it. ``per_layer`` False (Mistral, whose model ignores
    ``layer_types``): ``sliding_window`` on every layer when set. True (Qwen2): the layers that
    ``layer_types`` marks ``sliding_attention``; Qwen2's config makes them from ``use_sliding_window``
    (which else clears ``sliding_window``) and ``max_window_layers`` (layers from that index on slide).

    A window covers a query and the ``window - 1`` positions before it (transformers' ``kv_idx > q_idx -
    window``). A window no shorter than ``max_position_embeddings`` never masks a key (no position
    reaches that far) and counts as global attention, which keeps the CPU attention kernel."""
    window = getattr(config, "sliding_window", None)
    if window is not None and window >= config.max_position_embeddings:
        window = None
    count = config.num_hidden_layers
    if not per_layer:
        return (LayerSpec(sliding_window=window),) * count
    kinds = list(getattr(config, "layer_types", None) or [FULL] * count)
    unknown = sorted(set(kinds) - {SLIDING, FULL})
    if unknown or len(kinds) != count:
        raise UnsupportedModelError(f"layer_types {unknown or kinds}")
    if SLIDING in kinds and getattr(config, "sliding_window", None) is None:
        raise UnsupportedModelError("sliding_attention layers without a sliding_window")
    return tuple(LayerSpec(sliding_window=window if kind == SLIDING else None) for kind in kinds)


def refuse_sliding_window(config: Any, default_on: bool = False) -> None:
    """For the families not wired to ``sliding_layers`` yet: a window (``sliding_window`` with
    ``use_sliding_window``) shorter than the context is refused by name rather than ignored."""
    window = getattr(config, "sliding_window", None)
    if (
        window
        and getattr(config, "use_sliding_window", default_on)
        and window < config.max_position_embeddings
    ):
        raise UnsupportedModelError(f"sliding-window attention ({window} tokens)")
