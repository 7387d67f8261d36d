"""Qwen3: Llama's decoder with each head's queries and keys RMS-normalized before the rotation, and a
``head_dim`` of its own (not hidden / heads)."""

from __future__ import annotations

from typing import Any

from ..spec import (
    Architecture,
    ModelSpec,
    RopeTable,
    config_spec,
    refuse_sliding_window,
    require_silu,
    rope_tables,
)


def spec(config: Any) -> ModelSpec:
    require_silu(config)
    refuse_sliding_window(config)
    bias = bool(config.attention_bias)
    return config_spec(config, qkv_bias=bias, o_bias=bias, qk_norm=True)


def rotary(config: Any) -> dict[str, RopeTable]:
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

    return rope_tables(Qwen3RotaryEmbedding(config))


ARCH = Architecture(("qwen3",), spec, rotary)
