"""``text-generation-server``: the shard process (the launcher starts one per rank)."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from common.cuda_graphs import parse_cuda_graphs
from common.logs import setup_logging

from .config import ConfigError, ShardConfig

app = typer.Typer(add_completion=False, help="Text generation shard: serves one model slice over gRPC.")


@app.callback()
def _root() -> None:
    """Text generation shard."""


@app.command()
def serve(
    model_path: Annotated[
        Path, typer.Argument(help="Local model directory (config, safetensors, tokenizer).")
    ],
    uds_path: Annotated[
        str, typer.Option(help="Socket prefix; the rank is appended.")
    ] = "/tmp/text-generation-server",
    dtype: Annotated[str | None, typer.Option(help="float32, float16 or bfloat16.")] = None,
    quantize: Annotated[str | None, typer.Option()] = None,
    trust_remote_code: Annotated[bool, typer.Option()] = False,
    backend: Annotated[str, typer.Option(help="auto, paged or transformers.")] = "auto",
    logger_level: Annotated[str, typer.Option()] = "INFO",
    json_output: Annotated[bool, typer.Option()] = False,
    fault_injection: Annotated[
        bool, typer.Option(hidden=True, help="Test only: honour fault hooks.")
    ] = False,
    ct2_threads: Annotated[
        int, typer.Option(help="--quantize ct2: compute threads per step (0: the cores available).")
    ] = 0,
    ct2_max_batches: Annotated[
        int, typer.Option(help="--quantize ct2: CTranslate2 batches running side by side.")
    ] = 32,
    cuda_graphs: Annotated[
        str | None, typer.Option(help="Batch sizes captured as CUDA graphs (0: none; default: 1 to 256).")
    ] = None,
    plugin: Annotated[list[str] | None, typer.Option(help="Enable an optional plugin (repeatable).")] = None,
    watermark_gamma: Annotated[float, typer.Option(help="Watermark green-list fraction.")] = 0.5,
    watermark_delta: Annotated[float, typer.Option(help="Watermark green-list logit boost.")] = 2.0,
    max_batch_total_tokens: Annotated[
        int | None, typer.Option(help="Paged backend: the KV pool in tokens (default: what memory allows).")
    ] = None,
    cuda_memory_fraction: Annotated[
        float, typer.Option(help="Share of each CUDA device this process may use.")
    ] = 1.0,
) -> None:
    """Loads the model and serves the shard service on ``{uds_path}-{RANK}``."""
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(logger_level, json_output, prefix=f"shard-{rank} ")
    config = ShardConfig(
        model_path=model_path,
        uds_path=uds_path,
        dtype=dtype,
        quantize=quantize,
        trust_remote_code=trust_remote_code,
        backend=backend,
        rank=rank,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        fault_injection=fault_injection,
        ct2_threads=ct2_threads,
        ct2_max_batches=ct2_max_batches,
        cuda_graphs=None if cuda_graphs is None else parse_cuda_graphs(cuda_graphs),
        plugins=tuple(plugin or ()),
        watermark_gamma=watermark_gamma,
        watermark_delta=watermark_delta,
        max_batch_total_tokens=max_batch_total_tokens,
        cuda_memory_fraction=cuda_memory_fraction,
    )
    from .server import serve as run_server

    try:
        asyncio.run(run_server(config))
    except ConfigError as e:  # a setting the device cannot honour: one line, no traceback
        logging.getLogger("shard").error("%s", e)
        logging.shutdown()
        os._exit(1)  # other ranks, if any, see this one go


def main() -> None:
    app()
