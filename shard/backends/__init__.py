"""Model backends behind one small protocol (``base.Backend``); ``load_backend`` picks one by name."""

from __future__ import annotations

import torch

from ..config import ShardConfig
from .base import Backend

BACKENDS = ("transformers",)


def load_backend(config: ShardConfig, device: torch.device) -> Backend:
    """Builds the backend ``config.backend`` names, or fails with a message listing the known ones."""
    if config.quantize:
        raise ValueError(f"--quantize {config.quantize} is not supported yet")
    if config.backend == "transformers":
        from .hf import HFBackend

        return HFBackend(config.model_path, device, config.dtype, config.trust_remote_code)
    raise ValueError(f"unknown backend {config.backend!r}; known: {', '.join(BACKENDS)}")
