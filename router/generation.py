"""One request's generation in the router: tokens in, text and events out, and when it ends.

Shards only return token ids. Here each token becomes text (incrementally), stop strings are matched,
and the finish reason is decided (TGI's order: length, then EOS, then stop sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .detokenizer import IncrementalDetokenizer, StopMatcher
from .tokenizer import Tokenizer
from .validation import ValidRequest


# Token and StreamEvent are made once per generated token: plain slotted dataclasses (a frozen one pays an
# object.__setattr__ per field).
@dataclass(slots=True)
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

    @property
    def mean_logprob(self) -> float:
        """Mean log-probability per generated token: how best_of ranks candidates (TGI's and OpenAI's)."""
        values = [t.logprob for t in self.tokens if t.logprob is not None and math.isfinite(t.logprob)]
        return sum(values) / len(values) if values else -math.inf


@dataclass(slots=True)
class StreamEvent:
    """One generated token, the text it adds to the answer (``delta``), and on the last one, how the
    request ended. The deltas of all events concatenate to the final text."""

    token: Token
    delta: str = ""
    top_tokens: list[Token] = field(default_factory=list)
    finished: Finished | None = None


class GenerationState:
    def __init__(self, request: ValidRequest, tokenizer: Tokenizer, eos_ids: frozenset[int]) -> None:
        self.request = request
        self.tokenizer = tokenizer
        self.eos_ids = frozenset() if request.ignore_eos_token else eos_ids
        self.detokenizer = IncrementalDetokenizer(tokenizer, request.input_ids)
        self.stops = StopMatcher(request.stop, include_stop=request.include_stop)
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

    def will_finish(self, token_id: int) -> bool:
        """Whether this next token ends the request by length or end-of-sequence (a stop string can end
        it too, which only detokenization tells)."""
        r = self.request
        count = len(self.tokens) + 1
        if count >= r.max_new_tokens:
            return True
        return count >= r.min_new_tokens and (token_id in self.eos_ids or token_id in r.stop_token_ids)

    def silent(self, token_id: int) -> bool:
        """An end-of-sequence or skipped special token: it adds no text."""
        r = self.request
        return (
            token_id in self.eos_ids
            or token_id in r.stop_token_ids
            or (r.skip_special_tokens and token_id in self.tokenizer.special_ids)
        )

    def begin(self, token_id: int) -> str | tuple[list[int], list[int]] | None:
        """First half of ``push`` for a caller that decodes many requests' tokens at once: None for a
        token that adds no text (``silent``), the token's text when it is known without decoding (the
        common case, see ``IncrementalDetokenizer.push_piece``), else the two id windows to decode (pass
        the decoded pair to ``push`` as ``texts``; a str goes as ``text``)."""
        if self.silent(token_id):
            return None
        detokenizer = self.detokenizer
        text = detokenizer.push_piece(token_id, self.tokenizer.piece(token_id))
        return text if text is not None else detokenizer.windows(token_id)

    def push(
        self,
        token_id: int,
        logprob: float,
        top: list[tuple[int, float]],
        texts: tuple[str, str] | None = None,
        text: str | None = None,
    ) -> StreamEvent:
        """Accounts one generated token; returns its stream event (with ``finished`` on the last one).

        ``texts``: the decoded ``detokenizer.windows(token_id)``, or ``text``: the token's text, when the
        caller has already called ``begin`` (or ``windows``); otherwise the token is decoded here."""
        r = self.request
        count = len(self.tokens) + 1
        may_end = count >= r.min_new_tokens
        special = token_id in self.tokenizer.special_ids
        stopped = False
        if text is None:
            if texts is not None:
                text = self.detokenizer.accept(*texts)
            elif not self.silent(token_id):
                text = self.detokenizer.push(token_id)
        if text is None:
            delta = ""
        else:
            delta = text
            if may_end and self.stops.stops:
                delta, stopped = self.stops.push(delta)
        if count >= r.max_new_tokens:
            finish_reason = "length"
        elif may_end and token_id in self.eos_ids:
            finish_reason = "eos_token"
        elif stopped or (may_end and token_id in r.stop_token_ids):
            finish_reason = "stop_sequence"
        else:
            finish_reason = None
        if finish_reason and not stopped:
            # Release what was held back: a partial character or a partial stop string.
            tail, hit = self.stops.push(self.detokenizer.flush())
            delta += tail if hit else tail + self.stops.flush()
        self.text_parts.append(delta)
        # TGI shows a special token's own string (clients skip it by its `special` flag).
        token = Token(token_id, self.tokenizer.token_text(token_id) if special else delta, logprob, special)
        self.tokens.append(token)
        top_tokens: list[Token] = []
        if r.top_n_tokens:
            top_tokens = [
                Token(i, self.tokenizer.token_text(i), lp, self.tokenizer.is_special(i))
                for i, lp in top[: r.top_n_tokens]
            ]
            self.top_tokens.append(top_tokens)
        finished = self._finish(finish_reason) if finish_reason else None
        return StreamEvent(token, delta, top_tokens, finished)

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
