"""LauncherConfig: the launcher's flags as one frozen dataclass, with TGI's argument rules."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

QUANTIZE_CHOICES = ("bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "gptq", "ct2")
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
BACKEND_CHOICES = ("auto", "paged", "transformers")


class ArgumentError(ValueError):
    """A flag combination the launcher refuses before starting anything."""


@dataclass(frozen=True)
class LauncherConfig:
    model_id: str | None = None
    revision: str | None = None
    validation_workers: int = 2
    sharded: bool | None = None
    num_shard: int | None = None
    quantize: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    max_concurrent_requests: int = 128
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_length: int = 1024
    max_total_tokens: int = 2048
    waiting_served_ratio: float = 1.2
    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int | None = None
    max_waiting_tokens: int = 20
    hostname: str = "0.0.0.0"
    port: int = 3000
    shard_uds_path: str = "/tmp/text-generation-server"
    master_addr: str = "localhost"
    master_port: int = 29500
    huggingface_hub_cache: Path | None = None
    weights_cache_override: Path | None = None
    json_output: bool = False
    cors_allow_origin: tuple[str, ...] = field(default_factory=tuple)
    served_model_name: tuple[str, ...] = field(default_factory=tuple)
    chat_template: str | None = None
    env: bool = False
    api_key: str | None = None
    metrics_require_auth: bool = False
    payload_limit: int = 2_000_000
    graceful_termination_timeout: float = 90.0
    # Test-only fault hooks (a request parameter that breaks its own step); never on in production.
    fault_injection: bool = False
    # Model backend for the shards: auto (paged where it applies), paged or transformers.
    backend: str = "auto"

    def world_size(self) -> int:
        """TGI's find_num_shards: --num-shard, else the devices in CUDA_VISIBLE_DEVICES, else 1."""
        if self.num_shard is not None:
            return self.num_shard
        devices = os.environ.get("CUDA_VISIBLE_DEVICES") or os.environ.get("NVIDIA_VISIBLE_DEVICES")
        if self.sharded and devices:
            return len([d for d in devices.split(",") if d.strip()])
        return 1

    def validate(self) -> None:
        """Raises ArgumentError on the first rule broken (TGI's rules, then this version's limits)."""
        if self.validation_workers <= 0:
            raise ArgumentError("`validation_workers` must be > 0")
        if self.max_input_length >= self.max_total_tokens:
            raise ArgumentError(
                f"`max_input_length` must be < `max_total_tokens`. Given: {self.max_input_length} "
                f"and {self.max_total_tokens}"
            )
        if self.max_input_length > self.max_batch_prefill_tokens:
            raise ArgumentError(
                f"`max_batch_prefill_tokens` must be >= `max_input_length`. Given: "
                f"{self.max_batch_prefill_tokens} and {self.max_input_length}"
            )
        if self.max_batch_total_tokens is not None:
            if self.max_batch_prefill_tokens > self.max_batch_total_tokens:
                raise ArgumentError(
                    f"`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`. Given: "
                    f"{self.max_batch_prefill_tokens} and {self.max_batch_total_tokens}"
                )
            if self.max_total_tokens > self.max_batch_total_tokens:
                raise ArgumentError(
                    f"`max_total_tokens` must be <= `max_batch_total_tokens`. Given: "
                    f"{self.max_total_tokens} and {self.max_batch_total_tokens}"
                )
        if self.waiting_served_ratio < 0:
            raise ArgumentError("`waiting_served_ratio` must be >= 0")
        if self.payload_limit <= 0:
            raise ArgumentError(f"`payload_limit` must be > 0. Given: {self.payload_limit}")
        if self.graceful_termination_timeout < 0:
            raise ArgumentError(
                f"`graceful_termination_timeout` must be >= 0. Given: {self.graceful_termination_timeout}"
            )
        if self.api_key is not None and not self.api_key.strip():
            raise ArgumentError("`api_key` must not be empty")
        if self.max_concurrent_requests <= 0:
            raise ArgumentError("`max_concurrent_requests` must be > 0")
        if self.backend not in BACKEND_CHOICES:
            raise ArgumentError(
                f"`backend` must be one of {', '.join(BACKEND_CHOICES)}. Given: {self.backend}"
            )
        if self.dtype is not None and self.dtype not in DTYPE_CHOICES:
            raise ArgumentError(f"`dtype` must be one of {', '.join(DTYPE_CHOICES)}. Given: {self.dtype}")
        if self.quantize is not None:
            if self.quantize not in QUANTIZE_CHOICES:
                raise ArgumentError(
                    f"`quantize` must be one of {', '.join(QUANTIZE_CHOICES)}. Given: {self.quantize}"
                )
            raise ArgumentError(f"`--quantize {self.quantize}` is not supported yet")
        if self.num_shard is not None and self.num_shard < 1:
            raise ArgumentError(f"`num_shard` must be >= 1. Given: {self.num_shard}")
        if self.sharded and self.world_size() <= 1:
            raise ArgumentError(
                "`sharded` is true but there is only one shard (set --num-shard or CUDA_VISIBLE_DEVICES)"
            )
        if self.sharded is False and self.world_size() > 1:
            raise ArgumentError(f"`sharded` is false but `num_shard` is {self.world_size()}")
        if self.world_size() > 1:
            raise ArgumentError(
                f"`--num-shard {self.world_size()}`: tensor-parallel sharding is not supported yet; use one shard"
            )
