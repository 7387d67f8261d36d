"""``text-generation-router``: the HTTP server in front of the shards.

The launcher builds the RouterConfig and starts ``python -m router --config FILE``; for direct use, every
RouterConfig flag (router/config.py) is an option too.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Annotated

import typer

from common.flags import command, from_json, given_on_command_line, parameters, values_to_fields
from common.logs import setup_logging

from .chat import ChatWrapping
from .config import RouterConfig

app = typer.Typer(
    add_completion=False, help="Text generation router: HTTP API, validation, continuous batching."
)

EXTRA = [
    inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
    inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[Path | None, typer.Option(help="A RouterConfig file (JSON, from the launcher); "
                                                       "no other RouterConfig flag with it.")],
    ),
    inspect.Parameter(
        "logger_level", inspect.Parameter.KEYWORD_ONLY, default="INFO",
        annotation=Annotated[str, typer.Option(help="Log level.")],
    ),
]  # fmt: skip


def router_config(ctx: typer.Context, values: dict) -> RouterConfig:
    """The config from ``--config FILE`` or from the flags; the API key comes from the API_KEY environment
    variable either way (never a command line or a file)."""
    api_key = os.environ.get("API_KEY") or None
    file = values.pop("config")
    if file is not None:
        given = given_on_command_line(ctx, list(values))
        if given:
            raise typer.BadParameter(
                f"--{given[0].replace('_', '-')} cannot be given with it", param_hint="--config"
            )
        try:
            return from_json(RouterConfig, file.read_text(), api_key=api_key)
        except (OSError, ValueError) as e:
            raise typer.BadParameter(str(e), param_hint="--config") from None
    fields = values_to_fields(RouterConfig, values)
    if fields.get("tokenizer_name") is None:
        raise typer.BadParameter("a tokenizer is needed (or --config)", param_hint="--tokenizer-name")
    fields["model_id"] = fields.get("model_id") or fields["tokenizer_name"]
    # TGICHAT_* come from the environment; read once, here.
    return RouterConfig(**fields, chat_wrapping=ChatWrapping.from_env(os.environ), api_key=api_key)


def serve(ctx: typer.Context, logger_level: str, **values: object) -> None:
    """Serves HTTP; the API key comes from the API_KEY environment variable (never on a command line)."""
    config = router_config(ctx, values)
    setup_logging(logger_level, config.json_output, prefix="router ")
    from .app import run

    run(config)


command(app, serve, [*EXTRA, *parameters(RouterConfig)], name="serve")


def main() -> None:
    app()
