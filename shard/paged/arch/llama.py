"""Llama, Mistral and Qwen2: the shared decoder as it is (SwiGLU, pre-norms, one rotary table).

Llama's ``attention_bias`` puts a bias on every attention projection, o included; Qwen2 has one on q/k/v
only. ``mlp_bias``: biases on gate, up and down. Mistral's ``sliding_window`` applies to every layer;
Qwen2's to the layers its ``layer_types`` mark (``use_sliding_window``, ``max_window_layers``): see
``spec.sliding_layers``. Llama has no window.
"""

from __future__ import annotations

from typing import Any

from ..spec import (
    Architecture,
    ModelSpec,
    RopeTable,
    config_spec,
    require_silu,
    rope_tables,
    sliding_layers,
)


def spec(config: Any) -> ModelSpec:
    require_silu(config)
    kind = config.model_type
    layers = None if kind == "llama" else sliding_layers(config, per_layer=kind == "qwen2")
    attention_bias = bool(getattr(config, "attention_bias", False))
    return config_spec(
        config,
        layers,
        qkv_bias=config.model_type == "qwen2" or attention_bias,
        o_bias=config.model_type != "qwen2" and attention_bias,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
    )


def rotary(config: Any) -> dict[str, RopeTable]:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return rope_tables(LlamaRotaryEmbedding(config))


ARCH = Architecture(("llama", "mistral", "qwen2"), spec, rotary)
