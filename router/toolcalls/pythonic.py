"""Pythonic tool calls: a Python list of calls with keyword arguments, literals only.

What Llama 3.2 (with the pythonic template), Llama 4 and ToolACE-style models emit::

    [get_weather(city="San Francisco", unit="celsius"), get_time(timezone='PST')]
    <|python_start|>[get_weather(city="Paris")]<|python_end|>

The list opens a call only at the start of the response (past whitespace); ``<|python_start|>`` ...
``<|python_end|>`` opens one anywhere and may hold a single call without the list. The source is read
with ``ast`` and never evaluated: argument values must be literals (strings, numbers, booleans, None,
and lists, tuples, dicts of them; ``true``/``false``/``null`` are read as JSON's). Positional arguments,
names, expressions, and anything that does not parse make the whole list content.
"""

from __future__ import annotations

import ast
from typing import Any

from .base import BufferedParser, BufferedStream, CallError, IdFactory, dumps_arguments, new_call_id
from .literals import literal
from .scan import skip_space

PYTHON_START = "<|python_start|>"
PYTHON_END = "<|python_end|>"


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + "." + node.attr
    raise CallError("a call of something that is not a name")


def parse_pythonic(source: str, allow_bare_call: bool = False) -> list[tuple[str, str]]:
    """``(name, arguments JSON)`` of each call in ``source``, a list of calls (or, with
    ``allow_bare_call``, one call); CallError when it is anything else."""
    try:
        tree = ast.parse(source.strip(), mode="eval")
        node = tree.body
        if isinstance(node, ast.List) and node.elts:
            nodes = node.elts
        elif allow_bare_call and isinstance(node, ast.Call):
            nodes = [node]
        else:
            raise CallError("not a list of calls")
        calls = []
        for call in nodes:
            if not isinstance(call, ast.Call):
                raise CallError("a list item that is not a call")
            if call.args:
                raise CallError("positional arguments")
            arguments: dict[str, Any] = {}
            for keyword in call.keywords:
                if keyword.arg is None:
                    raise CallError("**kwargs")
                arguments[keyword.arg] = literal(keyword.value)
            calls.append((_dotted(call.func), dumps_arguments(arguments)))
        return calls
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        if isinstance(e, CallError):
            raise
        raise CallError(str(e)) from e


class PythonicStream(BufferedStream):
    def __init__(self, id_factory: IdFactory = new_call_id) -> None:
        super().__init__(id_factory)
        self._state = "content"  # content | list | tagged
        self._at_start = True
        self._search = 0

    def step(self, final: bool) -> bool:
        buf = self.buf
        if self._state == "content":
            if self._at_start:
                p = skip_space(buf, 0)
                if p == len(buf):
                    return self.wait(final)
                self._at_start = False
                if buf[p] == "[":
                    self.release(p)
                    self._state = "list"
                    self.open_value(0, python=True)
                    return True
            if not self.content_until(PYTHON_START, final):
                return False
            self._state = "tagged"
            self._search = len(PYTHON_START)
            return True
        if self._state == "list":
            closed = self.closed_value()
            if closed is None:
                return self.wait(final)
            region, _ = closed
            self._state = "content"
            self.calls_or_content(region, lambda: parse_pythonic(region))
            return True
        j = buf.find(PYTHON_END, self._search)
        if j < 0:
            self._search = max(len(PYTHON_START), len(buf) - len(PYTHON_END) + 1)
            return self.wait(final)
        end = j + len(PYTHON_END)
        region, body = buf[:end], buf[len(PYTHON_START) : j]
        self.buf = buf[end:]
        self._state = "content"
        self.calls_or_content(region, lambda: parse_pythonic(body, allow_bare_call=True))
        return True


class PythonicParser(BufferedParser):
    """``pythonic``: ``[f(a=1, b="x"), g()]``, maybe inside ``<|python_start|>``/``<|python_end|>``."""

    name = "pythonic"

    def stream(self) -> PythonicStream:
        return PythonicStream(self.id_factory)
