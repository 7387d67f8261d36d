"""Qwen3-MoE: Qwen3's decoder (q/k norms, its own head_dim) with Qwen2-MoE's mixture-of-experts MLPs
without the shared expert (``qwen2_moe.moe_layers``: which layers are sparse, the routing rule)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..spec import Architecture, ModelSpec, RopeTable, rope_tables
from . import qwen3
from .qwen2_moe import moe_layers


def spec(config: Any) -> ModelSpec:
    return replace(qwen3.spec(config), layers=moe_layers(config))


def rotary(config: Any) -> dict[str, RopeTable]:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

    return rope_tables(Qwen3MoeRotaryEmbedding(config))


ARCH = Architecture(("qwen3_moe",), spec, rotary)
