"""RouterConfig: one frozen dataclass for the router process; each field that is a flag declares it here,
with its default (common/flags.py). The launcher builds it and hands it over as a file (``--config``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.batching import MAX_BATCH_PREFILL_TOKENS, MAX_WAITING_TOKENS, WAITING_SERVED_RATIO
from common.flags import DEFAULT_UDS_PATH, flag
from common.tracing import ROUTER_SERVICE_NAME, check_otlp_endpoint

from .chat import ChatWrapping, load_chat_template


@dataclass(frozen=True)
class RouterConfig:
    tokenizer_name: str = flag(help="Model directory or hub id of the tokenizer.")
    model_id: str = flag(help="Model id reported by /info (default: the tokenizer name).")
    model_sha: str | None = flag(None, help="Model revision hash reported by /info.")
    model_weights: str = flag("", help="What weights are served, for /info.")
    revision: str | None = flag(None, help="Hub revision of the tokenizer.")
    shard_uds_path: str = flag(DEFAULT_UDS_PATH, help="Shard socket prefix (rank 0's is {prefix}-0).")
    num_shard: int = flag(1, help="Ranks of the server, for /info.")
    hostname: str = flag("0.0.0.0", help="Address to listen on.")
    port: int = flag(3000, help="HTTP port.")
    max_concurrent_requests: int = flag(128, help="Sequences in flight before 429.")
    max_best_of: int = flag(2, help="Largest TGI best_of, OpenAI n and best_of.")
    max_stop_sequences: int = flag(4, help="Most stop sequences per request.")
    max_top_n_tokens: int = flag(5, help="Largest top_n_tokens.")
    max_input_length: int = flag(1024, help="Most prompt tokens.")
    max_total_tokens: int = flag(2048, help="Most prompt + new tokens per request.")
    # The shard schedules; the router reports these in /info (common/batching.py).
    waiting_served_ratio: float = flag(WAITING_SERVED_RATIO, help="Reported in /info (the shards schedule).")
    max_batch_prefill_tokens: int = flag(MAX_BATCH_PREFILL_TOKENS, help="Token cap of one prefill.")
    max_batch_total_tokens: int | None = flag(
        None, help="Token cap of the running batch (default: from warm-up, else 16000)."
    )
    max_waiting_tokens: int = flag(MAX_WAITING_TOKENS, help="Reported in /info (the shards schedule).")
    validation_workers: int = flag(2, help="Tokenizer threads.")
    cors_allow_origin: tuple[str, ...] = flag((), help="Allowed CORS origin (repeatable; * for any).")
    json_output: bool = flag(False, help="Log JSON lines.")
    # OpenTelemetry traces (router/tracing.py): None, no tracer at all.
    otlp_endpoint: str | None = flag(
        None, help="OTLP/gRPC collector for traces, e.g. http://localhost:4317.", parse=check_otlp_endpoint
    )
    otlp_service_name: str = flag(ROUTER_SERVICE_NAME, help="Service name of the router's spans.")
    pipeline_tag: str = "text-generation"
    # Names the OpenAI routes accept in `model` (the first is reported); default: model_id.
    served_model_names: tuple[str, ...] = flag(
        (), name="served_model_name", help="Name(s) for `model` on OpenAI routes (repeatable)."
    )
    # The chat template's text (it overrides the model's template); TGICHAT_* wrapping when set.
    chat_template: str | None = flag(
        None, help="Chat template: a Jinja file or string.", parse=load_chat_template
    )
    chat_wrapping: ChatWrapping | None = None
    # router/agent.py: the tool-call format (auto: from the chat template and tokenizer, else hermes with
    # the generic rendering) and the reasoning format (auto: from the chat template; none: off).
    tool_call_parser: str = flag(
        "auto",
        help="Tool-call format: auto, hermes, llama3_json, mistral, pythonic, or a plugin's "
        "(text_generation.tool_parsers).",
    )
    reasoning_parser: str = flag(
        "auto",
        help="Reasoning format: auto (from the chat template), none, think (deepseek_r1, qwen3), gpt_oss, "
        "or a plugin's (text_generation.reasoning_parsers).",
    )
    # vLLM's behaviour: a `model` that is not a served name gets 404 (default: any name is served).
    strict_model_name: bool = flag(
        False, help="Answer 404 to a `model` that is not a served name (default: any name is served)."
    )
    # vLLM's runtime LoRA routes (/v1/load_lora_adapter, /v1/unload_lora_adapter): off by default, since
    # they read the server's disk (router/lora_api.py).
    enable_lora_runtime_updates: bool = flag(
        False, help="Serve /v1/load_lora_adapter and /v1/unload_lora_adapter (they read the server's disk)."
    )
    # Bearer token required on every route but /health (and /metrics unless metrics_require_auth). It
    # comes from the API_KEY environment variable, never from a command line or a config file.
    api_key: str | None = field(default=None, metadata={"secret": True})
    metrics_require_auth: bool = flag(False, help="Require the API key on /metrics too.")
    payload_limit: int = flag(2_000_000, help="Largest request body in bytes.")
    graceful_termination_timeout: float = flag(
        90.0, help="Seconds in-flight requests get to finish after SIGTERM."
    )
    # Test-only: honour the `fault` request parameter (see shard/faults.py).
    fault_injection: bool = flag(False, help="Test only: honour the `fault` request parameter.", hidden=True)
    # Optional plugins enabled with --plugin: their router extensions add routes and middlewares.
    plugins: tuple[str, ...] = flag((), name="plugin", help="Enable an optional plugin (repeatable).")

    @property
    def model_names(self) -> tuple[str, ...]:
        return self.served_model_names or (self.model_id,)

    def shard_socket(self) -> str:
        """Rank 0's socket: rank 0 relays the calls to the other ranks (shard/relay.py), which may run on
        other machines; ``num_shard`` is what /info reports."""
        return f"{self.shard_uds_path}-0"
