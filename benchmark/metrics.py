"""Metrics computed from request records: percentiles and the per-level figures serving users quote."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from benchmark.records import RequestRecord


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0 <= q <= 100) by linear interpolation between closest ranks (numpy's default
    method); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Distribution:
    """Summary of one measured quantity (seconds); every field but ``count`` is None when it is empty."""

    count: int = 0
    mean: float | None = None
    min: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Iterable[float]) -> Distribution:
        data = sorted(values)
        if not data:
            return cls()
        return cls(
            count=len(data),
            mean=sum(data) / len(data),
            min=data[0],
            p50=percentile(data, 50),
            p90=percentile(data, 90),
            p99=percentile(data, 99),
            max=data[-1],
        )


@dataclass(frozen=True)
class LevelMetrics:
    """The figures of one level: a closed-loop ``concurrency`` level, or an open-loop ``request_rate`` one
    (then ``concurrency`` is None).

    Latency distributions (seconds) use the successful requests only: TTFT and E2E per request, TPOT per
    request with at least 2 tokens, ITL pooled over all gaps of all successful requests. Throughputs divide
    by the level's wall time: ``output_tokens_per_s`` counts every token received (failed requests'
    partial answers included), ``requests_per_s`` counts successful requests. ``max_in_flight`` is the
    largest number of requests in flight at once (what an open-loop rate turned into).
    """

    concurrency: int | None
    num_requests: int
    num_ok: int
    num_errors: int
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_s: Distribution
    tpot_s: Distribution
    itl_s: Distribution
    e2e_s: Distribution
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    token_count_mismatches: int = 0
    timed_out: bool = False
    request_rate: float | None = None
    max_in_flight: int = 0

    @property
    def level_name(self) -> str:
        """``concurrency 8`` or ``rate 2 req/s``."""
        if self.request_rate is not None:
            return f"rate {self.request_rate:g} req/s"
        return f"concurrency {self.concurrency}"


def max_in_flight(records: Iterable[RequestRecord]) -> int:
    """The largest number of requests in flight at once, from their send times and durations."""
    edges = []
    for r in records:
        if r.e2e_s is not None:
            edges += [(r.start_s, 1), (r.start_s + r.e2e_s, -1)]
    peak = current = 0
    for _, step in sorted(edges):  # at equal times an end (-1) sorts before a start (+1)
        current += step
        peak = max(peak, current)
    return peak


def compute_level_metrics(
    concurrency: int | None,
    records: Sequence[RequestRecord],
    wall_s: float,
    *,
    timed_out: bool = False,
    request_rate: float | None = None,
) -> LevelMetrics:
    """LevelMetrics from a level's records and wall time (``concurrency`` None for a rate level)."""
    ok = [r for r in records if r.ok]
    errors = Counter(r.error_kind or "unknown" for r in records if not r.ok)
    output_tokens = sum(r.output_tokens for r in records)
    return LevelMetrics(
        concurrency=concurrency,
        num_requests=len(records),
        num_ok=len(ok),
        num_errors=len(records) - len(ok),
        wall_s=wall_s,
        output_tokens=output_tokens,
        output_tokens_per_s=output_tokens / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        ttft_s=Distribution.of(r.ttft_s for r in ok if r.ttft_s is not None),
        tpot_s=Distribution.of(t for r in ok if (t := r.tpot_s) is not None),
        itl_s=Distribution.of(gap for r in ok for gap in r.itl_s),
        e2e_s=Distribution.of(r.e2e_s for r in ok if r.e2e_s is not None),
        errors_by_kind=dict(sorted(errors.items())),
        token_count_mismatches=sum(1 for r in ok if r.token_count_mismatch),
        timed_out=timed_out,
        request_rate=request_rate,
        max_in_flight=max_in_flight(records),
    )


def single_stream_decode_tokens_per_s(levels: Iterable[LevelMetrics]) -> float | None:
    """1 / median TPOT at concurrency 1: the decode speed one user sees; None without such a level."""
    for level in levels:
        if level.concurrency == 1 and level.tpot_s.p50:
            return 1.0 / level.tpot_s.p50
    return None
