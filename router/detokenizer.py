"""Incremental detokenization and stop strings, so streamed text equals the final text.

``IncrementalDetokenizer`` turns one token at a time into text, withholding text while it ends in a
broken UTF-8 sequence (U+FFFD) and using a few prompt tokens as context so leading spaces come out as the
full decode would give them. ``StopMatcher`` holds back any tail that could still grow into a stop string,
so a partial match never reaches a stream, and cuts the text at the first complete one.
"""

from __future__ import annotations

from typing import Protocol

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = ..., **kwargs: object) -> str: ...


class IncrementalDetokenizer:
    """TGI's prefix/read-offset scheme: decode a short window, emit what it adds beyond the window's start."""

    def __init__(self, tokenizer: Decoder, prompt_ids: list[int], context: int = 5) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-context:]) if context else []
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        # The text so far is known to end on a character boundary (set once a window has been released;
        # the prompt's context could end inside a character).
        self.aligned = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Adds a token; returns the text it completes ("" while a character is still partial)."""
        prefix_ids, full_ids = self.windows(token_id)
        return self.accept(self._decode(prefix_ids), self._decode(full_ids))

    def windows(self, token_id: int) -> tuple[list[int], list[int]]:
        """Adds a token; returns the two id windows to decode. The caller decodes them (many requests'
        windows in one batch call) and passes the texts to ``accept``."""
        self.ids.append(token_id)
        return self.ids[self.prefix_offset : self.read_offset], self.ids[self.prefix_offset :]

    def accept(self, prefix: str, text: str) -> str:
        """The new text, given the decoded windows of the last ``windows`` call."""
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            self.aligned = True
            return text[len(prefix) :]
        return ""

    def push_piece(self, token_id: int, piece: str | None) -> str | None:
        """Adds a token without decoding when its text is known on its own (``piece``: the token's
        bytes, complete UTF-8; see ``Tokenizer.piece``) and nothing is withheld after text that ends on a
        character boundary: its text is then exactly the piece. Returns None, adding nothing, otherwise
        (the caller decodes the ``windows`` instead)."""
        if piece is None or not self.aligned or self.read_offset != len(self.ids):
            return None
        self.ids.append(token_id)
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return piece

    def flush(self) -> str:
        """Whatever is still withheld (at the end of generation), even if it is a broken character."""
        if self.read_offset >= len(self.ids):
            return ""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :]


class StopMatcher:
    """Finds stop strings in streamed text.

    ``push`` returns the text safe to release now and whether a stop string completed. With
    ``include_stop`` (TGI's behaviour) the released text ends with the stop string; without it (OpenAI's),
    the text ends just before it.
    """

    def __init__(self, stops: list[str], include_stop: bool = True) -> None:
        self.stops = [s for s in stops if s]
        self.include_stop = include_stop
        self.pending = ""

    def push(self, delta: str) -> tuple[str, bool]:
        if not self.stops:
            return delta, False
        text = self.pending + delta
        hits = [(text.find(s), s) for s in self.stops]
        hits = [(i, s) for i, s in hits if i >= 0]
        if hits:
            # The stop that completes first wins (then the earliest start): the same cut for any chunking.
            start, stop = min(hits, key=lambda h: (h[0] + len(h[1]), h[0]))
            self.pending = ""
            return text[: start + len(stop)] if self.include_stop else text[:start], True
        hold = self._partial_suffix(text)
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
