"""Model backends behind one small protocol (``base.Backend``); ``load_backend`` picks one by name.

Each backend is an entry point of the ``text_generation.backends`` group (pyproject.toml), a factory
``(ShardConfig, device, Parallel) -> Backend``; a plugin package adds its own the same way.

- ``paged``: the Llama-family runner (shard/paged/): paged KV cache, prefix caching, no padding.
- ``transformers``: any transformers causal LM, with a left-padded resident KV cache.
- ``ct2``: CTranslate2 (``--quantize ct2``).
- ``auto`` (the default): ``paged`` for the architectures it covers, else ``transformers``.

``--quantize bitsandbytes[-nf4|-fp4]`` runs on ``transformers`` (weights quantized at load);
``--quantize ct2`` on ``ct2.CT2Backend``, which brings its own engine (shard/ct2_engine.py).
"""

from __future__ import annotations

import logging

import torch

from common import plugins
from common.quantize import BITSANDBYTES, CT2

from ..config import ConfigError, ShardConfig
from ..dist import Parallel
from .base import Backend

log = logging.getLogger(__name__)

# Weight-only quantization of the paged backend (shard/paged/quant.py).
PAGED_QUANTIZE = ("int8", "int4")


def load_backend(config: ShardConfig, device: torch.device, parallel: Parallel | None = None) -> Backend:
    """Builds the backend ``config.backend`` names (``auto`` picks one from the model and ``--quantize``)
    through its entry point in the ``text_generation.backends`` group, where plugins add their own.
    With several ranks (``parallel``), only the paged backend can shard the model."""
    parallel = parallel or Parallel()
    name = backend_name(config)
    if config.cuda_memory_fraction < 1.0:
        fraction = config.cuda_memory_fraction
        if name == "ct2":
            raise ConfigError(f"`cuda_memory_fraction` ({fraction}) cannot bound CTranslate2's own memory")
        if device.type != "cuda":
            raise ConfigError(
                f"`cuda_memory_fraction` ({fraction}) applies to CUDA devices, not {device.type}"
            )
        # The torch allocator's cap for this process (TGI's --cuda-memory-fraction); the paged backend also
        # sizes its KV pool within it.
        torch.cuda.set_per_process_memory_fraction(fraction, device)
    if parallel.world_size > 1 and name != "paged":
        raise ValueError(f"{config.quantize or name} cannot be sharded over {parallel.world_size} ranks")
    if config.lora_adapters and name != "paged":
        raise ConfigError(
            f"`--lora-adapters` needs the paged backend ({config.quantize or name} runs this model)"
        )
    try:
        factory = plugins.find("backends", name).load()
    except plugins.PluginError as e:
        raise ValueError(f"backend {name!r}: {e}") from None
    if name != "paged" or config.backend == "paged":
        return factory(config, device, parallel)
    from ..paged.model import UnsupportedModelError

    try:
        return factory(config, device, parallel)
    except UnsupportedModelError as e:
        if config.quantize in PAGED_QUANTIZE:
            raise ValueError(
                f"the paged backend cannot run this model (--quantize {config.quantize} needs it): {e}"
            ) from None
        if parallel.world_size > 1:
            raise ValueError(f"this model cannot be sharded: {e}") from None
        if config.lora_adapters:
            raise ConfigError(
                f"`--lora-adapters` needs the paged backend, which cannot run this model: {e}"
            ) from None
        log.warning(
            "The paged backend cannot run this model (%s): serving it with transformers, without prefix "
            "caching, chunked prefill, tensor parallelism or int8/int4",
            e,
        )
    return plugins.find("backends", "transformers").load()(config, device, parallel)


def backend_name(config: ShardConfig) -> str:
    """The backend that runs ``config``: its ``--quantize`` mode's, else the one ``--backend`` names
    (``auto``: paged, which falls back to transformers for models it does not cover)."""
    if config.quantize == CT2:
        if config.backend != "auto":
            raise ValueError("--quantize ct2 runs on its own CTranslate2 engine: leave --backend at auto")
        return "ct2"
    if config.quantize in BITSANDBYTES:
        if config.backend == "paged":
            raise ValueError(f"--quantize {config.quantize} runs on the transformers backend, not paged")
        return "transformers"
    if config.quantize and config.quantize not in PAGED_QUANTIZE:
        raise ValueError(f"--quantize {config.quantize} is not supported yet")
    if config.quantize in PAGED_QUANTIZE:
        if config.backend not in ("auto", "paged") or config.trust_remote_code:
            raise ValueError(f"--quantize {config.quantize} needs the paged backend (not {config.backend})")
        return "paged"
    if config.backend == "auto":
        return "transformers" if config.trust_remote_code else "paged"
    return config.backend
