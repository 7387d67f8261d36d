"""The paged KV cache on a real GPU: --max-batch-total-tokens sizes it exactly, --cuda-memory-fraction
bounds its budget and the torch allocator.

Marked ``gpu``: skipped without CUDA (tests/unit/shard/test_paged_pool.py checks the sizes on the CPU). Run it
in a fresh process (``pytest tests/gpu/test_kv_memory.py``): the allocator's fraction stays set.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shard.backends import load_backend
from shard.backends.paged import CUDA_KV_SHARE, PagedBackend, kv_budget_bytes
from shard.config import ConfigError, ShardConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_a_sized_pool_holds_exactly_its_tokens_on_the_gpu(tiny_model_dir: Path) -> None:
    cuda = torch.device("cuda")
    backend = PagedBackend(tiny_model_dir, cuda, "float32", kv_cache_tokens=1000, cuda_graphs=())
    assert backend.cache.num_tokens == 1008 and backend.max_supported_total_tokens() == 1008
    free, _ = torch.cuda.mem_get_info(cuda)
    too_many = 4 * free // 512  # the tiny model's 512 bytes a token: four times the free memory
    with pytest.raises(ConfigError, match=rf"`max_batch_total_tokens` \({too_many}\) is more than the"):
        PagedBackend(tiny_model_dir, cuda, "float32", kv_cache_tokens=too_many, cuda_graphs=())


def test_the_fraction_bounds_the_budget_and_the_allocator(tiny_model_dir: Path) -> None:
    cuda = torch.device("cuda")
    _, total = torch.cuda.mem_get_info(cuda)
    assert kv_budget_bytes(cuda, memory_fraction=0.25) <= int(0.25 * total * CUDA_KV_SHARE)
    assert kv_budget_bytes(cuda, memory_fraction=0.25) < kv_budget_bytes(cuda)
    load_backend(ShardConfig(model_path=tiny_model_dir, cuda_memory_fraction=0.25), cuda)
    # The allocator refuses this process more than its fraction of the device.
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(int(0.3 * total), dtype=torch.uint8, device=cuda)
