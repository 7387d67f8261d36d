"""Qwen3-MoE: Qwen3's decoder (q/k norms, its own head_dim) with mixture-of-experts MLPs (``mlp``: a router
``gate`` and experts of ``moe_intermediate_size``) on the layers transformers makes sparse: those not in
``mlp_only_layers`` whose number (from 1) is a multiple of ``decoder_sparse_step``; the others keep a
dense MLP of ``intermediate_size``. The top-k probabilities are renormalized only with
``norm_topk_prob``, and are rounded to the model's dtype before they scale the experts' outputs."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..spec import Architecture, LayerSpec, ModelSpec, MoESpec, RopeTable, rope_tables
from . import qwen3


def spec(config: Any) -> ModelSpec:
    moe = MoESpec(
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        intermediate_size=config.moe_intermediate_size,
        normalize=bool(config.norm_topk_prob),
        weights_in_model_dtype=True,
        block="mlp",
    )
    dense = set(config.mlp_only_layers or ())
    sparse = [
        i not in dense and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0
        for i in range(config.num_hidden_layers)
    ]
    return replace(qwen3.spec(config), layers=tuple(LayerSpec(moe=moe if s else None) for s in sparse))


def rotary(config: Any) -> dict[str, RopeTable]:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

    return rope_tables(Qwen3MoeRotaryEmbedding(config))


ARCH = Architecture(("qwen3_moe",), spec, rotary)
