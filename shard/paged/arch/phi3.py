"""Phi-3 (and Phi-4 models of its shape): Llama's decoder with q/k/v in one ``qkv_proj`` and gate/up in one
``gate_up_proj`` checkpoint tensor (each rank reads its slices of them). LongRoPE scaling and partial
rotary embeddings are refused by name (the transformers backend runs them)."""

from __future__ import annotations

from typing import Any

from ..spec import (
    Architecture,
    LayerNames,
    ModelSpec,
    RopeTable,
    UnsupportedModelError,
    config_spec,
    refuse_sliding_window,
    require_silu,
    rope_tables,
)


def spec(config: Any) -> ModelSpec:
    require_silu(config)
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedModelError(f"{rope['rope_type']} rotary scaling (LongRoPE) on phi3")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"partial rotary embedding ({rope['partial_rotary_factor']}) on phi3")
    refuse_sliding_window(config, default_on=True)
    return config_spec(config, names=LayerNames(fused_qkv=True, fused_gate_up=True))


def rotary(config: Any) -> dict[str, RopeTable]:
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    return rope_tables(Phi3RotaryEmbedding(config))


ARCH = Architecture(("phi3",), spec, rotary)
