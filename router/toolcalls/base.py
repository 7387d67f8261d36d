"""The tool-call parsing contract: values, the parser protocol, and the buffered stream all formats share.

A parser turns the text a model generated into OpenAI ``tool_calls`` plus the remaining ``content``:

- ``parser.parse(text) -> ParsedOutput`` for a whole response;
- ``stream = parser.stream()``, then ``stream.feed(delta) -> list[Delta]`` for each detokenized piece (a
  delta may split anywhere, inside a tag or a JSON string) and ``stream.finish() -> list[Delta]`` once the
  generation ended. A stream is for one response (one choice) and is not reused.

Guarantees, for every format:

- **Streaming equals whole-text parsing.** Whatever the split, the content deltas concatenate to
  ``parse(text).content`` and the tool-call deltas rebuild ``parse(text).calls`` (ids apart, which are
  random). ``parse`` is itself ``feed(text)`` then ``finish()``.
- **Nothing raises on model output.** A call that does not parse (bad JSON, missing name, arguments
  that are not an object, a tag still open when the text ends) comes back as plain content, verbatim.
- **Content is the text outside calls, verbatim**, except whitespace touching calls: the whitespace
  after a call (up to the next text) is dropped, and so is the whitespace before a call unless text
  follows the calls (``"ok <call> done"`` gives ``"ok done"``, ``"Sure.\n<call>\n"`` gives ``"Sure."``).
  Text without calls comes back unchanged.
- **Text that may be the start of a tag is held back** until it is known not to be one; it is released by
  a later delta or by ``finish()``.
- **A call is atomic in a stream**: its deltas come when the call is complete and valid (it could still
  turn out malformed before that). Call ``index`` counts from 0 in order. The first delta of a call
  carries ``id`` and ``name`` with ``arguments=""``; the next ones carry argument-string fragments, which
  concatenate to the final arguments string.
- **Arguments are compact JSON** (``json.dumps(args, ensure_ascii=False, separators=(",", ":"))``) of a
  JSON object; ids are ``call_`` + 24 random alphanumerics unless the parser says otherwise.
"""

from __future__ import annotations

import json
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .scan import BracketScanner, StepStream

_ALPHANUMERIC = string.ascii_letters + string.digits


def random_alphanumeric(n: int) -> str:
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(n))


def new_call_id() -> str:
    """An OpenAI-style tool call id: ``call_`` and 24 random letters and digits."""
    return "call_" + random_alphanumeric(24)


IdFactory = Callable[[], str]


@dataclass(frozen=True)
class ToolCall:
    """One complete function call. ``arguments`` is the JSON text of an object, compact."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """The entry of a chat completion message's ``tool_calls``."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class ContentDelta:
    """Plain text for the message's ``content``."""

    text: str


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed tool call, as in ``choices[].delta.tool_calls[]`` of a chunk.

    The first piece of call ``index`` has ``id`` and ``name`` (and ``arguments == ""``); later pieces have
    only argument-string fragments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {
            "index": self.index,
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


Delta = ContentDelta | ToolCallDelta


@dataclass
class ParsedOutput:
    """A whole response split into ``content`` (``""`` when there is none) and ``calls``."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)

    @classmethod
    def from_deltas(cls, deltas: list[Delta]) -> ParsedOutput:
        """Rebuilds the whole-text result from a stream's deltas (all of them, in order)."""
        content: list[str] = []
        heads: dict[int, ToolCallDelta] = {}
        args: dict[int, list[str]] = {}
        for delta in deltas:
            if isinstance(delta, ContentDelta):
                content.append(delta.text)
            elif delta.id is not None:
                heads[delta.index] = delta
                args[delta.index] = [delta.arguments]
            else:
                args[delta.index].append(delta.arguments)
        calls = [
            ToolCall(id=head.id or "", name=head.name or "", arguments="".join(args[index]))
            for index, head in sorted(heads.items())
        ]
        return cls(content="".join(content), calls=calls)

    def tool_calls_openai(self) -> list[dict[str, Any]]:
        return [call.to_openai() for call in self.calls]


@runtime_checkable
class ToolCallStream(Protocol):
    """The incremental side of a parser, for one response."""

    def feed(self, delta: str) -> list[Delta]:
        """Takes the next piece of generated text; returns what is now certain, in order."""
        ...

    def finish(self) -> list[Delta]:
        """The text ended: returns everything still held (unfinished calls as content)."""
        ...


@runtime_checkable
class ToolCallParser(Protocol):
    """A tool-call format. Instances are cheap and stateless; each response gets its own ``stream()``."""

    name: str

    def parse(self, text: str) -> ParsedOutput: ...

    def stream(self) -> ToolCallStream: ...


# ---- shared by the built-in formats ----------------------------------------------------------------


class CallError(ValueError):
    """A candidate call that is not a valid call (caught inside the parsers; never leaves them)."""


def loads_json(text: str) -> Any:
    """``json.loads`` that rejects NaN/Infinity and turns every failure (deep nesting included) into
    CallError."""

    def reject(constant: str) -> Any:
        raise CallError(f"not JSON: {constant}")

    try:
        return json.loads(text, parse_constant=reject)
    except (ValueError, RecursionError) as e:
        raise CallError(str(e)) from e


def dumps_arguments(arguments: Any) -> str:
    """Compact JSON of an arguments object; a JSON string holding an object is accepted too."""
    if isinstance(arguments, str):
        arguments = loads_json(arguments)
    if not isinstance(arguments, dict):
        raise CallError("arguments are not an object")
    try:
        return json.dumps(arguments, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (ValueError, TypeError, RecursionError) as e:
        raise CallError(str(e)) from e


def call_from_object(
    obj: Any, argument_keys: tuple[str, ...] = ("arguments", "parameters")
) -> tuple[str, str]:
    """``(name, arguments JSON)`` of a ``{"name": ..., "arguments": {...}}`` object (``arguments`` may be
    missing, meaning ``{}``)."""
    if not isinstance(obj, dict):
        raise CallError("a call is not an object")
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CallError("a call has no name")
    for key in argument_keys:
        if key in obj:
            return name.strip(), dumps_arguments(obj[key])
    return name.strip(), "{}"


class BufferedStream(StepStream[list[Delta]]):
    """A tool-call stream on ``StepStream``: ``step`` reads ``buf`` and its output goes through
    ``content`` and ``call``, which apply the whitespace rule of the module docstring."""

    def __init__(self, id_factory: IdFactory = new_call_id) -> None:
        super().__init__()
        self._id_factory = id_factory
        self._out: list[Delta] = []
        self._held_space = ""  # trailing whitespace of the content so far: dropped if a call follows
        self._after_call = False  # leading whitespace of the next content is dropped
        self._space_before_calls = ""  # restored if content follows the calls, to keep words apart
        self._emitted_content = False
        self._calls = 0
        self._scanner: BracketScanner | None = None  # of the value ``open_value`` began
        self._value_start = 0

    @property
    def calls(self) -> int:
        """How many calls were emitted so far."""
        return self._calls

    def flush(self) -> None:
        if self.buf:  # a step that left text at the end: it is content
            self.content(self.buf)
            self.buf = ""
        if self._held_space and not self._after_call:
            self._out.append(ContentDelta(self._held_space))
        self._held_space = ""

    def take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out

    def content_until(self, tag: str, final: bool) -> bool:
        """Emits the content before ``tag`` (``emit_until``): True when ``buf`` now starts with it."""
        return self.emit_until((tag,), final, self.content) is not None

    def release(self, n: int) -> None:
        """The first ``n`` characters of ``buf`` are content."""
        self.content(self.buf[:n])
        self.buf = self.buf[n:]

    def open_value(self, start: int, python: bool = False) -> None:
        """A bracketed value starts at ``start`` in ``buf`` (``BracketScanner``): see ``closed_value``."""
        self._value_start = start
        self._scanner = BracketScanner(start, python)

    def closed_value(self) -> tuple[str, str] | None:
        """Once the value ``open_value`` began is closed, consumes ``buf`` up to its end and returns that
        text and the value's own; None while it is open."""
        assert self._scanner is not None
        buf = self.buf
        end = self._scanner.advance(buf)
        if end is None:
            return None
        self.buf = buf[end:]
        return buf[:end], buf[self._value_start : end]

    def wait(self, final: bool) -> bool:
        """Nothing can be decided before more text comes (False); at the end of the text (``final``), what
        is held is content."""
        if final:
            self.release(len(self.buf))
        return False

    def content(self, text: str) -> None:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return
            self._after_call = False
            self._held_space = self._space_before_calls  # separates the content before and after
            self._space_before_calls = ""
        body = text.rstrip()
        if not body:
            self._held_space += text
            return
        self._out.append(ContentDelta(self._held_space + body))
        self._emitted_content = True
        self._held_space = text[len(body) :]

    def call(self, name: str, arguments: str) -> None:
        index = self._calls
        self._calls += 1
        if not self._after_call and self._emitted_content:
            self._space_before_calls = self._held_space
        self._held_space = ""
        self._after_call = True
        self._out.append(ToolCallDelta(index=index, id=self._id_factory(), name=name, arguments=""))
        self._out.append(ToolCallDelta(index=index, arguments=arguments))

    def calls_or_content(self, region: str, parse: Callable[[], list[tuple[str, str]]]) -> None:
        """Emits the calls ``parse`` returns, or ``region`` as content when it raises CallError (or returns
        no call)."""
        try:
            calls = parse()
        except CallError:
            calls = []
        if not calls:
            self.content(region)
            return
        for name, arguments in calls:
            self.call(name, arguments)


class BufferedParser:
    """A parser whose ``parse`` is its own stream run over the whole text (so the two always agree)."""

    name: str = ""

    def __init__(self, id_factory: IdFactory = new_call_id) -> None:
        self.id_factory = id_factory

    def stream(self) -> BufferedStream:
        raise NotImplementedError

    def parse(self, text: str) -> ParsedOutput:
        stream = self.stream()
        return ParsedOutput.from_deltas(stream.feed(text) + stream.finish())
