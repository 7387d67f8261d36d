"""Qwen2-MoE: Qwen2's decoder (q/k/v biases, ``qkv_bias``) with mixture-of-experts MLPs (``mlp``: a router
``gate``, experts of ``moe_intermediate_size``, and a shared expert of ``shared_expert_intermediate_size``
that every token runs, scaled by the sigmoid of ``shared_expert_gate``) on the layers transformers makes
sparse; the others keep a dense MLP of ``intermediate_size`` (``moe_layers``, which Qwen3-MoE shares)."""

from __future__ import annotations

from typing import Any

from ..spec import (
    Architecture,
    LayerSpec,
    ModelSpec,
    MoESpec,
    RopeTable,
    config_spec,
    refuse_sliding_window,
    require_silu,
    rope_tables,
)


def moe_layers(config: Any, shared_intermediate_size: int = 0) -> tuple[LayerSpec, ...]:
    """Each layer's MLP as transformers' Qwen2-MoE and Qwen3-MoE make it. Sparse on the layers not in
    ``mlp_only_layers`` whose number (from 1) is a multiple of ``decoder_sparse_step`` (when there are
    experts at all): ``num_experts`` experts of ``moe_intermediate_size`` under the router ``mlp.gate``,
    the top-k probabilities renormalized only with ``norm_topk_prob`` and rounded to the model's dtype
    before they scale the experts' outputs, and a shared expert of ``shared_intermediate_size`` (0: none).
    Dense on the others."""
    moe = MoESpec(
        num_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        intermediate_size=config.moe_intermediate_size,
        normalize=bool(config.norm_topk_prob),
        weights_in_model_dtype=True,
        block="mlp",
        shared_intermediate_size=shared_intermediate_size,
    )
    dense = set(config.mlp_only_layers or ())

    def sparse(i: int) -> bool:
        return i not in dense and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0

    return tuple(LayerSpec(moe=moe if sparse(i) else None) for i in range(config.num_hidden_layers))


def spec(config: Any) -> ModelSpec:
    require_silu(config)
    refuse_sliding_window(config)
    layers = moe_layers(config, config.shared_expert_intermediate_size)
    return config_spec(config, layers, qkv_bias=bool(getattr(config, "qkv_bias", True)))


def rotary(config: Any) -> dict[str, RopeTable]:
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeRotaryEmbedding

    return rope_tables(Qwen2MoeRotaryEmbedding(config))


ARCH = Architecture(("qwen2_moe",), spec, rotary)
