"""Incremental Server-Sent Events parser (the subset servers use for token streams)."""

from __future__ import annotations


class SSEParser:
    """Feed raw bytes as they arrive; get the ``data`` payload of every complete event.

    Follows the text/event-stream rules that matter for token streams: lines end with ``\\n`` or
    ``\\r\\n`` (a lone ``\\r`` is not treated as a line end), a blank line dispatches the event, several
    ``data:`` lines of one event are joined with ``\\n``, one space after the colon is dropped, lines
    starting with ``:`` are comments, other fields (``event``, ``id``, ``retry``) are ignored.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """Adds bytes; returns the data of the events completed by them, in order.

        A stream of ``\\n`` lines is cut into whole events (an incomplete one waits in the buffer), and
        an event that is one ``data: `` line, a token stream's usual event, is taken without splitting it
        into lines. Other streams go line by line."""
        self._buffer += chunk
        buffer = self._buffer
        events: list[str] = []
        if self._data or b"\r" in buffer:
            self._feed_lines(events)
            return events
        start = 0
        while True:
            end = buffer.find(b"\n\n", start)
            if end < 0:
                break
            block = buffer[start:end]
            start = end + 2
            if block.startswith(b"data: ") and b"\n" not in block:
                events.append(block[6:].decode("utf-8", errors="replace"))
                continue
            for line in block.split(b"\n"):
                self._line(line.decode("utf-8", errors="replace"))
            event = self._line("")
            if event is not None:
                events.append(event)
        del buffer[:start]
        return events

    def _feed_lines(self, events: list[str]) -> None:
        """``feed`` line by line: the buffer's complete lines, whatever they end with."""
        buffer = self._buffer
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buffer[start:end])
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            event = self._line(line.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        del buffer[:start]

    def finish(self) -> list[str]:
        """At end of stream: the event left without its closing blank line, if any (lenient)."""
        events: list[str] = []
        self._feed_lines(events)
        if self._buffer:
            line = bytes(self._buffer).rstrip(b"\r")
            self._buffer.clear()
            event = self._line(line.decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _line(self, line: str) -> str | None:
        if not line:
            if not self._data:
                return None
            data = "\n".join(self._data)
            self._data = []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None
