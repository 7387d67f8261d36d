"""Reporting: the one-screen summary table and the JSON results file (the progress line is
benchmark/progress.py)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from benchmark.metrics import Distribution

if TYPE_CHECKING:
    from benchmark.serve import ServeResult


def fmt(value: float | None) -> str:
    """About three significant digits; ``-`` for a missing value."""
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_percentiles(dist: Distribution, scale: float = 1.0) -> str:
    """``p50/p90/p99`` of a distribution, each multiplied by ``scale`` (1000 for milliseconds)."""
    values = (dist.p50, dist.p90, dist.p99)
    return "/".join(fmt(None if v is None else v * scale) for v in values)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Plain-text table, columns right-aligned and separated by two spaces."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    return [
        "  ".join(str(cell).rjust(width) for cell, width in zip(row, widths, strict=True))
        for row in [headers, *rows]
    ]


def describe_workload(result: ServeResult) -> str:
    """``max_new_tokens 64 ignore_eos | synthetic prompts ~512 tokens`` (with the random ranges)."""
    config = result.config
    out = f"max_new_tokens {config.params.max_new_tokens}"
    if config.random_output_range_ratio:
        out += f" (range ratio {config.random_output_range_ratio:g})"
    if config.params.ignore_eos:
        out += " ignore_eos"
    if config.input_tokens is not None:
        out += f" | synthetic prompts ~{config.input_tokens} tokens"
        if config.random_input_range_ratio:
            out += f" (range ratio {config.random_input_range_ratio:g})"
    else:
        out += f" | prompt {len(result.prompt)} chars"
    if config.models:
        out += f" | spread over {len(config.models)} models: {', '.join(config.models)}"
    return out


def format_summary(result: ServeResult) -> str:
    """The one-screen summary of a ``serve`` run."""
    config = result.config
    model = f" model {result.model} |" if result.model else ""
    lines = [
        f"text-generation-benchmark serve: {result.label} | {config.api} {config.url} |{model} "
        f"{describe_workload(result)}",
        "",
    ]
    open_loop = config.open_loop
    headers = [
        "rate/s" if open_loop else "conc",
        *(["peak"] if open_loop else []),
        "reqs",
        "ok",
        "err",
        "TTFT ms p50/p90/p99",
        "TPOT ms p50/p90/p99",
        "ITL ms p50/p90/p99",
        "E2E s p50/p90/p99",
        "out tok/s",
        "req/s",
    ]
    rows = []
    for level in result.levels:
        m = level.metrics
        rows.append(
            [
                f"{m.request_rate:g}" if open_loop else str(m.concurrency),
                *([str(m.max_in_flight)] if open_loop else []),
                str(m.num_requests),
                str(m.num_ok),
                str(m.num_errors),
                fmt_percentiles(m.ttft_s, 1000),
                fmt_percentiles(m.tpot_s, 1000),
                fmt_percentiles(m.itl_s, 1000),
                fmt_percentiles(m.e2e_s),
                fmt(m.output_tokens_per_s),
                fmt(m.requests_per_s),
            ]
        )
    lines += format_table(headers, rows)
    lines.append("")
    if open_loop:
        lines.append(
            f"peak: most requests in flight at once (open loop: Poisson arrivals, seed {config.seed})"
        )
    for level in result.levels:
        m = level.metrics
        if m.errors_by_kind:
            kinds = ", ".join(f"{kind} x{count}" for kind, count in m.errors_by_kind.items())
            lines.append(f"errors at {m.level_name}: {kinds}")
        if m.timed_out:
            lines.append(f"{m.level_name} stopped at the level timeout ({config.level_timeout_s:g} s)")
        if m.token_count_mismatches:
            lines.append(
                f"warning: at {m.level_name}, {m.token_count_mismatches} request(s) streamed a "
                "token count different from the server's generated_tokens"
            )
    decode = result.single_stream_decode_tokens_per_s
    if decode is not None:
        lines.append(f"single-stream decode: {fmt(decode)} tokens/s (1 / median TPOT at concurrency 1)")
    elif not open_loop:
        lines.append("single-stream decode: - (needs concurrency 1 with 2+ output tokens)")
    return "\n".join(lines)


def write_json(result: ServeResult, path: str | Path) -> Path:
    """Writes the results file (parent folders created); returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return path
