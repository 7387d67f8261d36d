"""RequestRecord: the raw measurements of one request, as the client saw it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """One request of a level.

    All times are seconds from ``time.perf_counter``. ``start_s`` is the send time relative to the level's
    start (``scheduled_s`` the planned one, for an open-loop level); every other time is relative to the
    request's own send time. ``token_times_s`` holds the arrival time of each streamed output token (an
    event carrying n tokens adds n equal times), so ``ttft_s`` is its first entry. ``e2e_s`` is the arrival
    time of the final event (of the failure, for a failed request).

    ``output_tokens`` is the count the metrics use: the tokens counted in the stream
    (``token_count_source`` ``stream``), replaced by the server's usage count when an OpenAI server sent
    one (``usage``). ``server_output_tokens`` is the server's own count (TGI's ``details.generated_tokens``,
    OpenAI's ``usage.completion_tokens``) when it sent one; ``prompt_tokens`` likewise from OpenAI usage.
    ``max_new_tokens`` and ``input_tokens`` are what the request asked for (``input_tokens``: the synthetic
    prompt's target length); ``model`` the model or LoRA adapter it named when the run spread its requests
    over several (``serve --models``), else None.
    """

    index: int
    concurrency: int | None
    start_s: float = 0.0
    ok: bool = False
    error_kind: str | None = None
    error_message: str | None = None
    status: int | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    server_output_tokens: int | None = None
    finish_reason: str | None = None
    token_times_s: list[float] = field(default_factory=list)
    request_rate: float | None = None
    scheduled_s: float | None = None
    max_new_tokens: int | None = None
    input_tokens: int | None = None
    prompt_tokens: int | None = None
    token_count_source: str = "stream"
    model: str | None = None

    def add_tokens(self, n: int, at_s: float) -> None:
        """Records ``n`` tokens that arrived ``at_s`` seconds after the request was sent."""
        if n <= 0:
            return
        if self.ttft_s is None:
            self.ttft_s = at_s
        self.output_tokens += n
        self.token_times_s.extend([at_s] * n)

    def use_server_count(self, n: int) -> None:
        """Makes the server's count ``n`` (OpenAI usage) the request's output token count."""
        self.server_output_tokens = n
        self.output_tokens = n
        self.token_count_source = "usage"

    def fail(self, kind: str, message: str, *, status: int | None = None, at_s: float | None = None) -> None:
        self.ok = False
        self.error_kind = kind
        self.error_message = message
        self.status = status
        if at_s is not None:
            self.e2e_s = at_s

    @property
    def streamed_tokens(self) -> int:
        """Tokens counted in the stream (one per token event or per non-empty OpenAI chunk)."""
        return len(self.token_times_s)

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (E2E - TTFT) / (tokens - 1); None under 2 tokens."""
        if self.output_tokens < 2 or self.e2e_s is None or self.ttft_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        """Inter-token latencies: the gaps between consecutive token arrivals."""
        times = self.token_times_s
        return [b - a for a, b in itertools.pairwise(times)]

    @property
    def token_count_mismatch(self) -> bool:
        """True when the server reported a token count different from the events counted (only where the
        stream is the count: an OpenAI chunk need not carry exactly one token)."""
        return (
            self.token_count_source == "stream"
            and self.server_output_tokens is not None
            and self.server_output_tokens != self.output_tokens
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the derived TPOT added."""
        return {
            "index": self.index,
            "concurrency": self.concurrency,
            "request_rate": self.request_rate,
            "scheduled_s": self.scheduled_s,
            "start_s": self.start_s,
            "ok": self.ok,
            "error_kind": self.error_kind,
            "error_message": self.error_message,
            "status": self.status,
            "max_new_tokens": self.max_new_tokens,
            "input_tokens": self.input_tokens,
            "prompt_tokens": self.prompt_tokens,
            "model": self.model,
            "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s,
            "e2e_s": self.e2e_s,
            "output_tokens": self.output_tokens,
            "streamed_tokens": self.streamed_tokens,
            "server_output_tokens": self.server_output_tokens,
            "token_count_source": self.token_count_source,
            "finish_reason": self.finish_reason,
            "token_times_s": self.token_times_s,
        }
