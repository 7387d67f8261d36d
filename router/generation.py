"""One request's generation in the router: tokens in, text and events out, and when it ends.

Shards only return token ids. Here each token becomes text (incrementally), stop strings are matched,
and the finish reason is decided (TGI's order: length, then EOS, then stop sequence).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .detokenizer import IncrementalDetokenizer, StopMatcher
from .tokenizer import Tokenizer
from .validation import ValidRequest


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float | None
    special: bool

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "text": self.text, "logprob": self.logprob, "special": self.special}


@dataclass(frozen=True)
class Finished:
    """How a request ended, with what its final answer carries."""

    generated_text: str
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    generated_tokens: int
    seed: int | None
    prefill: list[Token]
    tokens: list[Token]
    top_tokens: list[list[Token]]


@dataclass(frozen=True)
class StreamEvent:
    """One generated token, and on the last one, how the request ended."""

    token: Token
    top_tokens: list[Token] = field(default_factory=list)
    finished: Finished | None = None


class GenerationState:
    def __init__(self, request: ValidRequest, tokenizer: Tokenizer, eos_ids: frozenset[int]) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.eos_ids = frozenset() if request.ignore_eos_token else eos_ids
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.input_ids)
        self.stops = StopMatcher(request.stop, include_stop=True)
        self.text_parts: list[str] = []
        self.tokens: list[Token] = []
        self.top_tokens: list[list[Token]] = []
        self.prefill: list[Token] = []

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)

    def set_prefill(self, ids: list[int], logprobs: list[float]) -> None:
        self.prefill = [
            Token(i, self.tokenizer.token_text(i), None if lp != lp else lp, self.tokenizer.is_special(i))
            for i, lp in zip(ids, logprobs, strict=True)
        ]

    def push(self, token_id: int, logprob: float, top: list[tuple[int, float]]) -> StreamEvent:
        """Accounts one generated token; returns its stream event (with ``finished`` on the last one)."""
        special = self.tokenizer.is_special(token_id)
        stopped = False
        if special:
            text = self.tokenizer.token_text(token_id)
        else:
            text, stopped = self.stops.push(self.detokenizer.push(token_id))
        if len(self.tokens) + 1 >= self.request.max_new_tokens:
            finish_reason = "length"
        elif token_id in self.eos_ids:
            finish_reason = "eos_token"
        else:
            finish_reason = "stop_sequence" if stopped else None
        if finish_reason and not stopped:
            # Release what was held back: a partial character or a partial stop string.
            tail, hit = self.stops.push(self.detokenizer.flush())
            tail += "" if hit else self.stops.flush()
            if special:
                # A special token's own text is its token string; keep the tail in the final text.
                self.text_parts.append(tail)
            else:
                text += tail
        token = Token(token_id, text, logprob, special)
        self.tokens.append(token)
        if not special:
            self.text_parts.append(text)
        top_tokens = [
            Token(i, self.tokenizer.token_text(i), lp, self.tokenizer.is_special(i))
            for i, lp in top[: self.request.top_n_tokens]
        ]
        if self.request.top_n_tokens:
            self.top_tokens.append(top_tokens)
        finished = self._finish(finish_reason) if finish_reason else None
        return StreamEvent(token, top_tokens, finished)

    def _finish(self, reason: str) -> Finished:
        text = "".join(self.text_parts)
        if self.request.return_full_text:
            text = self.request.inputs + text
        return Finished(
            generated_text=text,
            finish_reason=reason,
            generated_tokens=len(self.tokens),
            seed=self.request.seed,
            prefill=self.prefill,
            tokens=self.tokens,
            top_tokens=self.top_tokens,
        )
