"""Gemma 2 and Gemma 3 (text): (1 + w) RMSNorms, embeddings scaled by sqrt(hidden), GeGLU with tanh GELU,
norms on the attention and MLP outputs besides the pre-norms, ``query_pre_attn_scalar`` for the attention
scale, soft-capped attention scores (Gemma 2) and logits, and layers that alternate between a sliding
window and global attention (``layer_types``). Gemma 3 adds q/k norms and gives its sliding layers a
rotary table of their own (``rope_local_base_freq``)."""

from __future__ import annotations

from typing import Any

from ..spec import (
    Architecture,
    LayerNames,
    LayerSpec,
    ModelSpec,
    RopeTable,
    UnsupportedModelError,
    config_spec,
    rope_tables,
)

SLIDING, FULL = "sliding_attention", "full_attention"
NAMES = LayerNames(
    mlp_norm="pre_feedforward_layernorm",
    attn_out_norm="post_attention_layernorm",
    mlp_out_norm="post_feedforward_layernorm",
)


def spec(config: Any) -> ModelSpec:
    activation = getattr(config, "hidden_activation", None) or config.hidden_act
    if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise UnsupportedModelError(f"activation {activation!r}")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedModelError("bidirectional attention")
    gemma3 = config.model_type == "gemma3_text"
    layers = tuple(
        LayerSpec(
            sliding_window=config.sliding_window if kind == SLIDING else None,
            rope=kind if gemma3 else "",
        )
        for kind in config.layer_types
    )
    bias = bool(getattr(config, "attention_bias", False))
    return config_spec(
        config,
        layers,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=gemma3,
        norm_offset=1.0,
        activation="gelu_tanh",
        embed_scale=config.hidden_size**0.5,
        attn_scale=config.query_pre_attn_scalar**-0.5,
        attn_softcap=getattr(config, "attn_logit_softcapping", None),
        final_softcap=getattr(config, "final_logit_softcapping", None),
        names=NAMES,
    )


def rotary(config: Any) -> dict[str, RopeTable]:
    if config.model_type == "gemma3_text":
        from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

        return rope_tables(Gemma3RotaryEmbedding(config), tuple(sorted(set(config.layer_types))))
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding

    return rope_tables(Gemma2RotaryEmbedding(config))


ARCH = Architecture(("gemma2", "gemma3_text"), spec, rotary)
