"""The ``grammar`` logits processor: constrained decoding with llguidance.

A row's argument is a canonical constraint (common/grammar.py: a JSON schema, any JSON object, a regular
expression, or a Lark grammar the router wrote) that the router already checked. Each distinct constraint
is compiled once into a template matcher (a bounded LRU); a row gets its own copy, which shares the
template's compiled grammar and lexer. Per step, the rows' next-token bitmasks are computed (on llguidance's thread pool for large
batches) into one bitmask that is applied to all rows at once; the chosen tokens then advance the matchers.
Once a row's output is complete, only end-of-sequence tokens are allowed, so the request stops on EOS.
Ids of the scores beyond the tokenizer's vocabulary (models pad their output width) are never allowed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from common import grammar

from .base import LogitsProcessor, ProcessorArgumentError, ProcessorContext

log = logging.getLogger(__name__)

# From this many rows on, masks are computed on llguidance's threads (below, one thread is as fast: a mask
# takes 0.1-0.3 ms, and waking threads that compete with the model's costs about as much).
PARALLEL_ROWS = 8


class GrammarState:
    """One row's matcher (llguidance.LLMatcher), advanced with every token the row picks."""

    __slots__ = ("matcher",)

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher


def _tokenizer_json(model_path: Path) -> str:
    """The model's tokenizer as tokenizers' JSON: tokenizer.json, else what transformers makes of the
    directory (a slow tokenizer converted to a fast one)."""
    path = model_path / "tokenizer.json"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise RuntimeError(f"{model_path} has no fast tokenizer (tokenizer.json) for constrained decoding")
    return backend.to_str()


class Grammar(LogitsProcessor):
    name = "grammar"
    order = 500
    #: Compiled constraints kept (least recently used first out).
    cache_size = 64

    def __init__(self) -> None:
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._ready = threading.Event()
        self._tokenizer: Any = None
        self._error = ""
        self._executor: Any = None
        self.vocab_size = 0
        self.device = torch.device("cpu")

    def setup(self, context: ProcessorContext) -> None:
        """Builds llguidance's view of the tokenizer (about half a second) on a thread of its own, so that
        the shard's start does not wait for it; the first constrained request does."""
        self.vocab_size = context.vocab_size
        self.device = context.device
        eos = list(context.eos_token_ids)

        def build() -> None:
            try:
                import llguidance

                self._tokenizer = llguidance.LLTokenizer(
                    _tokenizer_json(context.model_path), eos_token=eos or None
                )
                self._executor = llguidance.LLExecutor(num_threads=max(1, min(4, os.cpu_count() or 1)))
            except Exception as e:
                self._error = f"{type(e).__name__}: {e}"
                log.warning("Constrained decoding is unavailable: %s", self._error)
            finally:
                self._ready.set()

        threading.Thread(target=build, name="grammar-setup", daemon=True).start()

    def _template(self, argument: str) -> Any:
        """The compiled, never advanced matcher of a constraint (cached)."""
        template = self._cache.get(argument)
        if template is not None:
            self._cache.move_to_end(argument)
            return template
        import llguidance

        self._ready.wait()
        if self._tokenizer is None:
            raise ProcessorArgumentError(f"constrained decoding is unavailable on this shard: {self._error}")
        try:
            source = grammar.to_llguidance(argument)
        except grammar.GrammarError as e:
            raise ProcessorArgumentError(f"grammar is not valid: {e}") from None
        template = llguidance.LLMatcher(self._tokenizer, source, log_level=0)
        if template.is_error():
            raise ProcessorArgumentError(f"grammar is not valid: {template.get_error()}")
        self._cache[argument] = template
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return template

    def new_state(self, argument: str | None, prompt_ids: list[int]) -> GrammarState | None:
        if argument is None:
            return None
        return GrammarState(self._template(argument).deep_copy())

    def apply(self, scores: torch.Tensor, states: list[GrammarState], last_ids: torch.Tensor) -> torch.Tensor:
        import llguidance.torch as llt

        rows = len(states)
        tokens = self._tokenizer.vocab_size
        bitmask = torch.empty((rows, (tokens + 31) // 32), dtype=torch.int32)
        if rows < PARALLEL_ROWS:
            for row, state in enumerate(states):
                llt.fill_next_token_bitmask(state.matcher, bitmask, row)
        else:
            llt.fill_next_token_bitmask_par(
                self._executor, [(s.matcher, row) for row, s in enumerate(states)], bitmask
            )
        width = min(tokens, scores.shape[1])
        allowed = unpack_bitmask(bitmask.to(scores.device, non_blocking=True), width)
        scores[:, :width].masked_fill_(~allowed, float("-inf"))
        if scores.shape[1] > tokens:
            scores[:, tokens:] = float("-inf")
        return scores

    def advance(self, states: list[GrammarState], ids: list[int]) -> None:
        for state, token in zip(states, ids, strict=True):
            matcher = state.matcher
            if not matcher.is_stopped() and not matcher.consume_token(token):
                # Cannot happen for a token the mask allowed; the matcher now allows only EOS.
                log.warning("grammar: token %d refused: %s", token, matcher.get_error()[:200])


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack_bitmask(bitmask: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, words] int32 bitmask (bit j of word i = token 32 i + j) -> [rows, width] bool, True =
    allowed."""
    shifts = _SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _SHIFTS[bitmask.device] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1
    return bits.view(bitmask.shape[0], -1)[:, :width].bool()
