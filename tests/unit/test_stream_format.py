"""The hand-formatted SSE event (the per-token hot path) equals the generic JSON encoding."""

from __future__ import annotations

import json
import math

import pytest

from router.generation import StreamEvent, Token
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
