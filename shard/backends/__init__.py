"""Model backends behind one small protocol (``base.Backend``); ``load_backend`` picks one by name.

- ``paged``: the Llama-family runner (shard/paged/): paged KV cache, prefix caching, no padding.
- ``transformers``: any transformers causal LM, with a left-padded resident KV cache.
- ``auto`` (the default): ``paged`` for the architectures it covers, else ``transformers``.

``--quantize bitsandbytes[-nf4|-fp4]`` runs on ``transformers`` (weights quantized at load);
``--quantize ct2`` on ``ct2.CT2Backend``, which brings its own engine (shard/ct2_engine.py).
"""

from __future__ import annotations

import logging

import torch

from common.quantize import BITSANDBYTES, CT2

from ..config import ShardConfig
from ..paged.layers import Parallel
from .base import Backend

log = logging.getLogger(__name__)

BACKENDS = ("auto", "paged", "transformers")
# Weight-only quantization of the paged backend (shard/paged/quant.py).
PAGED_QUANTIZE = ("int8", "int4")


def load_backend(config: ShardConfig, device: torch.device, parallel: Parallel | None = None) -> Backend:
    """Builds the backend ``config.backend`` names, or fails with a message listing the known ones.
    With several ranks (``parallel``), only the paged backend can shard the model."""
    parallel = parallel or Parallel()
    if parallel.world_size > 1 and (
        config.quantize in (CT2, *BITSANDBYTES) or config.backend == "transformers"
    ):
        raise ValueError(
            f"{config.quantize or config.backend} cannot be sharded over {parallel.world_size} ranks"
        )
    if config.quantize == CT2:
        if config.backend != "auto":
            raise ValueError("--quantize ct2 runs on its own CTranslate2 engine: leave --backend at auto")
        from common.quantize import cores_available

        from .ct2 import CT2Backend

        threads = config.ct2_threads or cores_available()
        return CT2Backend(config.model_path, config.dtype, threads, config.ct2_max_batches)
    if config.quantize in BITSANDBYTES:
        if config.backend == "paged":
            raise ValueError(f"--quantize {config.quantize} runs on the transformers backend, not paged")
        from .hf import HFBackend

        return HFBackend(
            config.model_path, device, config.dtype, config.trust_remote_code, quantize=config.quantize
        )
    paged_quantize = config.quantize in PAGED_QUANTIZE
    if config.quantize and not paged_quantize:
        raise ValueError(f"--quantize {config.quantize} is not supported yet")
    if paged_quantize and (config.backend == "transformers" or config.trust_remote_code):
        raise ValueError(f"--quantize {config.quantize} needs the paged backend (not transformers)")
    if config.backend not in BACKENDS:
        raise ValueError(f"unknown backend {config.backend!r}; known: {', '.join(BACKENDS)}")
    if config.backend in ("auto", "paged") and not config.trust_remote_code:
        from ..paged.model import UnsupportedModelError
        from .paged import PagedBackend

        try:
            quantize = config.quantize if paged_quantize else None
            return PagedBackend(config.model_path, device, config.dtype, parallel, quantize=quantize)
        except UnsupportedModelError as e:
            if config.backend == "paged" or paged_quantize:
                needed = f" (--quantize {config.quantize} needs it)" if paged_quantize else ""
                raise ValueError(f"the paged backend cannot run this model{needed}: {e}") from None
            if parallel.world_size > 1:
                raise ValueError(f"this model cannot be sharded: {e}") from None
            log.info("Paged backend not applicable (%s): using transformers", e)
    from .hf import HFBackend

    return HFBackend(config.model_path, device, config.dtype, config.trust_remote_code)
