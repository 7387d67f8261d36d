"""The Responses API's output: output items, the response object, and its streaming events.

One ``ResponseBuilder`` per response turns what the model produced (reasoning text, answer text, tool
calls: the API-neutral deltas of router/agent.py) into OpenAI's output items, in order, and into the
events that stream them. A streamed and a whole response are built the same way (the whole one just
drops the events), so they always agree.

Items and their events, as OpenAI sends them (every event has ``sequence_number``, from 0):

- ``reasoning`` (``rs_...``; the reasoning as one ``summary_text``): ``response.output_item.added``,
  ``response.reasoning_summary_part.added``, ``response.reasoning_summary_text.delta``...,
  ``response.reasoning_summary_text.done``, ``response.reasoning_summary_part.done``,
  ``response.output_item.done``;
- ``message`` (``msg_...``; one ``output_text`` part): ``response.output_item.added``,
  ``response.content_part.added``, ``response.output_text.delta``..., ``response.output_text.done``,
  ``response.content_part.done``, ``response.output_item.done``;
- ``function_call`` (``fc_...``, with the parser's ``call_id``, ``name`` and ``arguments``):
  ``response.output_item.added``, ``response.function_call_arguments.delta``...,
  ``response.function_call_arguments.done``, ``response.output_item.done``.

A new kind of output closes the open item. The response is framed by ``response.created`` and
``response.in_progress`` first and ``response.completed`` (or ``response.incomplete``, or
``response.failed``) last, each carrying the response object as it then is. A response without any
output gets one empty message, so that ``output_text`` is always there. When the response ends
incomplete (``max_output_tokens``), a message still open is ``incomplete`` too (a call is never cut: the
parsers release a call only once it is whole).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from .toolcalls import ToolCallDelta

Event = dict[str, Any]
Status = Literal["completed", "incomplete"]


def new_id(prefix: str) -> str:
    """An OpenAI-style object id: ``prefix`` + ``_`` + 32 hex digits (``resp``, ``msg``, ``fc``, ``rs``)."""
    return f"{prefix}_{uuid.uuid4().hex}"


def sse_bytes(events: list[Event]) -> bytes:
    """The events as server-sent events: an ``event:`` line with the type, then the JSON ``data:``."""
    return b"".join(
        f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()
        for event in events
    )


@dataclass(frozen=True)
class Usage:
    """Token counts of one response (``output`` includes ``reasoning``)."""

    input: int
    output: int
    reasoning: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": self.output,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.input + self.output,
        }


@dataclass
class _OpenItem:
    """The output item being streamed: its index in ``output``, the item, and its text so far."""

    index: int
    item: dict[str, Any]
    parts: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return str(self.item["type"])

    @property
    def id(self) -> str:
        return str(self.item["id"])


class ResponseBuilder:
    """Builds one response. ``head`` holds the response object's fields that echo the request (model,
    instructions, tools, ...); the builder adds ``id``, ``object``, ``created_at``, ``status``,
    ``output``, ``usage``, ``error`` and ``incomplete_details``. Each method returns the events it
    caused, in order."""

    def __init__(self, head: dict[str, Any], response_id: str | None = None) -> None:
        self.id = response_id or new_id("resp")
        self.created_at = int(time.time())
        self.head = head
        self.output: list[dict[str, Any]] = []
        self.sequence = 0
        self._open: _OpenItem | None = None
        self._closed = False

    # -- events --
    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def _item_event(self, kind: str, open_item: _OpenItem, /, **fields: Any) -> Event:
        return self._event(kind, item_id=open_item.id, output_index=open_item.index, **fields)

    def response(
        self,
        status: str = "in_progress",
        usage: Usage | None = None,
        error: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The response object as it is now (``status`` ``in_progress`` while it streams)."""
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            **self.head,
            "output": [dict(item) for item in self.output],
            "usage": usage.to_json() if usage is not None else None,
        }

    def start(self) -> list[Event]:
        """``response.created`` and ``response.in_progress``."""
        snapshot = self.response()
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    # -- output --
    def reasoning(self, text: str) -> list[Event]:
        """A piece of the model's reasoning (a ``reasoning`` item's summary text)."""
        return self._piece(
            "reasoning", text, "response.reasoning_summary_text.delta", summary_index=0, delta=text
        )

    def text(self, text: str) -> list[Event]:
        """A piece of the answer's text (a ``message`` item's ``output_text``)."""
        return self._piece(
            "message", text, "response.output_text.delta", content_index=0, delta=text, logprobs=[]
        )

    def _piece(self, kind: str, text: str, event_type: str, **fields: Any) -> list[Event]:
        """``text`` added to the open item of ``kind`` (opened first if need be), and its delta event."""
        if not text:
            return []
        events = self._switch(kind)
        item = self._open
        assert item is not None
        item.parts.append(text)
        events.append(self._item_event(event_type, item, **fields))
        return events

    def call(self, delta: ToolCallDelta) -> list[Event]:
        """A tool call's piece: its head (``id`` and ``name``: a new ``function_call`` item) or a fragment of
        its arguments."""
        events: list[Event] = []
        if delta.id is not None:
            events += self._close("completed")
            item = self._add(
                {
                    "id": new_id("fc"),
                    "type": "function_call",
                    "status": "in_progress",
                    "call_id": delta.id,
                    "name": delta.name or "",
                    "arguments": "",
                }
            )
            events.append(self._item_event("response.output_item.added", item, item=dict(item.item)))
        current = self._open
        if delta.arguments and current is not None and current.kind == "function_call":
            current.parts.append(delta.arguments)
            events.append(
                self._item_event("response.function_call_arguments.delta", current, delta=delta.arguments)
            )
        return events

    def close(self, status: Status) -> list[Event]:
        """The output ended: closes the open item (``incomplete`` when the response is); a response without
        output gets one empty message."""
        if self._closed:
            return []
        events = []
        if not self.output:
            events += self._switch("message")
        events += self._close(status)
        self._closed = True
        return events

    def finish(self, status: Status, usage: Usage) -> list[Event]:
        """Closes the output; then ``response.completed`` (or ``response.incomplete``) with the final
        object."""
        events = self.close(status)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        events.append(self._event(kind, response=self.response(status, usage)))
        return events

    def fail(self, message: str) -> list[Event]:
        """``response.failed`` (the generation failed after the response started)."""
        error = {"code": "server_error", "message": message}
        return [self._event("response.failed", response=self.response("failed", error=error))]

    # -- items --
    def _add(self, item: dict[str, Any]) -> _OpenItem:
        self.output.append(item)
        self._open = _OpenItem(len(self.output) - 1, item)
        return self._open

    def _switch(self, kind: str) -> list[Event]:
        """Makes an item of ``kind`` the open one (closing another kind), with its added events."""
        if self._open is not None and self._open.kind == kind:
            return []
        events = self._close("completed")
        if kind == "reasoning":
            item = self._add({"id": new_id("rs"), "type": "reasoning", "summary": []})
            events.append(
                self._item_event("response.output_item.added", item, item=dict(item.item, summary=[]))
            )
            part: dict[str, Any] = {"type": "summary_text", "text": ""}
            events.append(
                self._item_event("response.reasoning_summary_part.added", item, summary_index=0, part=part)
            )
        else:
            item = self._add(
                {
                    "id": new_id("msg"),
                    "type": "message",
                    "status": "in_progress",
                    "role": "assistant",
                    "content": [],
                }
            )
            events.append(
                self._item_event("response.output_item.added", item, item=dict(item.item, content=[]))
            )
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(self._item_event("response.content_part.added", item, content_index=0, part=part))
        return events

    def _close(self, status: Status) -> list[Event]:
        """Closes the open item, if any: its done events, and its final shape in ``output``."""
        item = self._open
        if item is None:
            return []
        self._open = None
        text = "".join(item.parts)
        events: list[Event] = []
        part: dict[str, Any]
        if item.kind == "reasoning":
            part = {"type": "summary_text", "text": text}
            item.item["summary"] = [part]
            events.append(
                self._item_event("response.reasoning_summary_text.done", item, summary_index=0, text=text)
            )
            events.append(
                self._item_event("response.reasoning_summary_part.done", item, summary_index=0, part=part)
            )
        elif item.kind == "message":
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            item.item["content"] = [part]
            item.item["status"] = status
            events.append(
                self._item_event("response.output_text.done", item, content_index=0, text=text, logprobs=[])
            )
            events.append(self._item_event("response.content_part.done", item, content_index=0, part=part))
        else:
            item.item["arguments"] = text
            item.item["status"] = "completed"  # a call comes out whole (router.toolcalls: calls are atomic)
            events.append(self._item_event("response.function_call_arguments.done", item, arguments=text))
        events.append(self._item_event("response.output_item.done", item, item=dict(item.item)))
        return events
