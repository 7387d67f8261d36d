"""Token streams written straight from the batching loop: the router's per-token hot path.

A streaming handler used to wake up once per token: the batching loop put the event in the request's
channel, the handler's task resumed, formatted it and wrote it through aiohttp's writer. At hundreds of
streams that wake-up and the layers under it cost more than the token itself. With a ``DirectSSE``
attached to the request's channel, the batching loop formats each plain token event and writes it to the
connection at once (one chunked-encoding frame, one ``transport.write``). The handler still gets, through
the channel, everything else: the last event (it ends the response), errors, and every event while the
connection is closing or its write buffer is over the limit (the handler then waits for the client to
read: back-pressure), or while events are already queued (so the order never changes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable

from aiohttp import web
from aiohttp.http import HttpVersion11

from .generation import StreamEvent
from .queue import EventChannel

# Past this many bytes waiting to be sent on a connection, events go through the handler, which waits
# for the client (aiohttp's own drain limit).
WRITE_BUFFER_LIMIT = 64 * 1024

FormatEvent = Callable[[StreamEvent, int], bytes]


class DirectSSE:
    """One streaming response's events, numbered from 1, formatted by ``format_event(event, index)``
    (a complete ``data: ...`` event), written by the batching loop where possible (``offer``) and by the
    handler otherwise (``render`` then ``response.write``)."""

    __slots__ = ("format", "index", "transport")

    def __init__(self, transport: asyncio.Transport | None, format_event: FormatEvent) -> None:
        self.transport = transport
        self.format = format_event
        self.index = 0

    @classmethod
    async def start(
        cls,
        request: web.Request,
        response: web.StreamResponse,
        channel: EventChannel,
        format_event: FormatEvent,
    ) -> DirectSSE:
        """Sends the response's headers and, on an HTTP/1.1 connection without compression, lets the
        batching loop write the plain token events of ``channel`` itself (until the handler sets
        ``channel.direct`` back to None: the connection may serve another request next)."""
        if request.version >= HttpVersion11:
            response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"")  # the headers go out now (aiohttp holds them for the first chunk)
        transport = request.transport
        direct = response.chunked and not response.compression and transport is not None
        sse = cls(transport if direct else None, format_event)
        if direct:
            channel.direct = sse.offer
        return sse

    def offer(self, item: object) -> bool:
        """Writes a plain token event now and returns True; False for anything the handler must see."""
        if type(item) is not StreamEvent or item.finished is not None:
            return False
        transport = self.transport
        if (
            transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT
        ):
            return False
        self.index += 1
        data = self.format(item, self.index)
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        return True

    def render(self, events: Iterable[StreamEvent]) -> bytes:
        """The events the handler got from the channel, numbered after those already written."""
        chunks = []
        for event in events:
            self.index += 1
            chunks.append(self.format(event, self.index))
        return b"".join(chunks)
