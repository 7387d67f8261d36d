"""Mixtral: Llama's decoder with a mixture of experts for every MLP (``block_sparse_moe``: a router
``gate`` and experts whose ``w1``, ``w3`` and ``w2`` are SwiGLU's gate, up and down); the router's top-k
probabilities are renormalized to sum to 1 and scale the experts' outputs in float32."""

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


def spec(config: Any) -> ModelSpec:
    require_silu(config)
    refuse_sliding_window(config, default_on=True)
    moe = MoESpec(
        num_experts=config.num_local_experts,
        top_k=config.num_experts_per_tok,
        intermediate_size=config.intermediate_size,
        normalize=True,
        weights_in_model_dtype=False,
        block="block_sparse_moe",
        projections=("w1", "w3", "w2"),
    )
    return config_spec(config, (LayerSpec(moe=moe),) * config.num_hidden_layers)


def rotary(config: Any) -> dict[str, RopeTable]:
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    return rope_tables(MixtralRotaryEmbedding(config))


ARCH = Architecture(("mixtral",), spec, rotary)
