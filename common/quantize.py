"""Quantization facts shared by the launcher (argument checks, the CTranslate2 conversion) and the shard.

- bitsandbytes (``bitsandbytes``, ``bitsandbytes-nf4``, ``bitsandbytes-fp4``): the transformers backend
  quantizes the weights while loading them; the compute dtype follows ``--dtype``.
- CTranslate2 (``ct2``): the launcher converts the model once into the weights cache, keyed by model,
  revision and compute type; the shard runs it with ``ctranslate2.Generator`` (shard/ct2_engine.py).

The optional libraries are imported only where they are used, with an error that says how to install them.
"""

from __future__ import annotations

import importlib.util
import os

BITSANDBYTES = {"bitsandbytes": "int8", "bitsandbytes-nf4": "nf4", "bitsandbytes-fp4": "fp4"}
CT2 = "ct2"
INSTALL_HINT = 'pip install "text-generation-server[quantize]" (bitsandbytes, ctranslate2, accelerate)'

# --dtype -> CTranslate2 compute type: int8 weights, activations in the given float type.
CT2_COMPUTE_TYPES = {"float16": "int8_float16", "bfloat16": "int8_bfloat16", "float32": "int8_float32"}

# What the CTranslate2 engine cannot honour: the router refuses requests that use them (422/400 naming
# the field). ctranslate2 has no such sampling steps, and its random generator is one per worker thread,
# seeded once, so one request's sampling cannot be seeded.
CT2_UNSUPPORTED_PARAMETERS = (
    "typical_p",
    "frequency_penalty",
    "presence_penalty",
    "min_p",
    "logit_bias",
    "seed",
    "min_new_tokens",
)


class MissingLibraryError(RuntimeError):
    pass


def missing_libraries(quantize: str | None) -> list[str]:
    """The Python packages ``--quantize quantize`` needs that are not installed."""
    needed: tuple[str, ...]
    if quantize in BITSANDBYTES:
        needed = ("bitsandbytes", "accelerate")
    elif quantize == CT2:
        needed = ("ctranslate2",)
    else:
        return []
    return [name for name in needed if importlib.util.find_spec(name) is None]


def require(quantize: str) -> None:
    missing = missing_libraries(quantize)
    if missing:
        raise MissingLibraryError(
            f"--quantize {quantize} needs {', '.join(missing)}, which is not installed: {INSTALL_HINT}"
        )


def ct2_device() -> str:
    """Where CTranslate2 runs: the GPU when it sees one, else the CPU."""
    import ctranslate2

    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def ct2_compute_type(dtype: str | None, device: str) -> str:
    """int8 on CPU, int8_float16 on CUDA; ``--dtype`` picks the activations' type (int8_<dtype>).

    Raises ValueError for a type the device cannot run (CTranslate2's CPU kernels have no float16)."""
    compute_type = CT2_COMPUTE_TYPES[dtype] if dtype else ("int8_float16" if device == "cuda" else "int8")
    import ctranslate2

    supported = ctranslate2.get_supported_compute_types(device)
    if compute_type not in supported:
        raise ValueError(
            f"--quantize ct2 with --dtype {dtype} needs the compute type {compute_type}, which CTranslate2 "
            f"cannot run on {device} (it can: {', '.join(sorted(supported))}); leave --dtype out"
        )
    return compute_type


def cores_available() -> int:
    """The CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
