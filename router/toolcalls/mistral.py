"""Mistral tool calls, both generations of the format.

- Up to tokenizer v7 (Mistral-7B-Instruct-v0.3, Mixtral-8x22B, Nemo, Small 2409/2501)::

      [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": ...}]

- Tokenizer v11 and later (Mistral Small 3.1/3.2, Magistral, Devstral, Ministral 3), one marker per call::

      [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}

  (``[CALL_ID]id`` between the name and ``[ARGS]`` is accepted and ignored.)

``[TOOL_CALLS]`` is a special token: the text must be detokenized with special tokens kept. Mistral's chat
templates insist on tool call ids of exactly 9 letters and digits, so this parser's ids have that shape.
A marker that is not followed by a valid call is content.
"""

from __future__ import annotations

import string

from .base import (
    BufferedParser,
    BufferedStream,
    CallError,
    IdFactory,
    call_from_object,
    loads_json,
    random_alphanumeric,
)
from .scan import skip_space

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
_NAME_CHARS = frozenset(string.ascii_letters + string.digits + "_-.")


def new_mistral_call_id() -> str:
    """Nine random letters and digits, the only id shape Mistral's templates accept."""
    return random_alphanumeric(9)


def _is_prefix(text: str, *tags: str) -> bool:
    return any(tag.startswith(text) for tag in tags)


class MistralStream(BufferedStream):
    def __init__(self, id_factory: IdFactory = new_mistral_call_id) -> None:
        super().__init__(id_factory)
        self._state = "content"  # content | marker | array | object
        self._name = ""

    def _not_a_call(self) -> bool:
        """The marker does not start a call: it is content, and reading goes on after it."""
        self.release(len(TOOL_CALLS))
        self._state = "content"
        return True

    def step(self, final: bool) -> bool:
        if self._state == "content":
            if not self.content_until(TOOL_CALLS, final):
                return False
            self._state = "marker"
            return True
        if self._state == "marker":
            return self._marker(final)
        closed = self.closed_value()
        if closed is None:
            return self.wait(final)
        region, value = closed
        if self._state == "array":
            self.calls_or_content(region, lambda: _array_calls(value))
        else:
            name = self._name
            self.calls_or_content(
                region, lambda: [call_from_object({"name": name, "arguments": loads_json(value)})]
            )
        self._state = "content"
        return True

    def _marker(self, final: bool) -> bool:
        buf = self.buf
        p = skip_space(buf, len(TOOL_CALLS))
        if p == len(buf):
            return self.wait(final)
        if buf[p] == "[":  # the JSON array of the older format
            return self._value("array", p)
        q = p
        while q < len(buf) and buf[q] in _NAME_CHARS:
            q += 1
        if q == p:
            return self._not_a_call()
        if q == len(buf):
            return self.wait(final)
        self._name = buf[p:q]
        if buf.startswith(CALL_ID, q):
            q += len(CALL_ID)
            while q < len(buf) and buf[q].isalnum():
                q += 1
            if q == len(buf):
                return self.wait(final)
            if buf.startswith(ARGS, q):
                q += len(ARGS)
            elif _is_prefix(buf[q:], ARGS):
                return self.wait(final)
            else:
                return self._not_a_call()
        elif buf.startswith(ARGS, q):
            q += len(ARGS)
        elif buf[q] != "{":
            return self.wait(final) if _is_prefix(buf[q:], ARGS, CALL_ID) else self._not_a_call()
        a = skip_space(buf, q)
        if a == len(buf):
            return self.wait(final)
        if buf[a] != "{":
            return self._not_a_call()
        return self._value("object", a)

    def _value(self, state: str, start: int) -> bool:
        self._state = state
        self.open_value(start)
        return True


def _array_calls(value: str) -> list[tuple[str, str]]:
    items = loads_json(value)
    if not isinstance(items, list) or not items:
        raise CallError("[TOOL_CALLS] is not followed by a list of calls")
    return [call_from_object(item) for item in items]


class MistralParser(BufferedParser):
    """``mistral``: ``[TOOL_CALLS]`` followed by a JSON list of calls, or by ``name[ARGS]{...}``."""

    name = "mistral"

    def __init__(self, id_factory: IdFactory = new_mistral_call_id) -> None:
        super().__init__(id_factory)

    def stream(self) -> MistralStream:
        return MistralStream(self.id_factory)
