"""Settings of a benchmark run: one frozen dataclass per command, built once from the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

MIN_REQUESTS_PER_LEVEL = 8
REQUESTS_PER_CONCURRENCY = 4


@dataclass(frozen=True)
class GenerationParams:
    """What every request asks the server to generate (greedy, fixed length where the server allows)."""

    max_new_tokens: int = 64
    # Sent only when True: servers that do not know the parameter would reject it.
    ignore_eos: bool = False


@dataclass(frozen=True)
class ServeConfig:
    """The ``serve`` command: a closed-loop sweep over concurrency levels against one endpoint."""

    url: str = "http://127.0.0.1:3000"
    api: str = "tgi"
    concurrency: tuple[int, ...] = (1, 8, 32)
    # None: max(MIN_REQUESTS_PER_LEVEL, REQUESTS_PER_CONCURRENCY * concurrency) for each level.
    requests_per_level: int | None = None
    params: GenerationParams = field(default_factory=GenerationParams)
    # The prompt text; when input_tokens is set, a synthetic prompt of about that many tokens replaces it.
    prompt: str = "Write a short story about a robot who learns to paint."
    input_tokens: int | None = None
    warmup: int = 1
    request_timeout_s: float = 120.0
    level_timeout_s: float = 600.0
    output: str | None = None

    def __post_init__(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"concurrency: every level must be >= 1, got {self.concurrency}")
        if self.requests_per_level is not None and self.requests_per_level < 1:
            raise ValueError(f"requests_per_level must be >= 1, got {self.requests_per_level}")
        if self.params.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.params.max_new_tokens}")
        if self.input_tokens is not None and self.input_tokens < 1:
            raise ValueError(f"input_tokens must be >= 1, got {self.input_tokens}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.request_timeout_s <= 0 or self.level_timeout_s <= 0:
            raise ValueError("timeouts must be > 0 seconds")

    def requests_for(self, concurrency: int) -> int:
        """Number of requests measured at one concurrency level."""
        if self.requests_per_level is not None:
            return self.requests_per_level
        return max(MIN_REQUESTS_PER_LEVEL, REQUESTS_PER_CONCURRENCY * concurrency)
