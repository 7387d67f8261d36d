"""Model backends behind one small protocol (``base.Backend``); ``load_backend`` picks one by name.

- ``paged``: the Llama-family runner (shard/paged/): paged KV cache, prefix caching, no padding.
- ``transformers``: any transformers causal LM, with a left-padded resident KV cache.
- ``auto`` (the default): ``paged`` for the architectures it covers, else ``transformers``.
"""

from __future__ import annotations

import logging

import torch

from ..config import ShardConfig
from .base import Backend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "paged", "transformers")


def load_backend(config: ShardConfig, device: torch.device) -> Backend:
    """Builds the backend ``config.backend`` names, or fails with a message listing the known ones."""
    if config.quantize:
        raise ValueError(f"--quantize {config.quantize} is not supported yet")
    if config.backend not in BACKENDS:
        raise ValueError(f"unknown backend {config.backend!r}; known: {', '.join(BACKENDS)}")
    if config.backend in ("auto", "paged") and not config.trust_remote_code:
        from ..paged.model import UnsupportedModelError
        from .paged import PagedBackend

        try:
            return PagedBackend(config.model_path, device, config.dtype)
        except UnsupportedModelError as e:
            if config.backend == "paged":
                raise ValueError(f"the paged backend cannot run this model: {e}") from None
            log.info("Paged backend not applicable (%s): using transformers", e)
    from .hf import HFBackend

    return HFBackend(config.model_path, device, config.dtype, config.trust_remote_code)
