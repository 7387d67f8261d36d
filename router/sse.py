"""Streaming responses: each handler's events, formatted by the handler's own function and written with one
``write`` per connection for everything pending (the router's per-token hot path).

The receiving loop (router/engine_client.py) only puts API-neutral ``StreamEvent``s in each request's
``EventChannel``; it formats nothing and writes nothing. A streaming handler attaches an ``SSEWriter`` to
its channel: the channel then signals a plain token event (not the last, not an error) by calling the
writer's listener when the channel stops being empty, which puts the writer on its event loop's
``WriteCoalescer`` instead of waking the handler's task. When the coalescer flushes, each writer formats
the plain token events at the front of its channel with the handler's ``format_event`` and the coalescer
writes them to the connection (a chunked-encoding frame, one ``transport.write`` for all of them). The
handler's task still gets, through the channel, everything else: the last event (it ends the response),
errors, and every event while the connection is closing or its write buffer is over the limit (the handler
then waits for the client to read: back-pressure). Both consume the channel from its front, so the order
never changes.

Why not wake the handler's task for each step: a task wake-up costs about 3 us, a quarter of the router's
whole time per streamed token, once per stream per step. Why coalesce: one ``write`` system call per stream
per step is the largest single cost of a busy router. The coalescer writes at once (at the end of the
current loop iteration) while the router has time to spare, and otherwise lets several steps share one write
per connection; see ``WriteCoalescer``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
import weakref
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterable
from typing import ClassVar, cast

from aiohttp import web
from aiohttp.http import HttpVersion11

from .entry import EventChannel
from .generation import StreamEvent

# Past this many bytes waiting to be sent on a connection, events go through the handler, which waits
# for the client (aiohttp's own drain limit).
WRITE_BUFFER_LIMIT = 64 * 1024
# After a flush whose writes took t seconds, the next one waits until FLUSH_PAUSE_RATIO x t has passed (at
# most FLUSH_MAX_DELAY_S): writing takes at most about 1 / (1 + ratio) of the loop's time.
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
    """Formats and writes the pending events of one event loop's streams, one ``write`` per connection.

    A flush runs at the end of the loop iteration in which a stream first has something pending, unless
    the last flush's writes ended less than ``FLUSH_PAUSE_RATIO`` times their own duration ago (capped at
    ``FLUSH_MAX_DELAY_S``): then it runs at that point. Writing to one connection takes microseconds, to
    256 about a millisecond: a lone stream, or any number of them while steps take longer than the pause
    (a router that keeps up with its model), gets each token as soon as its step is delivered. A router
    that is itself the bottleneck spends at most about a ninth of its time in ``write``, with several
    steps' tokens in each write. Events are only ever delayed, never reordered; those of a closing
    connection are left to its handler."""

    __slots__ = ("__weakref__", "dirty", "handle", "loop", "ready_at")

    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, WriteCoalescer]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.dirty: list[SSEWriter] = []
        self.handle: asyncio.Handle | None = None
        self.ready_at = 0.0  # loop.time() from which a flush may run at once

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> WriteCoalescer:
        """The coalescer of ``loop`` (one per event loop)."""
        coalescer = cls._by_loop.get(loop)
        if coalescer is None:
            coalescer = cls._by_loop[loop] = cls(loop)
        return coalescer

    def schedule(self, writer: SSEWriter) -> None:
        """``writer``'s channel has just got its first pending event: it is written at the next flush."""
        self.dirty.append(writer)
        if self.handle is None:
            delay = self.ready_at - self.loop.time()
            if delay <= 0:
                self.handle = self.loop.call_soon(self.flush)
            else:
                self.handle = self.loop.call_later(delay, self.flush)

    def flush(self) -> None:
        """Formats every dirty stream's pending events (``SSEWriter.take``), then writes them and times the
        writes (which sets the next pause)."""
        self.handle = None
        dirty, self.dirty = self.dirty, []
        frames = []
        for writer in dirty:
            data = writer.take()
            transport = writer.transport
            if data and transport is not None:
                frames.append((transport, data))
        started = time.perf_counter()
        for transport, data in frames:
            transport.write(data)
        took = time.perf_counter() - started
        self.ready_at = self.loop.time() + min(FLUSH_PAUSE_RATIO * took, FLUSH_MAX_DELAY_S)


class SSEWriter:
    """One streaming response's events from one channel, numbered from 1 and formatted by the handler's
    ``format_event(event, index)`` (complete ``data: ...`` events, or b"" for none): the plain token events
    by ``take`` when its coalescer flushes, the rest by the handler (``render`` then ``response.write``).

    Attached to a channel (``attach``, until ``close``), it is the channel's listener: see
    ``EventChannel``. What ``take`` does not write stays in the channel for the handler's task."""

    __slots__ = ("channel", "format", "index", "transport")

    def __init__(
        self,
        transport: asyncio.Transport | None,
        channel: EventChannel,
        format_event: FormatEvent,
        coalescer: WriteCoalescer,
    ) -> None:
        self.transport = transport
        self.format = format_event
        self.index = 0
        # The channel while attached (never without a transport: the handler then gets every event).
        self.channel: EventChannel | None = None
        if transport is not None:
            self.channel = channel
            channel.listener = functools.partial(coalescer.schedule, self)

    @staticmethod
    async def open(request: web.Request, response: web.StreamResponse) -> asyncio.Transport | None:
        """Sends the response's headers (chunked encoding on HTTP/1.1). Returns the connection's transport
        when the coalescer may write events to it itself: chunked, not compressed; else None."""
        if request.version >= HttpVersion11:
            response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"")  # the headers go out now (aiohttp holds them for the first chunk)
        transport = request.transport
        return transport if response.chunked and not response.compression else None

    @classmethod
    def attach(
        cls, transport: asyncio.Transport | None, channel: EventChannel, format_event: FormatEvent
    ) -> SSEWriter:
        """A writer of ``channel``'s events to ``transport`` (from ``open``), which writes its plain token
        events until the handler calls ``close`` (the connection may serve another request next). None: the
        handler gets every event. Several channels may share one transport."""
        return cls(transport, channel, format_event, WriteCoalescer.of(asyncio.get_running_loop()))

    @classmethod
    async def start(
        cls,
        request: web.Request,
        response: web.StreamResponse,
        channel: EventChannel,
        format_event: FormatEvent,
    ) -> SSEWriter:
        """``open`` then ``attach``: a response with one channel."""
        return cls.attach(await cls.open(request, response), channel, format_event)

    def take(self) -> bytes:
        """Takes the events pending in the channel, when they are all plain token events, and returns them
        formatted as one chunked-encoding frame (b"" for none). Leaves everything to the handler's task
        while the connection is closing or its write buffer is over ``WRITE_BUFFER_LIMIT`` (and wakes it),
        and when the last item is not plain (the last event, an error: the channel has woken the task for
        it, and the task takes everything before it too; as nothing follows such an item, a plain last item
        means that every item is plain). An event that fails to format is left too: the
        handler formats it again and meets the error."""
        channel, transport = self.channel, self.transport
        if channel is None or transport is None or not channel.items:
            return b""
        items = channel.items
        last = items[-1]
        if type(last) is not StreamEvent or last.finished is not None:
            return b""
        if transport.is_closing() or transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            channel.wake()
            return b""
        format_event, index = self.format, self.index
        try:
            if len(items) == 1:  # the common case: one step's token
                data = format_event(last, index + 1)
            else:
                plain = cast("deque[StreamEvent]", items)
                data = b"".join([format_event(event, i) for i, event in enumerate(plain, index + 1)])
        except Exception:  # not here: the handler meets it
            channel.wake()
            return b""
        self.index = index + len(items)
        items.clear()
        return b"%x\r\n%b\r\n" % (len(data), data) if data else b""

    def close(self) -> None:
        """The handler is done with this stream: writes the plain token events still pending and detaches
        from the channel (nothing is written to the connection for this stream afterwards)."""
        channel = self.channel
        if channel is None:
            return
        data = self.take()
        if data and self.transport is not None:
            self.transport.write(data)
        channel.listener = None
        self.channel = None

    def render(self, events: Iterable[StreamEvent]) -> bytes:
        """The events the handler got from the channel, numbered after those already taken."""
        chunks = []
        for event in events:
            self.index += 1
            chunks.append(self.format(event, self.index))
        return b"".join(chunks)


async def write_stream(
    response: web.StreamResponse,
    transport: asyncio.Transport | None,
    channel: EventChannel,
    format_event: FormatEvent,
    batches: AsyncIterable[list[StreamEvent]],
) -> StreamEvent | None:
    """Writes one request's events to ``response``: the plain token events by an ``SSEWriter`` attached to
    its ``channel`` (``transport`` from ``SSEWriter.open``), the others as ``batches`` (the request's
    ``Infer.stream_batches``) hands them to the handler. Returns the last event (None when none came); an
    error of ``batches`` propagates, the writer detached first (the connection may serve another request
    next)."""
    sse = SSEWriter.attach(transport, channel, format_event)
    last: StreamEvent | None = None
    try:
        async for events in batches:
            data = sse.render(events)
            if data:
                await response.write(data)
            last = events[-1]
    finally:
        sse.close()
    return last
