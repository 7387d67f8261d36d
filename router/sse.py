"""Token streams written straight from the receiving loop (router/engine_client.py): the router's per-token
hot path.

A streaming handler used to wake up once per token: the receiving loop put the event in the request's
channel, the handler's task resumed, formatted it and wrote it through aiohttp's writer. At hundreds of
streams that wake-up and the layers under it cost more than the token itself. With a ``DirectSSE``
attached to the request's channel, the receiving loop formats each plain token event itself and leaves it
to the loop's ``WriteCoalescer``, which writes it to the connection (a chunked-encoding frame, one
``transport.write`` for everything the connection has pending). The handler still gets, through the
channel, everything else: the last event (it ends the response), errors, and every event while the
connection is closing or its write buffer is over the limit (the handler then waits for the client to
read: back-pressure), or while events are already queued (so the order never changes).

Coalescing: one ``write`` system call per stream per step is the largest single cost of a busy router.
The coalescer writes at once (at the end of the current loop iteration) while the router has time to
spare, and otherwise lets several steps share one write per connection; see ``WriteCoalescer``.
"""

from __future__ import annotations

import asyncio
import json
import time
import weakref
from collections.abc import Callable, Iterable
from typing import ClassVar

from aiohttp import web
from aiohttp.http import HttpVersion11

from .entry import EventChannel
from .generation import StreamEvent

# Past this many bytes waiting to be sent on a connection, events go through the handler, which waits
# for the client (aiohttp's own drain limit).
WRITE_BUFFER_LIMIT = 64 * 1024
# After a flush that took t seconds, the next one waits until FLUSH_PAUSE_RATIO x t has passed (at most
# FLUSH_MAX_DELAY_S): writing takes at most about 1 / (1 + ratio) of the loop's time.
FLUSH_PAUSE_RATIO = 8.0
FLUSH_MAX_DELAY_S = 0.050

FormatEvent = Callable[[StreamEvent, int], bytes]

# Token text -> its JSON string, UTF-8: a few thousand distinct pieces make up almost every stream.
_TEXT_JSON: dict[str, bytes] = {}


def json_text(text: str) -> bytes:
    """``json.dumps(text, ensure_ascii=False).encode()``, cached for the texts tokens make."""
    encoded = _TEXT_JSON.get(text)
    if encoded is None:
        encoded = json.dumps(text, ensure_ascii=False).encode()
        if len(_TEXT_JSON) < 65536:
            _TEXT_JSON[text] = encoded
    return encoded


class WriteCoalescer:
    """Writes the pending frames of one event loop's direct streams, one ``write`` per connection.

    A flush runs at the end of the loop iteration in which a stream first has something pending, unless
    the last flush ended less than ``FLUSH_PAUSE_RATIO`` times its own duration ago (capped at
    ``FLUSH_MAX_DELAY_S``): then it runs at that point. Writing to one connection takes microseconds, to
    256 about a millisecond: a lone stream, or any number of them while steps take longer than the pause
    (a router that keeps up with its model), gets each token as soon as its step is delivered. A router
    that is itself the bottleneck spends at most about a ninth of its time in ``write``, with several
    steps' tokens in each write. Frames are only ever delayed, never reordered, and dropped only when
    their connection is closing."""

    __slots__ = ("__weakref__", "dirty", "handle", "loop", "ready_at")

    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WriteCoalescer]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.dirty: list[DirectSSE] = []
        self.handle: asyncio.Handle | None = None
        self.ready_at = 0.0  # loop.time() from which a flush may run at once

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> WriteCoalescer:
        """The coalescer of ``loop`` (one per event loop)."""
        coalescer = cls._by_loop.get(loop)
        if coalescer is None:
            coalescer = cls._by_loop[loop] = cls(loop)
        return coalescer

    def schedule(self, sse: DirectSSE) -> None:
        """``sse`` has just got its first pending frame: it is written at the next flush."""
        self.dirty.append(sse)
        if self.handle is None:
            delay = self.ready_at - self.loop.time()
            if delay <= 0:
                self.handle = self.loop.call_soon(self.flush)
            else:
                self.handle = self.loop.call_later(delay, self.flush)

    def flush(self) -> None:
        """Writes every stream that has frames pending, and times it (which sets the next pause)."""
        self.handle = None
        dirty, self.dirty = self.dirty, []
        started = time.perf_counter()
        for sse in dirty:
            sse.flush()
        took = time.perf_counter() - started
        self.ready_at = self.loop.time() + min(FLUSH_PAUSE_RATIO * took, FLUSH_MAX_DELAY_S)


class DirectSSE:
    """One streaming response's events, numbered from 1, formatted by ``format_event(event, index)``
    (complete ``data: ...`` events, or b"" for none), written by the receiving loop where possible
    (``offer``) and by the handler otherwise (``render`` then ``response.write``).

    With a ``coalescer``, offered frames wait in ``pending`` until it flushes them; without one, each is
    written at once. Before ``offer`` declines an item, and in ``close``, pending frames are written: what
    the handler writes afterwards always follows them."""

    __slots__ = ("coalescer", "format", "index", "pending", "transport")

    def __init__(
        self,
        transport: asyncio.Transport | None,
        format_event: FormatEvent,
        coalescer: WriteCoalescer | None = None,
    ) -> None:
        self.transport = transport
        self.format = format_event
        self.coalescer = coalescer
        self.index = 0
        self.pending: list[bytes] = []

    @staticmethod
    async def open(request: web.Request, response: web.StreamResponse) -> asyncio.Transport | None:
        """Sends the response's headers (chunked encoding on HTTP/1.1). Returns the connection's transport
        when the receiving loop may write events to it itself: chunked, not compressed; else None."""
        if request.version >= HttpVersion11:
            response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"")  # the headers go out now (aiohttp holds them for the first chunk)
        transport = request.transport
        return transport if response.chunked and not response.compression else None

    @classmethod
    def attach(
        cls, transport: asyncio.Transport | None, channel: EventChannel, format_event: FormatEvent
    ) -> DirectSSE:
        """Lets the receiving loop write the plain token events of ``channel`` to ``transport`` (from
        ``open``; None: the handler writes every event), until the handler calls ``close``: the
        connection may serve another request next. Several channels may share one transport."""
        sse = cls(transport, format_event, WriteCoalescer.of(asyncio.get_running_loop()))
        if transport is not None:
            channel.direct = sse.offer
        return sse

    @classmethod
    async def start(
        cls,
        request: web.Request,
        response: web.StreamResponse,
        channel: EventChannel,
        format_event: FormatEvent,
    ) -> DirectSSE:
        """``open`` then ``attach``: a response with one channel."""
        return cls.attach(await cls.open(request, response), channel, format_event)

    def offer(self, item: object) -> bool:
        """Takes a plain token event (written now or at the coalescer's next flush) and returns True;
        False, after writing what is pending, for anything the handler must see.

        The connection is checked (closing, over ``WRITE_BUFFER_LIMIT``) when nothing is pending: until
        the next flush nothing is written to it, so its state can only get better."""
        if type(item) is not StreamEvent or item.finished is not None:
            self.flush()
            return False
        pending = self.pending
        transport = self.transport
        if not pending and (
            transport is None
            or transport.is_closing()
            or transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT
        ):
            return False
        try:
            data = self.format(item, self.index + 1)
        except Exception:  # not in the receiving loop: the handler formats it again and meets the error
            self.flush()
            return False
        self.index += 1
        if not data:  # an event without a frame of its own (OpenAI's chunks skip some)
            return True
        if self.coalescer is None:
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))  # type: ignore[union-attr]
            return True
        pending.append(data)
        if len(pending) == 1:
            self.coalescer.schedule(self)
        return True

    def flush(self) -> None:
        """Writes the pending frames as one chunk (dropped if the connection is closing)."""
        if not self.pending:
            return
        data = b"".join(self.pending)
        self.pending = []
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def close(self, channel: EventChannel) -> None:
        """The handler is done with direct writes: detaches from ``channel`` and writes what is pending."""
        channel.direct = None
        self.flush()

    def render(self, events: Iterable[StreamEvent]) -> bytes:
        """The events the handler got from the channel, numbered after those already written."""
        chunks = []
        for event in events:
            self.index += 1
            chunks.append(self.format(event, self.index))
        return b"".join(chunks)
