"""The paged backend's KV pool: --max-batch-total-tokens sizes it exactly, or is refused with its numbers;
--cuda-memory-fraction is refused where it cannot apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shard.backends import load_backend
from shard.backends.paged import PagedBackend, kv_budget_bytes
from shard.config import ConfigError, ShardConfig

pytestmark = pytest.mark.timeout(120)

CPU = torch.device("cpu")


@pytest.mark.parametrize(("tokens", "pool"), [(512, 512), (100, 112), (16, 16), (1, 16)])
def test_the_pool_holds_exactly_the_tokens_asked_for_in_whole_blocks(
    tiny_model_dir: Path, tokens: int, pool: int
) -> None:
    backend = PagedBackend(tiny_model_dir, CPU, kv_cache_tokens=tokens)
    assert backend.cache.num_tokens == pool
    assert backend.max_supported_total_tokens() == pool
    assert backend.stats()["tokens_total"] == pool


def test_the_shard_config_sizes_the_pool_through_load(tiny_model_dir: Path) -> None:
    backend = load_backend(ShardConfig(model_path=tiny_model_dir, max_batch_total_tokens=300), CPU)
    assert isinstance(backend, PagedBackend) and backend.cache.num_tokens == 304


def test_a_pool_past_its_memory_is_refused_with_both_numbers(tiny_model_dir: Path) -> None:
    # The tiny model: 2 layers x K and V x 2 KV heads x 16 dims x 4 bytes = 512 bytes a token.
    with pytest.raises(ConfigError) as e:
        PagedBackend(tiny_model_dir, CPU, kv_cache_bytes=64 * 512, kv_cache_tokens=65)
    message = str(e.value)
    assert message.startswith(
        "`max_batch_total_tokens` (65) is more than the 64 tokens the KV cache can hold"
    )
    assert "(512 bytes each)" in message
    # Exactly what fits is accepted.
    assert (
        PagedBackend(tiny_model_dir, CPU, kv_cache_bytes=64 * 512, kv_cache_tokens=64).cache.num_tokens == 64
    )


def test_a_pool_past_the_hosts_memory_is_refused(tiny_model_dir: Path) -> None:
    available = kv_budget_bytes(CPU, sized=True)
    tokens = available // 512 + 2**20
    with pytest.raises(
        ConfigError, match=rf"`max_batch_total_tokens` \({tokens}\) is more than the \d+ tokens"
    ):
        PagedBackend(tiny_model_dir, CPU, kv_cache_tokens=tokens)


def test_without_a_size_the_pool_is_the_memory_budget_as_before(tiny_model_dir: Path) -> None:
    backend = PagedBackend(tiny_model_dir, CPU, kv_cache_bytes=2 * 2**20)
    assert backend.cache.num_tokens == 2 * 2**20 // 512
    # A sized pool may take the host's available memory; the default takes a capped share of it.
    assert kv_budget_bytes(CPU, sized=True) >= kv_budget_bytes(CPU)


def test_cuda_memory_fraction_is_refused_on_the_cpu(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"`cuda_memory_fraction` \(0.5\) applies to CUDA devices, not cpu"):
        load_backend(ShardConfig(model_path=tiny_model_dir, cuda_memory_fraction=0.5), CPU)
