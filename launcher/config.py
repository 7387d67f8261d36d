"""LauncherConfig: the launcher's flags as one frozen dataclass (each declared once, here), with TGI's
argument rules."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from common.cuda_graphs import parse_cuda_graphs
from common.flags import DEFAULT_UDS_PATH, default_of, flag
from common.lora import local_adapters, parse_lora_adapters
from common.quantize import BITSANDBYTES, CT2
from common.sharding import sharding_problem
from common.tracing import check_otlp_endpoint
from router.config import RouterConfig
from router.parsers import parser_problem
from shard.config import ShardConfig

if TYPE_CHECKING:  # shard.dtypes imports torch, which --help need not load
    from shard.dtypes import Checkpoint, CpuFeatures, DtypeChoice

QUANTIZE_CHOICES = ("bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "gptq", "ct2", "int8", "int4")
# The modes that run today: the paged backend's weight-only int8 / int4 (shard/paged/quant.py),
# bitsandbytes on the transformers backend and CTranslate2 (common/quantize.py).
QUANTIZE_SUPPORTED = ("int8", "int4", "bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "ct2")
DTYPE_CHOICES = ("float32", "float16", "bfloat16")
BACKEND_CHOICES = ("auto", "paged", "transformers")


# TGI's --max-input-length and --max-total-tokens when not given (the router's); lowered to fit a model with
# fewer positions.
DEFAULT_MAX_INPUT_LENGTH: int = default_of(RouterConfig, "max_input_length")
DEFAULT_MAX_TOTAL_TOKENS: int = default_of(RouterConfig, "max_total_tokens")
# The keys a config.json names its context length by, in the order they are looked up.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "max_sequence_length", "seq_length")


# The longest path a Unix socket address holds (sun_path, less its terminating NUL).
MAX_SOCKET_PATH = 107


class ArgumentError(ValueError):
    """A flag combination the launcher refuses before starting anything."""


def model_positions(model_config: dict) -> tuple[int, str] | None:
    """The positions the model declares and the key that declares them (None when it declares none)."""
    text = model_config.get("text_config") or model_config
    for key in POSITION_KEYS:
        value = text.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, key
    return None


def parse_bool(value: str) -> bool:
    """TGI's value-taking booleans (``--sharded true``)."""
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"must be true or false. Given: {value}")


def _router(name: str) -> object:
    return default_of(RouterConfig, name)


def _shard(name: str) -> object:
    return default_of(ShardConfig, name)


@dataclass(frozen=True)
class LauncherConfig:
    """TGI v0.9.4's flags, each also read from its UPPER_SNAKE environment variable (launcher/cli.py makes
    the command line from these fields). A flag the launcher passes on takes its default from the child's
    config (router/config.py, shard/config.py)."""

    model_id: str | None = flag(
        None, help="Hub id, local directory or .gguf file; default: the embedded SmolLM2-135M-Instruct."
    )
    revision: str | None = flag(None, help="Hub revision (branch, tag or commit).")
    validation_workers: int = flag(_router("validation_workers"), help="Tokenizer threads in the router.")
    sharded: bool | None = flag(
        None, help="true forces, false forbids tensor parallelism.", cli_type=str | None, parse=parse_bool
    )
    num_shard: int | None = flag(None, help="Number of shards (default: visible GPUs, else 1).")
    quantize: str | None = flag(
        _shard("quantize"), help="int8 or int4 (paged backend); bitsandbytes(-nf4/-fp4), gptq, ct2."
    )
    # None until ``fit_dtype`` resolves it (shard/dtypes.py's rule), after the weights step.
    dtype: str | None = flag(
        _shard("dtype"),
        help="float32, float16 or bfloat16 (default: the model's own where the device runs it natively: "
        "bfloat16 for 16-bit checkpoints on CPUs with AMX or AVX512-BF16, else float32 on CPU; bfloat16 or "
        "float16 on GPU).",
    )
    trust_remote_code: bool = flag(_shard("trust_remote_code"), help="Run modelling code from the hub.")
    max_concurrent_requests: int = flag(
        _router("max_concurrent_requests"),
        help="Sequences in flight before 429 (a request takes one per sequence: n, best_of).",
    )
    max_best_of: int = flag(_router("max_best_of"), help="Largest TGI best_of, OpenAI n and best_of.")
    max_stop_sequences: int = flag(_router("max_stop_sequences"), help="Most stop sequences per request.")
    max_top_n_tokens: int = flag(_router("max_top_n_tokens"), help="Largest top_n_tokens.")
    # None: the router's defaults, fitted to the model's positions by ``check_model``.
    max_input_length: int | None = flag(
        None, help="Most prompt tokens (default: 1024, below the model's positions)."
    )
    max_total_tokens: int | None = flag(
        None,
        help="Most prompt + new tokens per request, at most the model's positions (default: 2048, or the "
        "model's positions when fewer).",
    )
    waiting_served_ratio: float = flag(
        _router("waiting_served_ratio"), help="Queued/running ratio that makes waiting requests join."
    )
    max_batch_prefill_tokens: int = flag(
        _router("max_batch_prefill_tokens"), help="Token cap of one prefill."
    )
    max_batch_total_tokens: int | None = flag(
        _router("max_batch_total_tokens"),
        help="Token cap of the running batch; the paged backend's KV cache holds exactly this many tokens "
        "(default: what memory allows; other backends 16000).",
    )
    max_waiting_tokens: int = flag(
        _router("max_waiting_tokens"), help="Decode steps before waiting requests are forced in."
    )
    hostname: str = flag(_router("hostname"), help="Address to listen on.")
    port: int = flag(_router("port"), help="HTTP port.", short="-p")
    # The sockets go in a private directory made beside this prefix (launcher/supervisor.py).
    shard_uds_path: str = flag(
        DEFAULT_UDS_PATH,
        help="Shard socket prefix: the sockets ({name}-RANK) go in a directory only this user can enter, "
        "made beside it for the run and removed at exit.",
    )
    master_addr: str = flag("localhost", help="torch.distributed master address.")
    master_port: int = flag(29500, help="torch.distributed master port.")
    # Several machines: this launcher's node among ``nnodes``; node 0 runs the router (docs/architecture.md).
    nnodes: int = flag(1, help="Machines the server spans, each running --num-shard shards (see README).")
    node_rank: int = flag(0, help="This machine's node, 0 to nnodes - 1; node 0 runs the router.")
    huggingface_hub_cache: Path | None = flag(None, help="Hub cache directory.")
    weights_cache_override: Path | None = flag(None, help="Pre-provisioned model directory; skips the hub.")
    json_output: bool = flag(_router("json_output"), help="Log JSON lines.")
    # OpenTelemetry traces of the router and the shards (docs/architecture.md, Traces).
    otlp_endpoint: str | None = flag(
        _router("otlp_endpoint"),
        help="OTLP/gRPC collector the router and the shards send their traces to, e.g. "
        "http://localhost:4317 (default: no tracing).",
        parse=check_otlp_endpoint,
    )
    otlp_service_name: str = flag(
        _router("otlp_service_name"),
        help="Service name of the router's spans; the shards' is the same with .server for .router.",
    )
    cors_allow_origin: tuple[str, ...] = flag(
        _router("cors_allow_origin"), help="Allowed CORS origin (repeatable; * for any)."
    )
    served_model_name: tuple[str, ...] = flag(
        _router("served_model_names"), help="Name the OpenAI routes accept for `model` (repeatable)."
    )
    chat_template: str | None = flag(
        None, help="Chat template (a Jinja file or string) instead of the model's."
    )
    tool_call_parser: str = flag(
        _router("tool_call_parser"),
        help="Tool-call format: auto (from the chat template and tokenizer, else hermes), hermes, "
        "llama3_json, mistral, pythonic, or a plugin's.",
    )
    reasoning_parser: str = flag(
        _router("reasoning_parser"),
        help="Reasoning format: auto (from the chat template), none, think, deepseek_r1, qwen3, gpt_oss, "
        "or a plugin's.",
    )
    strict_model_name: bool = flag(
        _router("strict_model_name"),
        help="Answer 404 to a `model` that is not a served name (default: any name is served).",
    )
    enable_lora_runtime_updates: bool = flag(
        _router("enable_lora_runtime_updates"),
        help="Serve /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's; they read the server's disk). "
        "Paged backend.",
    )
    # TGI's -e has no environment variable (and shells use ENV for their startup file).
    env: bool = flag(False, help="Print the runtime environment first (then start).", short="-e", no_env=True)
    api_key: str | None = flag(None, help="Bearer token required on every route but /health (and /metrics).")
    metrics_require_auth: bool = flag(
        _router("metrics_require_auth"), help="Require the API key on /metrics too."
    )
    payload_limit: int = flag(_router("payload_limit"), help="Largest request body in bytes (413 beyond).")
    graceful_termination_timeout: float = flag(
        _router("graceful_termination_timeout"),
        help="Seconds in-flight requests get to finish after SIGTERM.",
    )
    # Test-only fault hooks (a request parameter that breaks its own step); never on in production.
    # Command line only: no environment variable turns it on.
    fault_injection: bool = flag(
        _router("fault_injection"),
        help="Test only: honour the `fault` request parameter.",
        hidden=True,
        no_env=True,
    )
    # Model backend for the shards: auto (paged where it applies), paged or transformers.
    backend: str = flag(
        _shard("backend"),
        help="auto (paged for Llama-family models, else transformers), paged or transformers.",
    )
    # --quantize ct2: compute threads per step (0: the cores available), batches run side by side.
    ct2_threads: int = flag(
        _shard("ct2_threads"), help="--quantize ct2: compute threads per step (0: the cores available)."
    )
    ct2_max_batches: int = flag(
        _shard("ct2_max_batches"), help="--quantize ct2: CTranslate2 batches running side by side."
    )
    # Batch sizes whose decode steps the paged backend captures as CUDA graphs ("0": none; None: its
    # default ladder). GPU only.
    cuda_graphs: str | None = flag(
        None,
        help="Batch sizes whose decode steps are captured as CUDA graphs, e.g. 1,2,4,8 (0: none; default: 1 "
        "to 256 in powers of two). Paged backend on one GPU.",
    )
    # Optional plugins to enable (common/plugins.py), and the watermark processor's settings.
    plugins: tuple[str, ...] = flag(
        _shard("plugins"),
        name="plugin",
        help="Enable an optional plugin by name (repeatable); see --list-plugins.",
    )
    watermark_gamma: float = flag(
        _shard("watermark_gamma"), help="Watermark: fraction of the vocabulary in each green list."
    )
    watermark_delta: float = flag(
        _shard("watermark_delta"), help="Watermark: logit boost of green-list tokens."
    )
    # TGI's flag: our compiled CPU kernels (shard/paged/kernels.py) and CUDA graphs off.
    disable_custom_kernels: bool = flag(
        _shard("disable_custom_kernels"),
        help="Run plain torch operations: no compiled CPU kernels, no CUDA graphs.",
    )
    # TGI's ngrok tunnel: refused (``validate``), as this server opens no tunnel.
    ngrok: bool = flag(
        False, help="Refused: this server opens no ngrok tunnel (run the ngrok agent beside it)."
    )
    ngrok_authtoken: str | None = flag(None, help="TGI's ngrok token; only with --ngrok, which is refused.")
    ngrok_edge: str | None = flag(None, help="TGI's ngrok edge; only with --ngrok, which is refused.")
    # TGI's --speculate: most draft tokens per sequence and step (n-gram lookup); paged backend only.
    speculate: int | None = flag(
        _shard("speculate"),
        help="Most draft tokens per sequence and step, looked up in the text so far (0: none; default: 8 "
        "where drafting pays; 0 with int8/int4). Paged backend.",
    )
    # TGI's --lora-adapters / LORA_ADAPTERS: PEFT LoRA adapters loaded at start, name=directory,... (a bare
    # directory is named after itself); paged backend (shard/paged/lora.py).
    lora_adapters: str | None = flag(
        None,
        help="LoRA adapters (PEFT) loaded at start: name=directory,...; a request names one by its OpenAI "
        "`model` or TGI `adapter_id`. Paged backend.",
        env="LORA_ADAPTERS",
    )
    # vLLM's --max-loras: the most adapters on the device at once and in one step (the rest wait on the host).
    max_loras: int | None = flag(
        _shard("max_loras"),
        help="The most LoRA adapters on the device at once and in one step; the others wait on the host and "
        "are copied in when needed, the least recently used evicted (default: all).",
    )
    # vLLM's --max-lora-rank: adapters of a higher rank are refused at start, by name.
    max_lora_rank: int | None = flag(
        _shard("max_lora_rank"),
        help="The highest LoRA adapter rank loaded (default: any); a higher one stops the start.",
    )
    # The share of each CUDA device a shard may use (TGI's flag); only 1.0 without a CUDA device.
    cuda_memory_fraction: float = flag(
        _shard("cuda_memory_fraction"),
        help="Share of each CUDA device a shard may use, > 0 and <= 1 (CUDA only).",
    )

    def _plugin_backend(self) -> bool:
        from common.plugins import PluginError, find

        try:
            find("backends", self.backend)
        except PluginError:
            return False
        return True

    def world_size(self) -> int:
        """TGI's find_num_shards: --num-shard, else the devices in CUDA_VISIBLE_DEVICES, else 1."""
        if self.num_shard is not None:
            return self.num_shard
        devices = os.environ.get("CUDA_VISIBLE_DEVICES") or os.environ.get("NVIDIA_VISIBLE_DEVICES")
        if self.sharded is not False and devices:
            return len([d for d in devices.split(",") if d.strip()])
        return 1

    def global_world_size(self) -> int:
        """The ranks of the whole server: this node's shards times the nodes (each runs as many)."""
        return self.world_size() * self.nnodes

    def _shards(self) -> str:
        """The flags that set the ranks, for messages."""
        flag = f"--num-shard {self.world_size()}"
        return flag if self.nnodes == 1 else f"{flag} x --nnodes {self.nnodes}"

    def input_length(self) -> int:
        """--max-input-length, or its default (before ``check_model`` fits it to the model)."""
        return DEFAULT_MAX_INPUT_LENGTH if self.max_input_length is None else self.max_input_length

    def total_tokens(self) -> int:
        """--max-total-tokens, or its default (before ``check_model`` fits it to the model)."""
        return DEFAULT_MAX_TOTAL_TOKENS if self.max_total_tokens is None else self.max_total_tokens

    def check_model(self, model_config: dict, cuda_devices: int) -> LauncherConfig:
        """The rules that need the model and the machine (after the weights step, before any process):
        one request must fit the model's positions, the model must split over every rank of every node,
        and on CUDA each shard needs its own device.

        Returns the config with both token limits set: a limit given is kept (or refused), a default is
        lowered to fit the model's positions."""
        fitted = replace(self, max_input_length=self.input_length(), max_total_tokens=self.total_tokens())
        found = model_positions(model_config)
        if found is not None:
            positions, key = found
            if self.max_total_tokens is not None and self.max_total_tokens > positions:
                raise ArgumentError(
                    f"`max_total_tokens` ({self.max_total_tokens}) must be <= the model's {positions} "
                    f"positions ({key})"
                )
            if self.max_input_length is not None and self.max_input_length >= positions:
                raise ArgumentError(
                    f"`max_input_length` ({self.max_input_length}) must be < the model's {positions} "
                    f"positions ({key})"
                )
            total = min(fitted.total_tokens(), positions)
            given_input = self.max_input_length is not None
            input_length = fitted.input_length() if given_input else min(fitted.input_length(), total - 1)
            fitted = replace(fitted, max_total_tokens=total, max_input_length=input_length)
        problem = sharding_problem(model_config, self.global_world_size())
        if problem:
            raise ArgumentError(problem if self.nnodes == 1 else f"{problem} ({self._shards()})")
        if self.cuda_memory_fraction != 1.0 and not cuda_devices:
            raise ArgumentError(
                f"`cuda_memory_fraction` ({self.cuda_memory_fraction}) applies to CUDA devices, and this machine "
                "has none: leave it at 1"
            )
        if cuda_devices and self.world_size() > cuda_devices:
            raise ArgumentError(
                f"`--num-shard {self.world_size()}` is more than the {cuda_devices} CUDA devices available"
            )
        return fitted

    def fit_dtype(
        self, checkpoint: Checkpoint, cuda_devices: int, cpu: CpuFeatures | None = None
    ) -> tuple[LauncherConfig, DtypeChoice]:
        """--dtype's default, resolved in this one place (after the weights step, before any process):
        the config with the dtype every shard loads in, and why (shard/dtypes.py's rule, for
        ``checkpoint`` on CUDA when this machine has CUDA devices, else on the CPU ``cpu``, by default this
        one's). A --dtype given is kept; ``--quantize ct2`` keeps None (CTranslate2's own compute type)."""
        from shard.dtypes import DtypeChoice, resolve_dtype

        if self.dtype is not None:
            return self, DtypeChoice(self.dtype, "--dtype")
        choice = resolve_dtype("cuda" if cuda_devices else "cpu", checkpoint, self.quantize, cpu)
        return replace(self, dtype=choice.dtype), choice

    def validate(self) -> None:
        """Raises ArgumentError on the first rule broken (TGI's rules, then this version's limits)."""
        if self.validation_workers <= 0:
            raise ArgumentError("`validation_workers` must be > 0")
        max_input_length, max_total_tokens = self.input_length(), self.total_tokens()
        if max_input_length >= max_total_tokens:
            raise ArgumentError(
                f"`max_input_length` must be < `max_total_tokens`. Given: {max_input_length} "
                f"and {max_total_tokens}"
            )
        if max_input_length > self.max_batch_prefill_tokens:
            raise ArgumentError(
                f"`max_batch_prefill_tokens` must be >= `max_input_length`. Given: "
                f"{self.max_batch_prefill_tokens} and {max_input_length}"
            )
        if self.max_batch_total_tokens is not None:
            if self.max_batch_prefill_tokens > self.max_batch_total_tokens:
                raise ArgumentError(
                    f"`max_batch_prefill_tokens` must be <= `max_batch_total_tokens`. Given: "
                    f"{self.max_batch_prefill_tokens} and {self.max_batch_total_tokens}"
                )
            if max_total_tokens > self.max_batch_total_tokens:
                raise ArgumentError(
                    f"`max_total_tokens` must be <= `max_batch_total_tokens`. Given: "
                    f"{max_total_tokens} and {self.max_batch_total_tokens}"
                )
        if not 0.0 < self.cuda_memory_fraction <= 1.0:
            raise ArgumentError(
                f"`cuda_memory_fraction` must be > 0 and <= 1. Given: {self.cuda_memory_fraction}"
            )
        if self.cuda_memory_fraction != 1.0 and self.quantize == CT2:
            raise ArgumentError(
                f"`cuda_memory_fraction` ({self.cuda_memory_fraction}) cannot bound CTranslate2's own memory "
                "(--quantize ct2): leave it at 1"
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
        if self.backend not in BACKEND_CHOICES and not self._plugin_backend():
            raise ArgumentError(
                f"`backend` must be one of {', '.join(BACKEND_CHOICES)} or an installed backend plugin. "
                f"Given: {self.backend}"
            )
        if not 0.0 < self.watermark_gamma < 1.0:
            raise ArgumentError(f"`watermark_gamma` must be > 0 and < 1. Given: {self.watermark_gamma}")
        if not (self.watermark_delta >= 0.0 and math.isfinite(self.watermark_delta)):
            raise ArgumentError(f"`watermark_delta` must be >= 0. Given: {self.watermark_delta}")
        if self.dtype is not None and self.dtype not in DTYPE_CHOICES:
            raise ArgumentError(f"`dtype` must be one of {', '.join(DTYPE_CHOICES)}. Given: {self.dtype}")
        if self.quantize is not None:
            if self.quantize not in QUANTIZE_CHOICES:
                raise ArgumentError(
                    f"`quantize` must be one of {', '.join(QUANTIZE_CHOICES)}. Given: {self.quantize}"
                )
            if self.quantize == "gptq":
                raise ArgumentError(
                    "`--quantize gptq` is not supported: this server cannot load GPTQ checkpoints; use "
                    "bitsandbytes, bitsandbytes-nf4, bitsandbytes-fp4 or ct2 (any checkpoint), or int8 / int4"
                )
            if self.quantize not in QUANTIZE_SUPPORTED:
                raise ArgumentError(f"`--quantize {self.quantize}` is not supported yet")
            self._validate_quantize()
            if self.quantize in ("int8", "int4") and self.backend == "transformers":
                raise ArgumentError(f"`--quantize {self.quantize}` needs the paged backend, not transformers")
        if self.speculate is not None:
            if self.speculate < 0:
                raise ArgumentError(f"`speculate` must be >= 0. Given: {self.speculate}")
            if self.speculate and (self.backend == "transformers" or self.quantize in (*BITSANDBYTES, CT2)):
                raise ArgumentError(
                    f"`--speculate {self.speculate}` needs the paged backend "
                    f"({'--backend transformers' if self.backend == 'transformers' else f'--quantize {self.quantize}'}"
                    " runs without it)"
                )
        if self.max_loras is not None and self.max_loras < 1:
            raise ArgumentError(f"`max_loras` must be >= 1. Given: {self.max_loras}")
        if self.max_lora_rank is not None and self.max_lora_rank < 1:
            raise ArgumentError(f"`max_lora_rank` must be >= 1. Given: {self.max_lora_rank}")
        if self.lora_adapters is not None:
            try:
                local_adapters(parse_lora_adapters(self.lora_adapters))
            except ValueError as e:
                raise ArgumentError(str(e)) from None
        if self.cuda_graphs is not None:
            try:
                parse_cuda_graphs(self.cuda_graphs)
            except ValueError as e:
                raise ArgumentError(str(e)) from None
        self._validate_uds_path()
        if self.ngrok:
            raise ArgumentError(
                "`--ngrok` is not supported: this server opens no tunnel. Run the ngrok agent beside it "
                f"(`ngrok http {self.port}`) or expose the port through your own ingress"
            )
        if self.disable_custom_kernels and self.cuda_graphs not in (None, "0"):
            raise ArgumentError(
                f"`--cuda-graphs {self.cuda_graphs}` cannot be honoured with `--disable-custom-kernels`, which "
                "turns CUDA graphs off: leave one of them out"
            )
        problem = parser_problem(self.tool_call_parser, self.reasoning_parser)
        if problem:
            raise ArgumentError(problem)
        if self.num_shard is not None and self.num_shard < 1:
            raise ArgumentError(f"`num_shard` must be >= 1. Given: {self.num_shard}")
        if self.nnodes < 1:
            raise ArgumentError(f"`nnodes` must be >= 1. Given: {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ArgumentError(
                f"`node_rank` must be >= 0 and < `nnodes`. Given: {self.node_rank} and {self.nnodes}"
            )
        if self.sharded and self.global_world_size() <= 1:
            raise ArgumentError(
                "`sharded` is true but there is only one shard (set --num-shard or CUDA_VISIBLE_DEVICES)"
            )
        if self.sharded is False and self.global_world_size() > 1:
            raise ArgumentError(
                f"`sharded` is false but there are {self.global_world_size()} shards ({self._shards()})"
            )
        if self.global_world_size() > 1 and (self.quantize in BITSANDBYTES or self.quantize == CT2):
            how = (
                "CTranslate2's own tensor parallelism needs MPI-launched processes, which this launcher does "
                "not start"
                if self.quantize == CT2
                else "bitsandbytes runs on the transformers backend, which has no tensor parallelism"
            )
            raise ArgumentError(f"`--quantize {self.quantize}` runs in one shard: {how}. Use --num-shard 1")
        if self.global_world_size() > 1 and self.backend == "transformers":
            raise ArgumentError(
                f"`{self._shards()}`: the transformers backend cannot shard; use --backend auto"
            )

    def _validate_uds_path(self) -> None:
        """The private directory is made in --shard-uds-path's parent, and each socket path must fit a Unix
        socket address."""
        uds = Path(self.shard_uds_path)
        if not uds.name or not uds.parent.is_dir():
            raise ArgumentError(
                f"`shard_uds_path` must be a name in an existing directory. Given: {self.shard_uds_path}"
            )
        # {parent}/{name}-{12 hex}/{name}-{rank}, as launcher/supervisor.py makes it.
        longest = uds.parent / f"{uds.name}-{'0' * 12}" / f"{uds.name}-{self.global_world_size() - 1}"
        if len(os.fsencode(longest)) > MAX_SOCKET_PATH:
            raise ArgumentError(
                f"`shard_uds_path` is too long: its sockets' paths (e.g. {longest}) must be at most "
                f"{MAX_SOCKET_PATH} bytes"
            )

    def _validate_quantize(self) -> None:
        """bitsandbytes and ct2: the backend they run on, their libraries, ct2's compute type and threads."""
        from common.quantize import INSTALL_HINT, ct2_compute_type, ct2_device, missing_libraries

        if self.quantize in BITSANDBYTES and self.backend == "paged":
            raise ArgumentError(f"`--quantize {self.quantize}` runs on the transformers backend, not paged")
        if self.quantize == CT2 and self.backend != "auto":
            raise ArgumentError(
                "`--quantize ct2` runs on its own CTranslate2 engine: leave `--backend` at auto"
            )
        if self.quantize == CT2 and self.trust_remote_code:
            raise ArgumentError(
                "`--quantize ct2` converts the architectures CTranslate2 knows: no remote code"
            )
        if self.ct2_threads < 0:
            raise ArgumentError(f"`ct2_threads` must be >= 0. Given: {self.ct2_threads}")
        if self.ct2_max_batches < 1:
            raise ArgumentError(f"`ct2_max_batches` must be >= 1. Given: {self.ct2_max_batches}")
        missing = missing_libraries(self.quantize)
        if missing:
            raise ArgumentError(
                f"`--quantize {self.quantize}` needs {', '.join(missing)}, which is not installed: {INSTALL_HINT}"
            )
        if self.quantize == CT2:
            try:
                ct2_compute_type(self.dtype, ct2_device())
            except ValueError as e:
                raise ArgumentError(str(e)) from None
