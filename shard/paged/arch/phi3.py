"""Phi-3 (and Phi-4 models of its shape): Llama's decoder with q/k/v in one ``qkv_proj`` and gate/up in one
``gate_up_proj`` checkpoint tensor (each rank reads its slices of them), and LongRoPE scaling.

LongRoPE (``rope_type`` ``longrope``: ``short_factor``, ``long_factor``, ``original_max_position_embeddings``
and an attention factor, given or derived from ``max_position_embeddings`` over the original length) as
transformers runs it: a forward call rotates its tokens with the long factors when its last position is
``original_max_position_embeddings`` or later, else with the short ones; and ``generate`` drops a
sequence's cache at its first token past that point and runs it whole again
(``Phi3ForCausalLM.prepare_inputs_for_generation``), so a sequence is rotated short while it is no longer
than the original length and long, every key of it, from then on. The paged backend does the same: a
sequence holding more tokens than the switch rotates long throughout (``layers.Rotary``), a short one is
run whole again, long, at its first token past it (``backends/paged.py``), and the prefix cache keeps the
two rotations' blocks apart. Partial rotary embeddings (``partial_rotary_factor``: Phi-4-mini) rotate each
head's first dimensions only (``ModelSpec.rotary_dim``), on the torch attention path."""

from __future__ import annotations

from dataclasses import replace
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

ROPE_TYPES = ("default", "longrope")


def rope_parameters(config: Any) -> dict[str, Any]:
    return getattr(config, "rope_parameters", None) or {}


def spec(config: Any) -> ModelSpec:
    require_silu(config)
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise UnsupportedModelError(f"{rope['rope_type']} rotary scaling on phi3")
    refuse_sliding_window(config, default_on=True)
    factor = rope.get("partial_rotary_factor", 1.0)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotary_dim = None if factor == 1.0 else int(head_dim * factor)  # as transformers' rotary embedding
    if rotary_dim is not None and (rotary_dim <= 0 or rotary_dim % 2):
        raise UnsupportedModelError(f"partial rotary embedding over {rotary_dim} of {head_dim} dimensions")
    names = LayerNames(fused_qkv=True, fused_gate_up=True)
    return config_spec(config, names=names, rotary_dim=rotary_dim)


def rotary(config: Any) -> dict[str, RopeTable]:
    """Transformers' own tables: the short factors' (``Phi3RotaryEmbedding`` as built), and with LongRoPE
    the long factors' as its ``longrope_frequency_update`` makes them (the longrope init at
    ``original_max_position_embeddings + 1`` positions); the attention factor is the same for both."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    tables = rope_tables(Phi3RotaryEmbedding(config))
    rope = rope_parameters(config)
    if rope.get("rope_type") != "longrope":
        return tables
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    switch = int(rope["original_max_position_embeddings"])
    long_inv_freq, scaling = ROPE_INIT_FUNCTIONS["longrope"](config, None, seq_len=switch + 1)
    if float(scaling) != tables[""].scaling:
        raise UnsupportedModelError("LongRoPE with different attention factors for short and long")
    return {"": replace(tables[""], long_inv_freq=long_inv_freq, long_from=switch)}


ARCH = Architecture(("phi3",), spec, rotary)
