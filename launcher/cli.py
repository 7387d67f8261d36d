"""``text-generation-launcher``: TGI v0.9.4's flags (each also read from its UPPER_SNAKE env var)."""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path
from typing import Annotated

import typer

from common.logs import setup_logging

from .config import ArgumentError, LauncherConfig

log = logging.getLogger("launcher")

app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)


def _opt(env: str, help: str, **kwargs: object) -> typer.models.OptionInfo:
    return typer.Option(envvar=env, help=help, show_envvar=True, **kwargs)


def _parse_bool(name: str, value: str | None) -> bool | None:
    """TGI's value-taking booleans (``--sharded true``)."""
    if value is None:
        return None
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    typer.echo(f"Error: `{name}` must be true or false. Given: {value}", err=True)
    raise typer.Exit(2)


def read_model_config(path: Path) -> dict:
    """The model directory's config.json ({} when there is none, e.g. a converted CTranslate2 model)."""
    import json

    file = Path(path) / "config.json"
    return json.loads(file.read_text()) if file.exists() else {}


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def print_plugins(enabled: tuple[str, ...]) -> None:
    """--list-plugins: every installed plugin, whether it loads, and whether it runs."""
    from common.plugins import PluginError, discover

    rows = [("GROUP", "NAME", "PACKAGE", "STATUS")]
    for p in discover():
        try:
            p.load()
            status = "built-in" if p.builtin else ("enabled" if p.name in enabled else "optional (--plugin)")
        except PluginError as e:
            status = f"broken: {e.__cause__ or e}"
        rows.append((p.group, p.name, f"{p.distribution} {p.version}", status))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        typer.echo("  ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)), row[3]]))


def print_env() -> None:
    """TGI's --env: what this launcher runs on."""
    import torch

    cuda = torch.cuda.is_available()
    rows = {
        "Python": sys.version.split()[0],
        "Platform": platform.platform(),
        "Torch": torch.__version__,
        "CUDA available": cuda,
        "GPUs": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "CPU cores": os.cpu_count(),
    }
    for key, value in rows.items():
        print(f"{key + ':':16} {value}")


@app.command()
def launch(
    model_id: Annotated[
        str | None,
        _opt(
            "MODEL_ID", "Hub id, local directory or .gguf file; default: the embedded SmolLM2-135M-Instruct."
        ),
    ] = None,
    revision: Annotated[str | None, _opt("REVISION", "Hub revision (branch, tag or commit).")] = None,
    validation_workers: Annotated[int, _opt("VALIDATION_WORKERS", "Tokenizer threads in the router.")] = 2,
    sharded: Annotated[str | None, _opt("SHARDED", "true forces, false forbids tensor parallelism.")] = None,
    num_shard: Annotated[
        int | None, _opt("NUM_SHARD", "Number of shards (default: visible GPUs, else 1).")
    ] = None,
    quantize: Annotated[
        str | None, _opt("QUANTIZE", "int8 or int4 (paged backend); bitsandbytes(-nf4/-fp4), gptq, ct2.")
    ] = None,
    dtype: Annotated[
        str | None, _opt("DTYPE", "float32, float16 or bfloat16 (default: float32 on CPU, bfloat16 on GPU).")
    ] = None,
    trust_remote_code: Annotated[bool, _opt("TRUST_REMOTE_CODE", "Run modelling code from the hub.")] = False,
    max_concurrent_requests: Annotated[
        int, _opt("MAX_CONCURRENT_REQUESTS", "Requests in flight before 429.")
    ] = 128,
    max_best_of: Annotated[int, _opt("MAX_BEST_OF", "Largest best_of.")] = 2,
    max_stop_sequences: Annotated[int, _opt("MAX_STOP_SEQUENCES", "Most stop sequences per request.")] = 4,
    max_top_n_tokens: Annotated[int, _opt("MAX_TOP_N_TOKENS", "Largest top_n_tokens.")] = 5,
    max_input_length: Annotated[
        int | None,
        _opt("MAX_INPUT_LENGTH", "Most prompt tokens (default: 1024, below the model's positions)."),
    ] = None,
    max_total_tokens: Annotated[
        int | None,
        _opt(
            "MAX_TOTAL_TOKENS",
            "Most prompt + new tokens per request, at most the model's positions (default: 2048, or the "
            "model's positions when fewer).",
        ),
    ] = None,
    waiting_served_ratio: Annotated[
        float, _opt("WAITING_SERVED_RATIO", "Queued/running ratio that makes waiting requests join.")
    ] = 1.2,
    max_batch_prefill_tokens: Annotated[
        int, _opt("MAX_BATCH_PREFILL_TOKENS", "Token cap of one prefill.")
    ] = 4096,
    max_batch_total_tokens: Annotated[
        int | None,
        _opt(
            "MAX_BATCH_TOTAL_TOKENS",
            "Token cap of the running batch; the paged backend's KV cache holds exactly this many tokens "
            "(default: what memory allows; other backends 16000).",
        ),
    ] = None,
    max_waiting_tokens: Annotated[
        int, _opt("MAX_WAITING_TOKENS", "Decode steps before waiting requests are forced in.")
    ] = 20,
    hostname: Annotated[str, _opt("HOSTNAME", "Address to listen on.")] = "0.0.0.0",
    port: Annotated[int, _opt("PORT", "HTTP port.", show_default=True)] = 3000,
    shard_uds_path: Annotated[
        str, _opt("SHARD_UDS_PATH", "Shard socket prefix (-RANK is appended).")
    ] = "/tmp/text-generation-server",
    master_addr: Annotated[str, _opt("MASTER_ADDR", "torch.distributed master address.")] = "localhost",
    master_port: Annotated[int, _opt("MASTER_PORT", "torch.distributed master port.")] = 29500,
    nnodes: Annotated[
        int, _opt("NNODES", "Machines the server spans, each running --num-shard shards (see README).")
    ] = 1,
    node_rank: Annotated[
        int, _opt("NODE_RANK", "This machine's node, 0 to nnodes - 1; node 0 runs the router.")
    ] = 0,
    huggingface_hub_cache: Annotated[
        Path | None, _opt("HUGGINGFACE_HUB_CACHE", "Hub cache directory.")
    ] = None,
    weights_cache_override: Annotated[
        Path | None, _opt("WEIGHTS_CACHE_OVERRIDE", "Pre-provisioned model directory; skips the hub.")
    ] = None,
    json_output: Annotated[bool, _opt("JSON_OUTPUT", "Log JSON lines.")] = False,
    cors_allow_origin: Annotated[
        list[str] | None, _opt("CORS_ALLOW_ORIGIN", "Allowed CORS origin (repeatable; * for any).")
    ] = None,
    served_model_name: Annotated[
        list[str] | None, _opt("SERVED_MODEL_NAME", "Name the OpenAI routes accept for `model` (repeatable).")
    ] = None,
    chat_template: Annotated[
        str | None, _opt("CHAT_TEMPLATE", "Chat template (a Jinja file or string) instead of the model's.")
    ] = None,
    env: Annotated[bool, _opt("ENV", "Print the runtime environment first.")] = False,
    api_key: Annotated[
        str | None, _opt("API_KEY", "Bearer token required on every route but /health (and /metrics).")
    ] = None,
    metrics_require_auth: Annotated[
        bool, _opt("METRICS_REQUIRE_AUTH", "Require the API key on /metrics too.")
    ] = False,
    payload_limit: Annotated[
        int, _opt("PAYLOAD_LIMIT", "Largest request body in bytes (413 beyond).")
    ] = 2_000_000,
    graceful_termination_timeout: Annotated[
        float,
        _opt("GRACEFUL_TERMINATION_TIMEOUT", "Seconds in-flight requests get to finish after SIGTERM."),
    ] = 90.0,
    fault_injection: Annotated[
        bool, _opt("FAULT_INJECTION", "Test only: honour the `fault` request parameter.", hidden=True)
    ] = False,
    backend: Annotated[
        str,
        _opt("BACKEND", "auto (paged for Llama-family models, else transformers), paged or transformers."),
    ] = "auto",
    ct2_threads: Annotated[
        int, _opt("CT2_THREADS", "--quantize ct2: compute threads per step (0: the cores available).")
    ] = 0,
    ct2_max_batches: Annotated[
        int, _opt("CT2_MAX_BATCHES", "--quantize ct2: CTranslate2 batches running side by side.")
    ] = 32,
    cuda_graphs: Annotated[
        str | None,
        _opt(
            "CUDA_GRAPHS",
            "Batch sizes whose decode steps are captured as CUDA graphs, e.g. 1,2,4,8 (0: none; "
            "default: 1 to 256 in powers of two). Paged backend on one GPU.",
        ),
    ] = None,
    plugin: Annotated[
        list[str] | None,
        _opt("PLUGIN", "Enable an optional plugin by name (repeatable); see --list-plugins."),
    ] = None,
    list_plugins: Annotated[
        bool, _opt("LIST_PLUGINS", "Print the installed plugins and exit.", is_eager=False)
    ] = False,
    watermark_gamma: Annotated[
        float, _opt("WATERMARK_GAMMA", "Watermark: fraction of the vocabulary in each green list.")
    ] = 0.5,
    watermark_delta: Annotated[
        float, _opt("WATERMARK_DELTA", "Watermark: logit boost of green-list tokens.")
    ] = 2.0,
    cuda_memory_fraction: Annotated[
        float,
        _opt("CUDA_MEMORY_FRACTION", "Share of each CUDA device a shard may use, > 0 and <= 1 (CUDA only)."),
    ] = 1.0,
) -> None:
    """Serve a causal language model: TGI's native API and the OpenAI API over continuous batching."""
    setup_logging(os.environ.get("LOG_LEVEL", "INFO"), json_output)
    if list_plugins:
        print_plugins(tuple(plugin or ()))
        raise typer.Exit(0)
    config = LauncherConfig(
        model_id=model_id,
        revision=revision,
        validation_workers=validation_workers,
        sharded=_parse_bool("sharded", sharded),
        num_shard=num_shard,
        quantize=quantize,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        max_concurrent_requests=max_concurrent_requests,
        max_best_of=max_best_of,
        max_stop_sequences=max_stop_sequences,
        max_top_n_tokens=max_top_n_tokens,
        max_input_length=max_input_length,
        max_total_tokens=max_total_tokens,
        waiting_served_ratio=waiting_served_ratio,
        max_batch_prefill_tokens=max_batch_prefill_tokens,
        max_batch_total_tokens=max_batch_total_tokens,
        max_waiting_tokens=max_waiting_tokens,
        hostname=hostname,
        port=port,
        shard_uds_path=shard_uds_path,
        master_addr=master_addr,
        master_port=master_port,
        nnodes=nnodes,
        node_rank=node_rank,
        huggingface_hub_cache=huggingface_hub_cache,
        weights_cache_override=weights_cache_override,
        json_output=json_output,
        cors_allow_origin=tuple(cors_allow_origin or ()),
        served_model_name=tuple(served_model_name or ()),
        chat_template=chat_template,
        env=env,
        api_key=api_key,
        metrics_require_auth=metrics_require_auth,
        payload_limit=payload_limit,
        graceful_termination_timeout=graceful_termination_timeout,
        fault_injection=fault_injection,
        backend=backend,
        ct2_threads=ct2_threads,
        ct2_max_batches=ct2_max_batches,
        cuda_graphs=cuda_graphs,
        plugins=tuple(plugin or ()),
        watermark_gamma=watermark_gamma,
        watermark_delta=watermark_delta,
        cuda_memory_fraction=cuda_memory_fraction,
    )
    if env:
        print_env()
    try:
        config.validate()
    except ArgumentError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None
    from common.plugins import PluginError, check_enabled

    try:
        for enabled in check_enabled(config.plugins):
            if enabled.group == "logits_processors" and config.quantize == "ct2":
                raise PluginError(
                    f"--plugin {enabled.name}: a logits processor cannot run on --quantize ct2 "
                    "(CTranslate2 samples inside its own decoding loop)"
                )
            log.info("Plugin %s (%s, from %s %s) enabled", enabled.name, enabled.group, enabled.distribution,
                     enabled.version)  # fmt: skip
    except PluginError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None
    if trust_remote_code:
        log.warning("`--trust-remote-code` is set: the model's own code from the hub will run")

    from .weights import WeightsConfig, WeightsError, ct2_converted, hub_cache_dir, resolve

    try:
        weights_config = WeightsConfig(
            model_id=model_id,
            revision=revision,
            hub_cache=huggingface_hub_cache,
            weights_cache_override=weights_cache_override,
            token=os.environ.get("HUGGING_FACE_HUB_TOKEN") or os.environ.get("HF_TOKEN"),
            offline=os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"),
            trust_remote_code=trust_remote_code,
        )
        model = resolve(weights_config)
        if quantize == "ct2":  # converted once into the weights cache, loaded directly after
            from common.quantize import ct2_compute_type, ct2_device

            compute_type = ct2_compute_type(dtype, ct2_device())
            model = ct2_converted(model, hub_cache_dir(weights_config), compute_type)
    except WeightsError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(1) from None
    log.info("Serving %s (%s) from %s", model.model_id, model.weights, model.path)
    try:
        fitted = config.check_model(read_model_config(model.path), cuda_device_count())
    except ArgumentError as e:
        typer.echo(f"Error: {e}", err=True)
        raise typer.Exit(2) from None
    if (fitted.max_input_length, fitted.max_total_tokens) != (config.input_length(), config.total_tokens()):
        log.info(
            "The model has fewer positions than the default token limits: --max-input-length %d, "
            "--max-total-tokens %d", fitted.max_input_length, fitted.max_total_tokens,
        )  # fmt: skip
    config = fitted

    from .supervisor import Supervisor

    raise typer.Exit(Supervisor(config, model).run())


def main() -> None:
    app()
