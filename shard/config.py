"""ShardConfig: everything one shard process needs, built once from its command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A setting this shard cannot honour on its device, named with its numbers: the shard exits 1 with
    the message (no traceback), and the launcher shows it."""


@dataclass(frozen=True)
class ShardConfig:
    model_path: Path
    uds_path: str = "/tmp/text-generation-server"
    dtype: str | None = None
    quantize: str | None = None
    trust_remote_code: bool = False
    backend: str = "auto"
    rank: int = 0
    world_size: int = 1
    # Test-only fault hooks (shard/faults.py); off unless the launcher's --fault-injection is given.
    fault_injection: bool = False
    # --quantize ct2: compute threads per step (0: the cores available) and batches run side by side.
    ct2_threads: int = 0
    ct2_max_batches: int = 32
    # Batch sizes whose decode steps the paged backend captures as CUDA graphs: None, its default
    # ladder; (), none (--cuda-graphs 0).
    cuda_graphs: tuple[int, ...] | None = None
    # Optional plugins enabled with --plugin (common/plugins.py); built-in ones are always loaded.
    plugins: tuple[str, ...] = ()
    # The watermark processor's green-list fraction and logit boost (TGI's --watermark-gamma/-delta).
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0
    # --max-batch-total-tokens: the paged backend's KV pool in tokens (None: as many as its memory budget
    # holds); other backends leave it to the router, whose token budget it is.
    max_batch_total_tokens: int | None = None
    # --cuda-memory-fraction: the share of each CUDA device this process may use.
    cuda_memory_fraction: float = 1.0

    @property
    def socket_path(self) -> str:
        """The Unix socket of this rank: ``{uds_path}-{rank}``, as TGI."""
        return f"{self.uds_path}-{self.rank}"
