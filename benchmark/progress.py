"""The progress line a run writes to stderr while its levels run (benchmark/serve.py drives it)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from benchmark.config import Level
from benchmark.metrics import LevelMetrics
from benchmark.records import RequestRecord


class Progress:
    """A one-line progress display: rewritten in place on a terminal, one line per level otherwise."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self._level = ""
        self._errors = 0
        self._start = time.perf_counter()

    def _write(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text)
            self.stream.flush()

    def warmup(self, count: int) -> None:
        self._write(f"warmup: {count} request(s)\n")

    def start_level(self, level: Level | int, num_requests: int) -> None:
        """A level starts (an int is a concurrency level)."""
        if not isinstance(level, Level):
            level = Level(concurrency=level)
        self._level, self._errors, self._start = level.name, 0, time.perf_counter()
        if self.live:
            self._write(f"\r{self._level}: 0/{num_requests} requests")

    def record(self, record: RequestRecord, done: int, total: int) -> None:
        self._errors += not record.ok
        if self.live:
            elapsed = time.perf_counter() - self._start
            self._write(
                f"\r{self._level}: {done}/{total} requests, {self._errors} errors, {elapsed:.1f} s\x1b[K"
            )

    def end_level(self, metrics: LevelMetrics) -> None:
        line = (
            f"{metrics.level_name}: {metrics.num_requests} requests in {metrics.wall_s:.1f} s, "
            f"{metrics.output_tokens_per_s:.1f} output tokens/s, {metrics.num_errors} errors"
        )
        if metrics.timed_out:
            line += " (level timeout)"
        self._write(f"\r{line}\x1b[K\n" if self.live else f"{line}\n")
