"""ShardConfig: everything one shard process needs; each field that is a flag declares it here, with its
default (common/flags.py). The launcher builds one per rank and hands it over as a file (``--config``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.batching import MAX_BATCH_PREFILL_TOKENS, MAX_WAITING_TOKENS, WAITING_SERVED_RATIO
from common.cuda_graphs import parse_cuda_graphs
from common.flags import DEFAULT_UDS_PATH, flag
from common.lora import parse_lora_adapters
from common.tracing import SHARD_SERVICE_NAME, check_otlp_endpoint


class ConfigError(ValueError):
    """A setting this shard cannot honour on its device, named with its numbers: the shard exits 1 with
    the message (no traceback), and the launcher shows it."""


@dataclass(frozen=True)
class ShardConfig:
    model_path: Path = flag(help="Local model directory (config, safetensors, tokenizer).", argument=True)
    uds_path: str = flag(DEFAULT_UDS_PATH, help="Socket prefix; the rank is appended.")
    dtype: str | None = flag(None, help="float32, float16 or bfloat16.")
    quantize: str | None = flag(None, help="int8, int4, bitsandbytes(-nf4/-fp4) or ct2.")
    trust_remote_code: bool = flag(False, help="Run modelling code from the hub.")
    backend: str = flag("auto", help="auto, paged, transformers, or a backend plugin's name.")
    # This process's rank and the ranks of the server (the RANK and WORLD_SIZE environment variables).
    rank: int = 0
    world_size: int = 1
    # Test-only fault hooks (shard/faults.py); off unless the launcher's --fault-injection is given.
    fault_injection: bool = flag(False, help="Test only: honour fault hooks.", hidden=True)
    # --quantize ct2: compute threads per step (0: the cores available) and batches run side by side.
    ct2_threads: int = flag(0, help="--quantize ct2: compute threads per step (0: the cores available).")
    ct2_max_batches: int = flag(32, help="--quantize ct2: CTranslate2 batches running side by side.")
    # Batch sizes whose decode steps the paged backend captures as CUDA graphs: None, its default
    # ladder; (), none (--cuda-graphs 0).
    cuda_graphs: tuple[int, ...] | None = flag(
        None, help="Batch sizes captured as CUDA graphs (0: none; default: 1 to 256).", cli_type=str | None,
        parse=parse_cuda_graphs,
    )  # fmt: skip
    # TGI's --disable-custom-kernels: plain torch operations only, no compiled CPU kernels
    # (shard/paged/kernels.py) and no CUDA graphs.
    disable_custom_kernels: bool = flag(False, help="No compiled CPU kernels, no CUDA graphs.")
    # Optional plugins enabled with --plugin (common/plugins.py); built-in ones are always loaded.
    plugins: tuple[str, ...] = flag((), name="plugin", help="Enable an optional plugin (repeatable).")
    # The watermark processor's green-list fraction and logit boost (TGI's --watermark-gamma/-delta).
    watermark_gamma: float = flag(0.5, help="Watermark green-list fraction.")
    watermark_delta: float = flag(2.0, help="Watermark green-list logit boost.")
    # --max-batch-total-tokens: the paged backend's KV pool in tokens (None: as many as its memory budget
    # holds); other backends leave it to the router, whose token budget it is.
    max_batch_total_tokens: int | None = flag(
        None, help="Paged backend: the KV pool in tokens (default: what memory allows)."
    )
    # TGI's batching flags, which the engine core honours (shard/core.py): the prompt tokens of a step that
    # runs new prompts only (every engine), and for the engines that do not schedule for themselves
    # (transformers, ct2) when waiting requests join a running batch.
    max_batch_prefill_tokens: int = flag(
        MAX_BATCH_PREFILL_TOKENS, help="Prompt tokens of a step that runs new prompts only."
    )
    waiting_served_ratio: float = flag(
        WAITING_SERVED_RATIO, help="Transformers, ct2: waiting/running ratio at which waiting requests join."
    )
    max_waiting_tokens: int = flag(
        MAX_WAITING_TOKENS, help="Transformers, ct2: steps after which waiting requests join."
    )
    # --speculate: most draft tokens per running sequence and step (n-gram lookup, shard/speculation.py);
    # None: the paged engine's default where drafting pays, 0: none. Other backends refuse a number.
    speculate: int | None = flag(
        None,
        help="Paged backend: most draft tokens per sequence and step (0: none; default: 8 where it pays, 0 with int8/int4).",
    )
    # --cuda-memory-fraction: the share of each CUDA device this process may use.
    cuda_memory_fraction: float = flag(1.0, help="Share of each CUDA device this process may use.")
    # --lora-adapters: PEFT LoRA adapters as ``name=directory`` entries (the launcher resolves hub ids to
    # directories; LORA_ADAPTERS is the launcher's, whose environment the shards inherit); paged backend
    # (shard/paged/lora.py).
    lora_adapters: tuple[str, ...] = flag(
        (), help="Paged backend: LoRA adapters, name=directory,...", cli_type=str | None,
        parse=parse_lora_adapters,
    )  # fmt: skip
    # --max-loras: the most adapters on the device at once, and in one step (None: every adapter loaded).
    max_loras: int | None = flag(
        None, help="Paged backend: the most LoRA adapters on the device and in a step."
    )
    # --max-lora-rank: an adapter of a higher rank is refused at load (None: any rank).
    max_lora_rank: int | None = flag(
        None, help="Paged backend: the highest LoRA adapter rank loaded (default: any)."
    )
    json_output: bool = flag(False, help="Log JSON lines.")
    # OpenTelemetry traces of rank 0's steps (shard/tracing.py): None, no tracer at all.
    otlp_endpoint: str | None = flag(
        None, help="OTLP/gRPC collector for traces, e.g. http://localhost:4317.", parse=check_otlp_endpoint
    )
    otlp_service_name: str = flag(SHARD_SERVICE_NAME, help="Service name of the shard's spans.")

    @property
    def socket_path(self) -> str:
        """The Unix socket of this rank: ``{uds_path}-{rank}``, as TGI."""
        return f"{self.uds_path}-{self.rank}"
