"""The hand-formatted SSE event (the per-token hot path) equals the generic JSON encoding."""

from __future__ import annotations

import json
import math

import pytest

from router.errors import GenerationError
from router.generation import Finished, StreamEvent, Token
from router.sse import WRITE_BUFFER_LIMIT, DirectSSE
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
