"""Whether a model can be split over N tensor-parallel ranks: checked by the launcher before any process
starts, with the numbers in the message, and relied upon by the paged backend's layers."""

from __future__ import annotations

from typing import Any

# The architectures the paged backend runs (and so the only ones that shard): shard/paged/arch's registry,
# named here so that the launcher can check a model without importing the shard (a unit test keeps the two
# equal).
PAGED_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
)


def sharding_problem(config: dict[str, Any], world_size: int) -> str | None:
    """Why ``config`` (a config.json) cannot be split over ``world_size`` ranks, or None when it can."""
    if world_size == 1:
        return None
    text = config.get("text_config") or config
    model_type = text.get("model_type")
    if model_type not in PAGED_ARCHITECTURES:
        return (
            f"a {model_type} model cannot be sharded: tensor parallelism needs the paged backend "
            f"({', '.join(PAGED_ARCHITECTURES)})"
        )
    heads = text.get("num_attention_heads", 0)
    kv_heads = text.get("num_key_value_heads") or heads
    for name, value in (
        ("attention heads", heads),
        ("key/value heads", kv_heads),
        ("MLP width (intermediate_size)", text.get("intermediate_size", 0)),
        ("expert MLP width (moe_intermediate_size)", text.get("moe_intermediate_size", 0)),
        (
            "shared expert width (shared_expert_intermediate_size)",
            text.get("shared_expert_intermediate_size", 0),
        ),
    ):
        if value % world_size:
            return f"the model's {value} {name} are not divisible by --num-shard {world_size}"
    return None
