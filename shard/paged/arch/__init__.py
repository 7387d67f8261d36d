"""The paged runner's architectures, by transformers ``model_type``.

Each module here is one family's differences over the shared decoder (shard/paged/model.py): a function
from its config to a ``ModelSpec`` (sizes, biases, norms, activation, attention scale, soft-capping,
per-layer windows, rotary tables and mixture-of-experts MLPs, tensor names) and its rotary tables. To
add one, write its module and list its ``ARCH`` in ``ARCHITECTURES``; docs/architecture.md tells what
the decoder offers.
"""

from __future__ import annotations

from typing import Any

from ..spec import Architecture, ModelSpec, UnsupportedModelError
from . import gemma, llama, mixtral, phi3, qwen2_moe, qwen3, qwen3_moe

ARCHITECTURES: dict[str, Architecture] = {
    model_type: module.ARCH
    for module in (llama, qwen3, gemma, phi3, mixtral, qwen2_moe, qwen3_moe)
    for model_type in module.ARCH.model_types
}


def architecture(config: Any) -> Architecture:
    """The architecture of a transformers config, or UnsupportedModelError naming its model type."""
    model_type = getattr(config, "model_type", None)
    arch = ARCHITECTURES.get(model_type) if isinstance(model_type, str) else None
    if arch is None:
        raise UnsupportedModelError(f"model type {model_type!r} (supported: {', '.join(ARCHITECTURES)})")
    return arch


def model_spec(config: Any) -> ModelSpec:
    """A transformers config's ``ModelSpec``, by its model type's module; raises UnsupportedModelError for
    what this runner cannot run."""
    return architecture(config).spec(config)
