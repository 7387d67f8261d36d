"""Llama 3.x JSON tool calls.

Llama 3.1/3.2/3.3 answer a tool call with a JSON object, alone or after ``<|python_tag|>``, several of
them separated by ``;``::

    {"name": "get_weather", "parameters": {"city": "Paris"}}
    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}

A bare ``{`` opens a call only where a call may stand: at the start of the response or right after a
call (past whitespace and one ``;``); ``<|python_tag|>`` opens one anywhere, the text before it staying
content. An object that is not a call is content, so JSON answers come back unchanged: a call has a
``name`` and ``parameters`` (an object) and no other key but ``type``. ``arguments`` is accepted for ``parameters``. The
built-in tools' Python form (``<|python_tag|>brave_search.call(query="...")``) is not parsed: content.
``<|python_tag|>`` is a special token: the text must be detokenized with special tokens kept.
"""

from __future__ import annotations

from .base import (
    BufferedParser,
    BufferedStream,
    CallError,
    IdFactory,
    call_from_object,
    loads_json,
    new_call_id,
)
from .scan import skip_space

PYTHON_TAG = "<|python_tag|>"


_CALL_KEYS = frozenset({"type", "name", "parameters", "arguments"})


def _call(value: str) -> tuple[str, str]:
    obj = loads_json(value)
    # Stricter than the other formats, as a bare object may be a JSON answer: a call has its arguments
    # and nothing else.
    if (
        not isinstance(obj, dict)
        or not obj.keys() <= _CALL_KEYS
        or not obj.keys() & {"parameters", "arguments"}
    ):
        raise CallError("not a call object")
    return call_from_object(obj, ("parameters", "arguments"))


class Llama3JsonStream(BufferedStream):
    def __init__(self, id_factory: IdFactory = new_call_id) -> None:
        super().__init__(id_factory)
        self._state = "content"  # content | tag | object
        self._json_may_open = True  # a bare "{" would open a call here
        self._separator_seen = False  # the ";" after the last call was read

    def step(self, final: bool) -> bool:
        buf = self.buf
        if self._state == "content":
            if self._json_may_open:
                p = skip_space(buf, 0)
                if p == len(buf):
                    return self.wait(final)
                if buf[p] == "{":
                    self.release(p)
                    return self._object(0)
                if buf[p] == ";" and self.calls and not self._separator_seen:
                    self._separator_seen = True
                    self.buf = buf[p + 1 :]
                    return True
                self._json_may_open = False
            if not self.content_until(PYTHON_TAG, final):
                return False
            self._state = "tag"
            return True
        if self._state == "tag":
            p = skip_space(buf, len(PYTHON_TAG))
            if p == len(buf):
                return self.wait(final)
            if buf[p] == "{":
                return self._object(p)
            self.release(len(PYTHON_TAG))
            self._state = "content"
            return True
        closed = self.closed_value()
        if closed is None:
            return self.wait(final)
        region, value = closed
        before = self.calls
        self.calls_or_content(region, lambda: [_call(value)])
        self._state = "content"
        self._json_may_open = self.calls > before
        self._separator_seen = False
        return True

    def _object(self, start: int) -> bool:
        self._state = "object"
        self.open_value(start)
        return True


class Llama3JsonParser(BufferedParser):
    """``llama3_json``: JSON objects ``{"name": ..., "parameters": {...}}``, maybe after
    ``<|python_tag|>``, separated by ``;``."""

    name = "llama3_json"

    def stream(self) -> Llama3JsonStream:
        return Llama3JsonStream(self.id_factory)
