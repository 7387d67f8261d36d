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
from router.sse import WRITE_BUFFER_LIMIT, DirectSSE, WriteCoalescer
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


def test_direct_sse_writes_plain_tokens_as_chunks_and_leaves_the_rest_to_the_handler() -> None:
    transport = FakeTransport()
    sse = DirectSSE(transport, lambda e, i: stream_event_bytes(e, i, False, 3))  # type: ignore[arg-type]
    plain = StreamEvent(Token(5, "hi", -0.5, False), "hi")
    assert sse.offer(plain) and sse.offer(plain)
    for index, frame in enumerate(transport.written, start=1):
        size, _, rest = frame.partition(b"\r\n")
        assert rest.endswith(b"\r\n") and int(size, 16) == len(rest) - 2
        assert json.loads(rest[6:-4])["index"] == index  # b"data: " ... b"\n\n\r\n"
    final = StreamEvent(plain.token, "hi", finished=Finished("hihihi", "length", 3, None, [], [], []))
    assert not sse.offer(final)  # the handler ends the response
    assert not sse.offer(GenerationError("boom"))
    transport.buffered = WRITE_BUFFER_LIMIT + 1
    assert not sse.offer(plain)  # a slow client: the handler waits for it
    transport.buffered, transport.closing = 0, True
    assert not sse.offer(plain)
    assert len(transport.written) == 2
    # What the handler writes is numbered after what was written directly.
    assert json.loads(sse.render([final])[6:])["index"] == 3


async def test_coalesced_frames_share_one_write_in_order_and_never_outlive_a_declined_event() -> None:
    """With a coalescer, frames wait for its flush (all of a connection's in one chunk, in order); an
    event the handler must see (the last, an error, a slow client) first writes what is pending."""
    loop = asyncio.get_running_loop()
    coalescer = WriteCoalescer(loop)
    transport = FakeTransport()
    sse = DirectSSE(transport, lambda e, i: stream_event_bytes(e, i, False, 3), coalescer)  # type: ignore[arg-type]
    plain = StreamEvent(Token(5, "hi", -0.5, False), "hi")
    assert sse.offer(plain) and sse.offer(plain)
    assert transport.written == []  # until the loop runs the flush
    await asyncio.sleep(0)
    assert len(transport.written) == 1
    size, _, rest = transport.written[0].partition(b"\r\n")
    assert int(size, 16) == len(rest) - 2
    events = [json.loads(e[6:]) for e in rest[:-2].split(b"\n\n") if e]
    assert [e["index"] for e in events] == [1, 2]
    assert sse.offer(plain)  # pending again
    final = StreamEvent(plain.token, "hi", finished=Finished("hihihi", "length", 3, None, [], [], []))
    assert not sse.offer(final)  # declined: the pending frame went out first
    assert (
        len(transport.written) == 2 and json.loads(transport.written[1].split(b"\r\n")[1][6:])["index"] == 3
    )
    await asyncio.sleep(0)  # the scheduled flush finds nothing left
    assert len(transport.written) == 2


async def test_a_busy_coalescer_pauses_after_a_slow_flush_and_close_writes_what_is_pending() -> None:
    loop = asyncio.get_running_loop()
    coalescer = WriteCoalescer(loop)
    coalescer.ready_at = loop.time() + 60  # as if the last flush had just taken a long time
    transport = FakeTransport()
    sse = DirectSSE(transport, lambda e, i: stream_event_bytes(e, i, False, 3), coalescer)  # type: ignore[arg-type]
    plain = StreamEvent(Token(5, "hi", -0.5, False), "hi")
    channel = EventChannel()
    channel.direct = sse.offer
    channel.put(plain)
    await asyncio.sleep(0.01)
    assert transport.written == []  # held until the pause ends...
    sse.close(channel)  # ...or the handler is done with direct writes
    assert channel.direct is None and len(transport.written) == 1
    assert coalescer.handle is not None
    coalescer.handle.cancel()


def test_frames_for_a_closing_connection_are_dropped_and_empty_events_write_nothing() -> None:
    transport = FakeTransport()
    sse = DirectSSE(transport, lambda e, i: b"")  # type: ignore[arg-type]
    assert sse.offer(StreamEvent(Token(5, "", -0.5, False), "")) and transport.written == []
    sse = DirectSSE(transport, lambda e, i: stream_event_bytes(e, i, False, 3), None)  # type: ignore[arg-type]
    sse.pending.append(b"data: x\n\n")
    transport.closing = True
    sse.flush()
    assert transport.written == [] and sse.pending == []


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


def test_an_event_that_fails_to_format_goes_to_the_handler() -> None:
    """A formatting error must not reach the batching loop: the handler gets the event (and the error)."""
    transport = FakeTransport()

    def format_event(event: StreamEvent, index: int) -> bytes:
        raise ValueError("boom")

    sse = DirectSSE(transport, format_event, None)  # type: ignore[arg-type]
    assert not sse.offer(StreamEvent(Token(5, "hi", -0.5, False), "hi"))
    assert transport.written == [] and sse.index == 0
