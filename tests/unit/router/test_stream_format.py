"""The hand-formatted SSE event (the per-token hot path) equals the generic JSON encoding."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

from router.entry import EventChannel
from router.errors import GenerationError
from router.generation import Finished, StreamEvent, Token
from router.openai_api import _data, _TextChunks
from router.sse import WRITE_BUFFER_LIMIT, SSEWriter, WriteCoalescer
from router.tgi_api import stream_event_bytes, stream_event_json

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize(
    "token",
    [
        Token(5, 'he"llo\n\\ 🤗 \u2028 \x00', -0.25, False),
        Token(2, "</s>", None, True),
        Token(3, "", math.nan, False),
        Token(4, "é", -1e-30, False),
    ],
)
def test_fast_event_equals_json(token: Token) -> None:
    event = StreamEvent(token, token.text)
    raw = stream_event_bytes(event, 7, False, 11)
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    assert json.loads(raw[6:]) == json.loads(json.dumps(stream_event_json(event, 7, False, 11)))


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.buffered = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return self.buffered


PLAIN = StreamEvent(Token(5, "hi", -0.5, False), "hi")
FINAL = StreamEvent(PLAIN.token, "hi", finished=Finished("hihihi", "length", 3, None, [], [], []))


def tgi_format(event: StreamEvent, index: int) -> bytes:
    return stream_event_bytes(event, index, False, 3)


def writer_of(
    transport: FakeTransport, format_event=tgi_format
) -> tuple[SSEWriter, EventChannel, WriteCoalescer]:
    coalescer = WriteCoalescer(asyncio.get_running_loop())
    channel = EventChannel()
    writer = SSEWriter(transport, channel, format_event, coalescer)  # type: ignore[arg-type]
    return writer, channel, coalescer


async def waiting(channel: EventChannel) -> asyncio.Task[None]:
    """A consumer task that waits on ``channel`` (started: it waits before the caller puts anything)."""
    task = asyncio.create_task(channel.wait())
    await asyncio.sleep(0)
    return task


def chunk_indices(frame: bytes) -> list[int]:
    """The TGI indices of the events in one chunked-encoding frame (checked whole)."""
    size, _, rest = frame.partition(b"\r\n")
    assert rest.endswith(b"\r\n") and int(size, 16) == len(rest) - 2
    return [json.loads(e[6:])["index"] for e in rest[:-2].split(b"\n\n") if e]


async def test_plain_tokens_share_one_chunk_per_flush_and_the_handler_gets_the_rest_in_order() -> None:
    """Plain token events wait in the channel for the coalescer's flush, which formats them with the
    handler's function and writes them in one chunk; the last event wakes the handler, which takes
    everything still pending (numbered after what was written)."""
    transport = FakeTransport()
    writer, channel, _ = writer_of(transport)
    waiter = await waiting(channel)
    channel.put(PLAIN)
    channel.put(PLAIN)
    assert transport.written == [] and len(channel.items) == 2  # the producer formats nothing
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [chunk_indices(f) for f in transport.written] == [[1, 2]]
    assert channel.empty() and not waiter.done()  # the handler was never woken
    channel.put(PLAIN)
    channel.put(FINAL)  # wakes the handler at once
    await asyncio.sleep(0)
    assert waiter.done() and len(transport.written) == 1
    events = channel.take_all()
    rendered = writer.render(events)  # type: ignore[arg-type]
    assert [json.loads(e[6:])["index"] for e in rendered.split(b"\n\n") if e] == [3, 4]
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert len(transport.written) == 1


async def test_a_slow_or_closing_connection_and_an_error_go_to_the_handler() -> None:
    transport = FakeTransport()
    writer, channel, coalescer = writer_of(transport)
    waiter = await waiting(channel)
    transport.buffered = WRITE_BUFFER_LIMIT + 1
    channel.put(PLAIN)
    coalescer.flush()
    assert transport.written == [] and len(channel.items) == 1  # a slow client: the handler waits for it
    await asyncio.sleep(0)
    assert waiter.done()
    channel.take_all()
    transport.buffered, transport.closing = 0, True
    waiter = await waiting(channel)
    channel.put(PLAIN)
    coalescer.flush()
    await asyncio.sleep(0)
    assert transport.written == [] and waiter.done()  # nothing more for a closing connection
    channel.take_all()
    transport.closing = False
    waiter = await waiting(channel)
    channel.put(GenerationError("boom"))
    await asyncio.sleep(0)
    assert waiter.done() and writer.index == 0
    writer.close()


async def test_a_busy_coalescer_pauses_after_a_slow_flush_and_close_writes_what_is_pending() -> None:
    transport = FakeTransport()
    writer, channel, coalescer = writer_of(transport)
    coalescer.ready_at = asyncio.get_running_loop().time() + 60  # as if the last flush had just been slow
    channel.put(PLAIN)
    await asyncio.sleep(0.01)
    assert transport.written == []  # held until the pause ends...
    writer.close()  # ...or the handler is done with the stream
    assert channel.listener is None and [chunk_indices(f) for f in transport.written] == [[1]]
    channel.put(PLAIN)  # detached: the handler's own
    assert len(channel.items) == 1 and writer.take() == b""
    assert coalescer.handle is not None
    coalescer.handle.cancel()


async def test_events_without_a_chunk_write_nothing_and_no_transport_means_no_listener() -> None:
    transport = FakeTransport()
    writer, channel, coalescer = writer_of(transport, lambda e, i: b"")
    channel.put(PLAIN)
    coalescer.flush()
    assert transport.written == [] and channel.empty() and writer.index == 1
    channel = EventChannel()
    writer = SSEWriter.attach(None, channel, tgi_format)
    assert channel.listener is None and writer.channel is None
    channel.put(PLAIN)
    assert len(channel.items) == 1 and writer.take() == b""
    writer.close()


async def test_a_handler_and_the_coalescer_together_keep_every_event_in_order() -> None:
    """Steps of plain tokens while the client reads slowly at times, then the last event: the bytes on
    the connection are every event once, in order, whoever wrote them."""
    transport = FakeTransport()
    writer, channel, _ = writer_of(transport)
    handler_frames: list[bytes] = []

    async def handler() -> None:
        while True:
            await channel.wait()
            events = channel.take_all()
            handler_frames.append(writer.render(events))  # type: ignore[arg-type]
            transport.written.append(b"%x\r\n%b\r\n" % (len(handler_frames[-1]), handler_frames[-1]))
            if events[-1].finished is not None:  # type: ignore[union-attr]
                return

    task = asyncio.create_task(handler())
    for step in range(40):
        transport.buffered = WRITE_BUFFER_LIMIT + 1 if step % 7 in (3, 4) else 0
        channel.put(PLAIN)
        if step % 3 == 0:
            channel.put(PLAIN)
        await asyncio.sleep(0)
    channel.put(FINAL)
    await asyncio.wait_for(task, 5)
    indices = [i for frame in transport.written for i in chunk_indices(frame)]
    assert indices == list(range(1, len(indices) + 1)) and len(indices) == 40 + 14 + 1
    assert handler_frames and any(f for f in handler_frames[:-1])  # the handler wrote some plain ones
    writer.close()


@pytest.mark.parametrize("text", [" The", 'he"llo\n\\ 🤗 \u2028 \x00', "é", "x" * 300])
def test_openai_text_chunks_equal_the_generic_encoding(text: str) -> None:
    """OpenAI's per-token chunk, built from cached bytes around its text, equals ``json.dumps``'s."""
    head = {
        "id": "chatcmpl-0123abcd",
        "created": 1,
        "model": 'a "model" é',
        "object": "chat.completion.chunk",
    }

    def make(index: int, content: str) -> dict[str, object]:
        choice = {"index": index, "delta": {"content": content}, "logprobs": None, "finish_reason": None}
        return {**head, "choices": [choice], "usage": None}

    chunks = _TextChunks(make)
    for index in (0, 3, 0):
        assert chunks(index, text) == _data(make(index, text))


async def test_an_event_that_fails_to_format_goes_to_the_handler() -> None:
    """A formatting error must not escape the coalescer's flush: the handler gets the event (and meets
    the error)."""
    transport = FakeTransport()

    def format_event(event: StreamEvent, index: int) -> bytes:
        raise ValueError("boom")

    writer, channel, coalescer = writer_of(transport, format_event)
    waiter = await waiting(channel)
    channel.put(PLAIN)
    coalescer.flush()
    await asyncio.sleep(0)
    assert transport.written == [] and writer.index == 0 and waiter.done() and len(channel.items) == 1
