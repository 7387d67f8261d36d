"""``text-generation-router``: the HTTP server in front of the shards (the launcher starts it)."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from common.logs import setup_logging

from .chat import ChatWrapping, load_chat_template
from .config import RouterConfig

app = typer.Typer(
    add_completion=False, help="Text generation router: HTTP API, validation, continuous batching."
)


@app.command()
def serve(
    tokenizer_name: Annotated[str, typer.Option(help="Model directory or hub id of the tokenizer.")],
    model_id: Annotated[str | None, typer.Option(help="Model id reported by /info.")] = None,
    model_sha: Annotated[str | None, typer.Option()] = None,
    model_weights: Annotated[str, typer.Option(help="What weights are served, for /info.")] = "",
    revision: Annotated[str | None, typer.Option()] = None,
    shard_uds_path: Annotated[str, typer.Option(help="Shard socket prefix.")] = "/tmp/text-generation-server",
    num_shard: Annotated[int, typer.Option()] = 1,
    hostname: Annotated[str, typer.Option()] = "0.0.0.0",
    port: Annotated[int, typer.Option()] = 3000,
    max_concurrent_requests: Annotated[int, typer.Option()] = 128,
    max_best_of: Annotated[int, typer.Option()] = 2,
    max_stop_sequences: Annotated[int, typer.Option()] = 4,
    max_top_n_tokens: Annotated[int, typer.Option()] = 5,
    max_input_length: Annotated[int, typer.Option()] = 1024,
    max_total_tokens: Annotated[int, typer.Option()] = 2048,
    waiting_served_ratio: Annotated[float, typer.Option()] = 1.2,
    max_batch_prefill_tokens: Annotated[int, typer.Option()] = 4096,
    max_batch_total_tokens: Annotated[int | None, typer.Option()] = None,
    max_waiting_tokens: Annotated[int, typer.Option()] = 20,
    validation_workers: Annotated[int, typer.Option()] = 2,
    cors_allow_origin: Annotated[list[str] | None, typer.Option()] = None,
    json_output: Annotated[bool, typer.Option()] = False,
    served_model_name: Annotated[
        list[str] | None, typer.Option(help="Name(s) for `model` on OpenAI routes.")
    ] = None,
    chat_template: Annotated[str | None, typer.Option(help="Chat template: a Jinja file or string.")] = None,
    payload_limit: Annotated[int, typer.Option(help="Largest request body in bytes.")] = 2_000_000,
    graceful_termination_timeout: Annotated[float, typer.Option()] = 90.0,
    metrics_require_auth: Annotated[bool, typer.Option()] = False,
    fault_injection: Annotated[bool, typer.Option(hidden=True)] = False,
    plugin: Annotated[list[str] | None, typer.Option(help="Enable an optional plugin (repeatable).")] = None,
    logger_level: Annotated[str, typer.Option()] = "INFO",
) -> None:
    """Serves HTTP; the API key comes from the API_KEY environment variable (never on a command line)."""
    setup_logging(logger_level, json_output, prefix="router ")
    from .app import run

    run(
        RouterConfig(
            tokenizer_name=tokenizer_name,
            model_id=model_id or tokenizer_name,
            model_sha=model_sha,
            model_weights=model_weights,
            revision=revision,
            shard_uds_path=shard_uds_path,
            num_shard=num_shard,
            hostname=hostname,
            port=port,
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
            validation_workers=validation_workers,
            cors_allow_origin=tuple(cors_allow_origin or ()),
            json_output=json_output,
            served_model_names=tuple(served_model_name or ()),
            chat_template=load_chat_template(chat_template),
            # TGICHAT_* come from the environment the launcher passes on; read once, here.
            chat_wrapping=ChatWrapping.from_env(os.environ),
            api_key=os.environ.get("API_KEY") or None,
            metrics_require_auth=metrics_require_auth,
            payload_limit=payload_limit,
            graceful_termination_timeout=graceful_termination_timeout,
            fault_injection=fault_injection,
            plugins=tuple(plugin or ()),
        )
    )


def main() -> None:
    app()
