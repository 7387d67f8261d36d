"""The ``serve`` command: warm up, sweep the concurrency levels, compute the metrics."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from benchmark._version import __version__
from benchmark.clients import StreamingClient, make_client
from benchmark.config import ServeConfig
from benchmark.metrics import LevelMetrics, compute_level_metrics, single_stream_decode_tokens_per_s
from benchmark.prompts import synthetic_prompt
from benchmark.runner import LevelResult, run_level, warmup

if TYPE_CHECKING:
    from benchmark.report import Progress


@dataclass
class LevelOutcome:
    """One measured level: its raw result and the metrics computed from it."""

    result: LevelResult
    metrics: LevelMetrics


@dataclass
class ServeResult:
    """Everything a ``serve`` run measured."""

    config: ServeConfig
    prompt: str
    started_at: str
    levels: list[LevelOutcome]

    @property
    def single_stream_decode_tokens_per_s(self) -> float | None:
        return single_stream_decode_tokens_per_s(level.metrics for level in self.levels)

    @property
    def num_ok(self) -> int:
        return sum(level.metrics.num_ok for level in self.levels)

    def to_json(self) -> dict[str, Any]:
        """Config, per-level metrics and per-request raw records, JSON-ready."""
        return {
            "tool": "text-generation-benchmark",
            "version": __version__,
            "command": "serve",
            "started_at": self.started_at,
            "config": {**asdict(self.config), "prompt_text": self.prompt},
            "summary": {"single_stream_decode_tokens_per_s": self.single_stream_decode_tokens_per_s},
            "levels": [
                {
                    "concurrency": level.result.concurrency,
                    "target_requests": level.result.num_requests,
                    "wall_s": level.result.wall_s,
                    "timed_out": level.result.timed_out,
                    "metrics": asdict(level.metrics),
                    "records": [record.to_dict() for record in level.result.records],
                }
                for level in self.levels
            ],
        }


def resolve_prompt(config: ServeConfig) -> str:
    """The prompt text sent: synthetic when ``input_tokens`` is set, else ``config.prompt``."""
    if config.input_tokens is not None:
        return synthetic_prompt(config.input_tokens)
    return config.prompt


async def run_serve(
    config: ServeConfig, *, progress: Progress | None = None, client: StreamingClient | None = None
) -> ServeResult:
    """Runs the warmup then each concurrency level in order, against ``client`` (built from the config
    when not given, and then closed at the end). Raises WarmupError when a warmup request fails."""
    prompt = resolve_prompt(config)
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    own_client = client is None
    if client is None:
        client = make_client(config.api, config.url, config.params, max(config.concurrency))
    levels: list[LevelOutcome] = []
    try:
        if config.warmup:
            if progress is not None:
                progress.warmup(config.warmup)
            await warmup(client, prompt, config.warmup, config.request_timeout_s)
        for concurrency in config.concurrency:
            num_requests = config.requests_for(concurrency)
            if progress is not None:
                progress.start_level(concurrency, num_requests)
            result = await run_level(
                client,
                [prompt],
                concurrency=concurrency,
                num_requests=num_requests,
                request_timeout_s=config.request_timeout_s,
                level_timeout_s=config.level_timeout_s,
                on_record=progress.record if progress is not None else None,
            )
            metrics = compute_level_metrics(
                concurrency, result.records, result.wall_s, timed_out=result.timed_out
            )
            if progress is not None:
                progress.end_level(metrics)
            levels.append(LevelOutcome(result=result, metrics=metrics))
    finally:
        if own_client:
            await client.close()
    return ServeResult(config=config, prompt=prompt, started_at=started_at, levels=levels)
