"""Which engine runs a backend: the one place that picks it."""

from __future__ import annotations

from typing import Any

from .backends.base import Backend
from .backends.paged import PagedBackend
from .chunked import ChunkedEngine
from .engine import Engine
from .faults import Faults
from .processors import Processors


def make_engine(
    backend: Backend | Any,
    faults: Faults | None = None,
    processors: Processors | None = None,
    prefill_tokens: int | None = None,
) -> Any:
    """The engine for ``backend``: its own when it has a decoding loop of its own (CTranslate2, which runs
    no logits processors), the scheduled chunked-prefill one when it can mix prompt chunks into decode
    steps (the paged backend), else the plain one. ``prefill_tokens``: prompt tokens of a step that
    decodes nothing (--max-batch-prefill-tokens)."""
    own_engine = getattr(backend, "make_engine", None)
    if own_engine is not None:
        return own_engine(faults)
    if isinstance(backend, PagedBackend):
        if prefill_tokens is None:
            return ChunkedEngine(backend, faults, processors)
        return ChunkedEngine(backend, faults, processors, prefill_tokens)
    return Engine(backend, faults, processors)
