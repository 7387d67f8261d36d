"""``text-generation-server``: the shard process (the launcher starts one per rank).

The launcher builds each rank's ShardConfig and starts ``python -m shard serve --config FILE``; for direct
use, every ShardConfig flag (shard/config.py) is an option too, and RANK / WORLD_SIZE set the rank.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from common.flags import command, from_json, given_on_command_line, parameters, values_to_fields
from common.logs import setup_logging

from .config import ConfigError, ShardConfig

app = typer.Typer(add_completion=False, help="Text generation shard: serves one model slice over gRPC.")


@app.callback()
def _root() -> None:
    """Text generation shard."""


EXTRA = [
    inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
    inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[Path | None, typer.Option(help="A ShardConfig file (JSON, from the launcher); no "
                                                       "other ShardConfig flag or model path with it.")],
    ),
    inspect.Parameter(
        "logger_level", inspect.Parameter.KEYWORD_ONLY, default="INFO",
        annotation=Annotated[str, typer.Option(help="Log level.")],
    ),
]  # fmt: skip


def shard_config(ctx: typer.Context, values: dict) -> ShardConfig:
    """The config from ``--config FILE``, or from the flags with the rank from RANK / WORLD_SIZE."""
    file = values.pop("config")
    if file is not None:
        given = given_on_command_line(ctx, list(values))
        if given:
            flag = "MODEL_PATH" if given[0] == "model_path" else f"--{given[0].replace('_', '-')}"
            raise typer.BadParameter(f"{flag} cannot be given with it", param_hint="--config")
        try:
            return from_json(ShardConfig, file.read_text())
        except (OSError, ValueError) as e:
            raise typer.BadParameter(str(e), param_hint="--config") from None
    fields = values_to_fields(ShardConfig, values)
    if fields.get("model_path") is None:
        raise typer.BadParameter("a model directory is needed (or --config)", param_hint="MODEL_PATH")
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return ShardConfig(**fields, rank=rank, world_size=world_size)


def serve(ctx: typer.Context, logger_level: str, **values: object) -> None:
    """Loads the model and serves the shard service on ``{uds_path}-{RANK}``."""
    config = shard_config(ctx, values)
    setup_logging(logger_level, config.json_output, prefix=f"shard-{config.rank} ")
    from .server import serve as run_server

    try:
        asyncio.run(run_server(config))
    except ConfigError as e:  # a setting the device cannot honour: one line, no traceback
        logging.getLogger("shard").error("%s", e)
        logging.shutdown()
        os._exit(1)  # other ranks, if any, see this one go


command(app, serve, [*EXTRA, *parameters(ShardConfig)], name="serve")


def main() -> None:
    app()
