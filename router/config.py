"""RouterConfig: one frozen dataclass for the router process, built once from its command line."""

from __future__ import annotations

from dataclasses import dataclass, field

from .chat import ChatWrapping


@dataclass(frozen=True)
class RouterConfig:
    tokenizer_name: str
    model_id: str
    model_sha: str | None = None
    model_weights: str = ""
    revision: str | None = None
    shard_uds_path: str = "/tmp/text-generation-server"
    num_shard: int = 1
    hostname: str = "0.0.0.0"
    port: int = 3000
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
    validation_workers: int = 2
    cors_allow_origin: tuple[str, ...] = field(default_factory=tuple)
    json_output: bool = False
    pipeline_tag: str = "text-generation"
    # Names the OpenAI routes accept in `model` (the first is reported); default: model_id.
    served_model_names: tuple[str, ...] = ()
    # --chat-template's text (it overrides the model's template); TGICHAT_* wrapping when set.
    chat_template: str | None = None
    chat_wrapping: ChatWrapping | None = None
    # Bearer token required on every route but /health (and /metrics unless metrics_require_auth).
    api_key: str | None = None
    metrics_require_auth: bool = False
    payload_limit: int = 2_000_000
    graceful_termination_timeout: float = 90.0
    # Test-only: honour the `fault` request parameter (see shard/faults.py).
    fault_injection: bool = False
    # Optional plugins enabled with --plugin: their router extensions add routes and middlewares.
    plugins: tuple[str, ...] = ()

    @property
    def model_names(self) -> tuple[str, ...]:
        return self.served_model_names or (self.model_id,)

    def shard_socket(self) -> str:
        """Rank 0's socket: rank 0 relays the calls to the other ranks (shard/relay.py), which may run on
        other machines; ``num_shard`` is what /info reports."""
        return f"{self.shard_uds_path}-0"
