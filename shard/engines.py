"""Which engine runs a backend: the one place that picks it."""

from __future__ import annotations

from .backends.base import Backend
from .backends.ct2 import CT2Backend
from .backends.paged import PagedBackend
from .chunked import ChunkedEngine
from .ct2_engine import CT2Engine
from .engine import Engine, StepEngine
from .faults import Faults
from .processors import Processors


def runs_processors(backend: Backend | CT2Backend) -> bool:
    """Whether the backend's engine applies logits processors: not CTranslate2's, which samples inside
    its own decoding loop."""
    return not isinstance(backend, CT2Backend)


def make_engine(
    backend: Backend | CT2Backend,
    faults: Faults | None = None,
    processors: Processors | None = None,
    prefill_tokens: int | None = None,
) -> StepEngine:
    """The engine for ``backend``: CTranslate2's own decoding loop; the scheduled chunked-prefill engine
    for the paged backend (prompt chunks mixed into decode steps); else the plain one (whole prompts).
    ``prefill_tokens``: prompt tokens of a step that decodes nothing (--max-batch-prefill-tokens)."""
    if isinstance(backend, CT2Backend):
        return CT2Engine(backend, faults)
    if isinstance(backend, PagedBackend):
        if prefill_tokens is None:
            return ChunkedEngine(backend, faults, processors)
        return ChunkedEngine(backend, faults, processors, prefill_tokens)
    return Engine(backend, faults, processors)
