"""The ``serve`` command: warm up, sweep the load levels, compute the metrics."""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from benchmark._version import __version__
from benchmark.clients import ClientOptions, RequestError, StreamingClient, make_client
from benchmark.config import Level, ServeConfig
from benchmark.metrics import LevelMetrics, compute_level_metrics, single_stream_decode_tokens_per_s
from benchmark.runner import LevelResult, WarmupError, run_level, run_rate_level, warmup
from benchmark.workload import arrival_schedule, make_requests

if TYPE_CHECKING:
    from benchmark.progress import Progress


@dataclass
class LevelOutcome:
    """One measured level: its raw result and the metrics computed from it."""

    result: LevelResult
    metrics: LevelMetrics


def default_label(config: ServeConfig) -> str:
    """The run's name when ``--label`` is not given: the API and the server's host:port."""
    return f"{config.api} {urlparse(config.url).netloc or config.url}"


@dataclass
class ServeResult:
    """Everything a ``serve`` run measured.

    ``prompt`` is the first measured request's prompt (every request's, without synthetic prompts);
    ``model`` the model the requests named (OpenAI APIs).
    """

    config: ServeConfig
    prompt: str
    started_at: str
    levels: list[LevelOutcome]
    model: str | None = None

    @property
    def label(self) -> str:
        return self.config.label or default_label(self.config)

    @property
    def mode(self) -> str:
        """``concurrency`` (closed loop) or ``request_rate`` (open loop)."""
        return "request_rate" if self.config.open_loop else "concurrency"

    @property
    def single_stream_decode_tokens_per_s(self) -> float | None:
        return single_stream_decode_tokens_per_s(level.metrics for level in self.levels)

    @property
    def num_ok(self) -> int:
        return sum(level.metrics.num_ok for level in self.levels)

    def to_json(self) -> dict[str, Any]:
        """Config, per-level metrics and per-request raw records, JSON-ready."""
        config = asdict(self.config)
        config.pop("api_key")
        return {
            "tool": "text-generation-benchmark",
            "version": __version__,
            "command": "serve",
            "label": self.label,
            "mode": self.mode,
            "api": self.config.api,
            "url": self.config.url,
            "model": self.model,
            "started_at": self.started_at,
            "config": {**config, "prompt_text": self.prompt},
            "summary": {"single_stream_decode_tokens_per_s": self.single_stream_decode_tokens_per_s},
            "levels": [
                {
                    "concurrency": level.result.concurrency,
                    "request_rate": level.result.request_rate,
                    "target_requests": level.result.num_requests,
                    "wall_s": level.result.wall_s,
                    "timed_out": level.result.timed_out,
                    "metrics": asdict(level.metrics),
                    "records": [record.to_dict() for record in level.result.records],
                }
                for level in self.levels
            ],
        }


def client_options(config: ServeConfig) -> ClientOptions:
    return ClientOptions(
        model=config.model,
        api_key=config.api_key,
        stream_usage=config.stream_usage,
        extra_body=config.extra_body,
    )


async def run_one_level(
    client: StreamingClient, config: ServeConfig, level: Level, progress: Progress | None = None
) -> LevelOutcome:
    """Measures one level: ``requests_for(level)`` requests from the seeded workload, closed loop at a
    concurrency or open loop on the seeded Poisson schedule of a rate."""
    num_requests = config.requests_for(level)
    requests = make_requests(config, num_requests)
    if progress is not None:
        progress.start_level(level, num_requests)
    on_record = progress.record if progress is not None else None
    if level.request_rate is not None:
        result = await run_rate_level(
            client,
            requests,
            request_rate=level.request_rate,
            arrivals_s=arrival_schedule(config, level.request_rate, num_requests),
            request_timeout_s=config.request_timeout_s,
            level_timeout_s=config.level_timeout_s,
            on_record=on_record,
        )
    else:
        assert level.concurrency is not None
        result = await run_level(
            client,
            requests,
            concurrency=level.concurrency,
            num_requests=num_requests,
            request_timeout_s=config.request_timeout_s,
            level_timeout_s=config.level_timeout_s,
            on_record=on_record,
        )
    metrics = compute_level_metrics(
        result.concurrency,
        result.records,
        result.wall_s,
        timed_out=result.timed_out,
        request_rate=result.request_rate,
    )
    if progress is not None:
        progress.end_level(metrics)
    return LevelOutcome(result=result, metrics=metrics)


async def run_serve(
    config: ServeConfig, *, progress: Progress | None = None, client: StreamingClient | None = None
) -> ServeResult:
    """Runs the warmup then each level in order, against ``client`` (built from the config when not given,
    and then closed at the end). Raises WarmupError when the client cannot get ready (e.g. no model listed)
    or a warmup request fails."""
    started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    own_client = client is None
    if client is None:
        client = make_client(
            config.api, config.url, config.params, config.max_in_flight, client_options(config)
        )
    levels: list[LevelOutcome] = []
    try:
        try:
            await client.prepare()
        except RequestError as e:
            raise WarmupError(f"the {config.api} client could not get ready: {e}") from e
        if config.warmup:
            if progress is not None:
                progress.warmup(config.warmup)
            await warmup(
                client,
                make_requests(config, config.warmup, "warmup"),
                config.warmup,
                config.request_timeout_s,
            )
        for level in config.levels:
            levels.append(await run_one_level(client, config, level, progress))
    finally:
        if own_client:
            await client.close()
    return ServeResult(
        config=config,
        prompt=make_requests(config, 1)[0].prompt,
        started_at=started_at,
        levels=levels,
        model=getattr(client, "model", None),
    )
