"""Settings of a benchmark run: one frozen dataclass per command, built once from the CLI."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

MIN_REQUESTS_PER_LEVEL = 8
REQUESTS_PER_CONCURRENCY = 4
# Default requests of an open-loop level: about this many seconds of arrivals at its rate.
SECONDS_PER_RATE_LEVEL = 30.0


@dataclass(frozen=True)
class GenerationParams:
    """What every request asks the server to generate (greedy, fixed length where the server allows)."""

    max_new_tokens: int = 64
    # Sent only when True: servers that do not know the parameter would reject it.
    ignore_eos: bool = False


@dataclass(frozen=True)
class Level:
    """One load level of a sweep: closed-loop ``concurrency`` or open-loop Poisson ``request_rate``."""

    concurrency: int | None = None
    request_rate: float | None = None

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.request_rate is None):
            raise ValueError("a level has either a concurrency or a request rate")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency: every level must be >= 1, got {self.concurrency}")
        if self.request_rate is not None and not (0 < self.request_rate < math.inf):
            raise ValueError(f"request_rate: every rate must be > 0 and finite, got {self.request_rate}")

    @property
    def open_loop(self) -> bool:
        return self.request_rate is not None

    @property
    def name(self) -> str:
        """``concurrency 8`` or ``rate 2 req/s`` (progress lines, messages)."""
        if self.request_rate is not None:
            return f"rate {self.request_rate:g} req/s"
        return f"concurrency {self.concurrency}"


@dataclass(frozen=True)
class ServeConfig:
    """The ``serve`` command: a sweep of load levels against one endpoint.

    The levels are closed-loop concurrency levels, or open-loop Poisson request rates when
    ``request_rates`` is not empty (then ``concurrency`` is ignored and may be empty).
    """

    url: str = "http://127.0.0.1:3000"
    api: str = "tgi"
    concurrency: tuple[int, ...] = (1, 8, 32)
    # Open-loop levels (requests/s); when set they replace the concurrency levels.
    request_rates: tuple[float, ...] = ()
    # None: the default of each level (see requests_for).
    requests_per_level: int | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    # The prompt text; when input_tokens is set, synthetic prompts of about that many tokens replace it.
    prompt: str = "Write a short story about a robot who learns to paint."
    input_tokens: int | None = None
    # Lengths drawn uniformly in [N(1 - r), N] per request (0: fixed length N).
    random_input_range_ratio: float = 0.0
    random_output_range_ratio: float = 0.0
    # Seeds the synthetic prompts, the random lengths and the Poisson arrival times.
    seed: int = 0
    warmup: int = 1
    request_timeout_s: float = 120.0
    level_timeout_s: float = 600.0
    output: str | None = None
    # The name of this run (legend of the plots); None: derived from the API and the URL.
    label: str | None = None
    # OpenAI APIs: the model name (None: the first id of GET /v1/models), a bearer token, whether to ask
    # for usage in the stream, and fields merged into every request body.
    model: str | None = None
    # Models spread over the requests, request i naming models[i % len(models)]: OpenAI's ``model``, TGI's
    # ``parameters.adapter_id`` (LoRA adapters of one server); empty: every request names ``model``.
    models: tuple[str, ...] = ()
    api_key: str | None = field(default=None, repr=False)
    stream_usage: bool = True
    extra_body: dict[str, Any] | None = None
    plot_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.request_rates:
            if not self.concurrency or any(c < 1 for c in self.concurrency):
                raise ValueError(f"concurrency: every level must be >= 1, got {self.concurrency}")
        elif any(not (0 < r < math.inf) for r in self.request_rates):
            raise ValueError(f"request_rate: every rate must be > 0 and finite, got {self.request_rates}")
        if self.requests_per_level is not None and self.requests_per_level < 1:
            raise ValueError(f"requests_per_level must be >= 1, got {self.requests_per_level}")
        if self.params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.params.max_new_tokens}")
        if self.input_tokens is not None and self.input_tokens < 1:
            raise ValueError(f"input_tokens must be >= 1, got {self.input_tokens}")
        for name in ("random_input_range_ratio", "random_output_range_ratio"):
            ratio = getattr(self, name)
            if not 0 <= ratio <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {ratio}")
        if self.random_input_range_ratio and self.input_tokens is None:
            raise ValueError("random_input_range_ratio needs input_tokens (a synthetic prompt length)")
        if self.models and self.model is not None:
            raise ValueError("give model or models, not both (models spreads the requests over several)")
        if any(not name for name in self.models):
            raise ValueError(f"models: every name must be non-empty, got {self.models}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.request_timeout_s <= 0 or self.level_timeout_s <= 0:
            raise ValueError("timeouts must be > 0 seconds")

    @property
    def open_loop(self) -> bool:
        return bool(self.request_rates)

    @property
    def levels(self) -> tuple[Level, ...]:
        """The sweep, in order."""
        if self.request_rates:
            return tuple(Level(request_rate=rate) for rate in self.request_rates)
        return tuple(Level(concurrency=c) for c in self.concurrency)

    @property
    def max_in_flight(self) -> int:
        """Connections a client may need: the largest concurrency, unbounded (0) for open-loop levels."""
        return 0 if self.request_rates else max(self.concurrency)

    def requests_for(self, level: int | Level) -> int:
        """Number of requests measured at one level (an int is a concurrency level).

        Default: max(MIN_REQUESTS_PER_LEVEL, REQUESTS_PER_CONCURRENCY x C) for concurrency C, and
        max(MIN_REQUESTS_PER_LEVEL, SECONDS_PER_RATE_LEVEL x R) for rate R.
        """
        if self.requests_per_level is not None:
            return self.requests_per_level
        if not isinstance(level, Level):
            level = Level(concurrency=level)
        if level.request_rate is not None:
            return max(MIN_REQUESTS_PER_LEVEL, math.ceil(SECONDS_PER_RATE_LEVEL * level.request_rate))
        assert level.concurrency is not None
        return max(MIN_REQUESTS_PER_LEVEL, REQUESTS_PER_CONCURRENCY * level.concurrency)
