"""Which engine runs a backend: the one place that picks it."""

from __future__ import annotations

from .backends.base import Backend
from .backends.paged import PagedBackend
from .chunked import PREFILL_TOKENS, SPECULATE, ChunkedEngine
from .config import ConfigError
from .engine import Engine, EngineBackend, StepEngine
from .faults import Faults
from .processors import Processors


def runs_processors(backend: Backend | EngineBackend) -> bool:
    """Whether the backend's engine applies logits processors: not one that brings its own engine
    (CTranslate2 samples inside its own decoding loop)."""
    return not isinstance(backend, EngineBackend)


def make_engine(
    backend: Backend | EngineBackend,
    faults: Faults | None = None,
    processors: Processors | None = None,
    prefill_tokens: int | None = None,
    speculate: int | None = None,
) -> StepEngine:
    """The engine for ``backend``: its own when it brings one (``EngineBackend``: CTranslate2); the
    scheduled chunked-prefill engine for the paged backend (prompt chunks mixed into decode steps); else
    the plain one (whole prompts). ``prefill_tokens``: prompt tokens of a step that decodes nothing
    (--max-batch-prefill-tokens); ``speculate``: most draft tokens per sequence and step (--speculate,
    paged backend; None: its default where drafting pays, none on int8/int4 weights). A number of draft tokens for another engine is
    refused (``ConfigError``)."""
    if speculate and not isinstance(backend, PagedBackend):
        raise ConfigError(
            f"`--speculate {speculate}` needs the paged backend; this model is served by "
            f"{type(backend).__name__}"
        )
    if isinstance(backend, EngineBackend):
        return backend.make_engine(faults)
    if isinstance(backend, PagedBackend):
        if speculate is None:
            # int8 / int4 round activations to int8, which can turn the last-bit difference between a
            # drafted step's arithmetic and a plain one's into another token; and whether a step drafts
            # depends on measured timings. Without drafts a seeded request repeats itself exactly.
            speculate = 0 if backend.quantize else SPECULATE
        return ChunkedEngine(
            backend,
            faults,
            processors,
            PREFILL_TOKENS if prefill_tokens is None else prefill_tokens,
            speculate,
        )
    return Engine(backend, faults, processors)
