"""One request's generation in the router: tokens in, text and events out, and when it ends.

Shards return token ids, and end requests on their length, an end-of-sequence id or a stop token id (the
finish reason comes with the token). Here each token becomes text (incrementally), stop strings are
matched, and the finish reason is settled (TGI's order: length, then EOS, then stop sequence).
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


# The top tokens of an event that asked for none (shared: nobody mutates an event's list).
NO_TOP_TOKENS: list[Token] = []


class GenerationState:
    """One request's tokens, text and ending. ``begin`` then ``push`` account each generated token (the
    receiving loop's per-token path: the facts it checks are precomputed here, once per request)."""

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
        self.max_new_tokens = request.max_new_tokens
        self.min_new_tokens = request.min_new_tokens
        self.special_ids = tokenizer.special_ids
        stop_ids = frozenset(request.stop_token_ids)
        # Tokens that end the request (past min_new_tokens) and tokens that add no text.
        self.end_ids = self.eos_ids | stop_ids
        skipped = self.special_ids - request.keep_special_ids if request.skip_special_tokens else frozenset()
        self.silent_ids = self.end_ids | skipped
        self.has_stops = bool(self.stops.stops)
        # ``plain`` applies: no stop strings, no top tokens; and the ids it leaves to ``begin``/``push``.
        self.plain_ok = not self.has_stops and not request.top_n_tokens
        self.not_plain_ids = self.end_ids | self.special_ids
        self.piece = tokenizer.piece

    @property
    def generated_tokens(self) -> int:
        return len(self.tokens)

    def set_prefill(self, ids: list[int], logprobs: list[float]) -> None:
        self.prefill = [
            Token(i, self.tokenizer.token_text(i), None if lp != lp else lp, self.tokenizer.is_special(i))
            for i, lp in zip(ids, logprobs, strict=True)
        ]

    def silent(self, token_id: int) -> bool:
        """An end-of-sequence or skipped special token: it adds no text."""
        return token_id in self.silent_ids

    def plain(self, token_id: int, logprob: float) -> StreamEvent | None:
        """``begin`` and ``push`` in one for the common token: one that the shard did not end and that
        ends nothing here (``_ends_nothing``), whose text is known without decoding. Returns its event;
        None, changing nothing, for any other token."""
        if not self._ends_nothing(token_id):
            return None
        text = self.detokenizer.push_piece(token_id, self.piece(token_id))
        if text is None:
            return None
        return self._plain_event(token_id, text, logprob)

    def _ends_nothing(self, token_id: int) -> bool:
        """Whether this next token is plain: not the last one, not an end-of-sequence or special token,
        and the request watches no stop strings and wants no top tokens."""
        return (
            self.plain_ok
            and token_id not in self.not_plain_ids
            and len(self.tokens) + 1 < self.max_new_tokens
        )

    def _plain_event(self, token_id: int, text: str, logprob: float) -> StreamEvent:
        self.text_parts.append(text)
        token = Token(token_id, text, logprob, False)
        self.tokens.append(token)
        return StreamEvent(token, text, NO_TOP_TOKENS)

    def begin(self, token_id: int) -> str | tuple[list[int], list[int]] | None:
        """First half of ``push`` for a caller that decodes many requests' tokens at once: None for a
        token that adds no text (``silent``), the token's text when it is known without decoding (the
        common case, see ``IncrementalDetokenizer.push_piece``), else the two id windows to decode (pass
        the decoded pair to ``push`` as ``texts``; a str goes as ``text``)."""
        if token_id in self.silent_ids:
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
        ended: str | None = None,
    ) -> StreamEvent:
        """Accounts one generated token; returns its stream event (with ``finished`` on the last one).

        ``texts``: the decoded ``detokenizer.windows(token_id)``, or ``text``: the token's text, when the
        caller has already called ``begin`` (or ``windows``); otherwise the token is decoded here.
        ``ended``: the finish reason the shard gave with the token ("length", "eos_token" or
        "stop_sequence" for a stop token id), None when it goes on there (a stop string may end it here)."""
        if ended is None and text is not None and self._ends_nothing(token_id):
            return self._plain_event(token_id, text, logprob)
        return self._push(token_id, logprob, top, texts, text, ended)

    def _push(
        self,
        token_id: int,
        logprob: float,
        top: list[tuple[int, float]],
        texts: tuple[str, str] | None,
        text: str | None,
        ended: str | None,
    ) -> StreamEvent:
        """``push`` for any token: stop strings, special tokens, top tokens, the last token."""
        r = self.request
        count = len(self.tokens) + 1
        may_end = count >= self.min_new_tokens
        special = token_id in self.special_ids
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
            if may_end and self.has_stops:
                delta, stopped = self.stops.push(delta)
        finish_reason = ended or ("stop_sequence" if stopped else None)
        if finish_reason and not stopped:
            # Release what was held back: a partial character or a partial stop string.
            tail, hit = self.stops.push(self.detokenizer.flush())
            delta += tail if hit else tail + self.stops.flush()
        self.text_parts.append(delta)
        # TGI shows a special token's own string (clients skip it by its `special` flag).
        token = Token(token_id, self.tokenizer.token_text(token_id) if special else delta, logprob, special)
        self.tokens.append(token)
        top_tokens = NO_TOP_TOKENS
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
