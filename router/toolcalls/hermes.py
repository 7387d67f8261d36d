"""Hermes / Qwen tool calls: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one tag per call.

What Qwen2.5, Qwen3, QwQ, Hermes 2 Pro / 3 and many fine-tunes emit, e.g.::

    I'll check both cities.
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Berlin"}}
    </tool_call>

``arguments`` may also be a JSON string holding the object, or missing (``{}``). Hermes 2 Pro sometimes
writes the object as a Python dict (``{'name': 'f', 'arguments': {'x': True}}``), which is read as a
literal when it is not JSON. A tag whose body is not such an object, or one still open when the text
ends, is content.
"""

from __future__ import annotations

from typing import Any

from .base import (
    BufferedParser,
    BufferedStream,
    CallError,
    IdFactory,
    call_from_object,
    loads_json,
    new_call_id,
)
from .literals import python_literal

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


def _load_body(body: str) -> Any:
    try:
        return loads_json(body)
    except CallError:
        return python_literal(body)


class HermesStream(BufferedStream):
    def __init__(self, id_factory: IdFactory = new_call_id) -> None:
        super().__init__(id_factory)
        self._in_call = False
        self._search = len(OPEN)  # where to look for CLOSE next

    def step(self, final: bool) -> bool:
        if not self._in_call:
            if not self.content_until(OPEN, final):
                return False
            self._in_call = True
            self._search = len(OPEN)
            return True
        buf = self.buf
        j = buf.find(CLOSE, self._search)
        if j < 0:
            if not final:
                self._search = max(len(OPEN), len(buf) - len(CLOSE) + 1)
            return self.wait(final)
        end = j + len(CLOSE)
        body = buf[len(OPEN) : j]
        self.buf = buf[end:]
        self._in_call = False
        self.calls_or_content(buf[:end], lambda: [call_from_object(_load_body(body))])
        return True


class HermesParser(BufferedParser):
    """``hermes``: ``<tool_call>`` JSON ``</tool_call>`` blocks (Qwen2.5/Qwen3, Hermes, QwQ)."""

    name = "hermes"

    def stream(self) -> HermesStream:
        return HermesStream(self.id_factory)
