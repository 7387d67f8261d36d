"""Text scanning helpers, and the stream they serve (``StepStream``), shared by the tool-call and reasoning
parsers.

Everything here works on a growing buffer: a scan that cannot decide yet says so (None), and the same
decision is reached whatever the split of the text into deltas, which is what keeps streamed parsing equal
to whole-text parsing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

Out = TypeVar("Out")


def held_suffix(text: str, tags: Iterable[str]) -> int:
    """The length of the longest suffix of ``text`` that is a proper prefix of one of ``tags``: the part a
    stream must hold back, since the next delta could complete it into a tag."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(text)), best, -1):
            if text.endswith(tag[:n]):
                best = n
                break
    return best


def find_first(text: str, tags: Iterable[str], start: int = 0) -> tuple[int, str] | None:
    """The earliest occurrence of any of ``tags`` in ``text`` from ``start`` (the longest tag on a tie)."""
    best: tuple[int, str] | None = None
    for tag in tags:
        i = text.find(tag, start)
        if i >= 0 and (best is None or i < best[0] or (i == best[0] and len(tag) > len(best[1]))):
            best = (i, tag)
    return best


def skip_space(text: str, pos: int) -> int:
    """The index of the first non-whitespace character at or after ``pos`` (``len(text)`` if none)."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


class StepStream(ABC, Generic[Out]):
    """A stream that keeps unread text in ``buf`` and lets ``step`` consume it: the shape of the tool-call
    and the reasoning streams, whose output (``Out``) ``take`` returns.

    ``step(final)`` looks at the start of ``buf`` and either consumes something (returning True) or
    decides that nothing more can be decided before more text comes (False). It must decide only what no
    later text could change, and with ``final`` it must consume everything (what it leaves goes to
    ``flush``)."""

    def __init__(self) -> None:
        self.buf = ""
        self._finished = False

    def feed(self, delta: str) -> Out:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self.buf += delta
        while self.step(False):
            pass
        return self.take()

    def finish(self) -> Out:
        if self._finished:
            return self.take()
        self._finished = True
        while self.buf and self.step(True):
            pass
        self.flush()
        return self.take()

    @abstractmethod
    def step(self, final: bool) -> bool: ...

    @abstractmethod
    def flush(self) -> None:
        """At the end: whatever is still held goes out."""

    @abstractmethod
    def take(self) -> Out:
        """The output released since the last ``take`` (and forgets it)."""

    def emit_until(self, tags: tuple[str, ...], final: bool, emit: Callable[[str], None]) -> str | None:
        """Emits the text of ``buf`` before the first of ``tags`` and leaves ``buf`` starting at that tag,
        which it returns. Without a tag in ``buf``, emits all of it but a suffix that may be the start of
        one (all of it when ``final``) and returns None."""
        buf = self.buf
        found = find_first(buf, tags)
        if found is None:
            keep = 0 if final else held_suffix(buf, tags)
            emit(buf[: len(buf) - keep])
            self.buf = buf[len(buf) - keep :]
            return None
        i, tag = found
        emit(buf[:i])
        self.buf = buf[i:]
        return tag


_OPEN = {"[": "]", "{": "}", "(": ")"}
_CLOSE = frozenset("]})")


class BracketScanner:
    """Finds where a bracketed value that starts at ``start`` ends, incrementally.

    ``python=False`` reads JSON strings (double quotes, backslash escapes); ``python=True`` also reads
    Python's single-quoted and triple-quoted strings. Only nesting is tracked, not validity: the caller
    parses the span once it is closed. Brackets are counted, not paired: ``[f(x]`` is still open, and a
    span that closes with a wrong bracket fails to parse, as it should."""

    def __init__(self, start: int, python: bool = False) -> None:
        self.pos = start
        self.python = python
        self.depth = 0
        self.quote: str | None = None  # the delimiter of the string being read

    def advance(self, text: str) -> int | None:
        """Reads ``text`` (the same buffer, grown since the last call) as far as it can; returns the index
        just past the closing bracket, or None while the value is still open."""
        pos = self.pos
        n = len(text)
        while pos < n:
            ch = text[pos]
            if self.quote is not None:
                if ch == "\\":
                    if pos + 1 >= n:
                        break  # the escaped character has not arrived yet
                    pos += 2
                    continue
                q = self.quote
                if text.startswith(q, pos):
                    pos += len(q)
                    self.quote = None
                    continue
                if len(q) == 3 and ch == q[0] and n - pos < 3:
                    break  # could be the start of the closing triple quote
                if len(q) == 1 and ch == "\n" and self.python:
                    pos += 1  # an unterminated one-line string: let the parser reject it
                    continue
                pos += 1
                continue
            if ch == '"' or (ch == "'" and self.python):
                if self.python:
                    if n - pos < 3:
                        break  # one quote or three: not known yet
                    triple = ch * 3
                    if text.startswith(triple, pos):
                        self.quote = triple
                        pos += 3
                        continue
                self.quote = ch
                pos += 1
                continue
            if ch in _OPEN:
                self.depth += 1
            elif ch in _CLOSE:
                self.depth -= 1
                if self.depth <= 0:
                    self.pos = pos + 1
                    return pos + 1
            pos += 1
        self.pos = pos
        return None
