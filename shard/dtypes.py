"""The shard's dtypes: ``--dtype``'s names and the default per device (every backend uses them)."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU; bfloat16 on CUDA where supported, else float16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
