"""router/body.py: request bodies are strict JSON objects; every refusal names the place."""

from __future__ import annotations

import json

import pytest
from aiohttp import web

from router.body import MAX_DEPTH, parse_json_object
from router.errors import ValidationError

pytestmark = pytest.mark.timeout(60)


def refusal(raw: bytes) -> str:
    """The message of the 4xx that ``raw`` gets."""
    with pytest.raises((ValidationError, web.HTTPClientError)) as info:
        parse_json_object(raw)
    error = info.value
    if isinstance(error, ValidationError):
        return error.message
    assert error.status == 400
    return json.loads(error.text)["error"]


def test_a_plain_object_passes() -> None:
    body = {"inputs": "é🤗", "parameters": {"temperature": 0.5, "stop": ["a"], "seed": 2**64 - 1}}
    assert parse_json_object(json.dumps(body).encode()) == body
    assert parse_json_object(json.dumps(body, ensure_ascii=False).encode()) == body
    # A valid surrogate pair (an escaped emoji) is text.
    assert parse_json_object(b'{"inputs": "\\ud83e\\udd17"}') == {"inputs": "🤗"}


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"inputs": "hi", "parameters": {"temperature": NaN}}', ["`parameters.temperature`", "finite"]),
        (b'{"top_p": Infinity}', ["`top_p`"]),
        (b'{"top_p": -Infinity}', ["`top_p`"]),
        (b'{"a": [1, 2, 1e999]}', ["`a[2]`", "finite"]),
        (b'{"inputs": "\\ud800"}', ["`inputs`", "surrogate"]),
        (b'{"messages": [{"role": "user", "content": "x\\udfff"}]}', ["`messages[0].content`"]),
        (b'{"stop": ["ok", "\\ud83d"]}', ["`stop[1]`"]),
        (b'{"logit_bias": {"\\ud800": 1}}', ["`logit_bias`", "key"]),
        (json.dumps({"a": json.loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))}).encode(), ["nested"]),
        (b"[" * 100_000, ["nested too deeply"]),
        (b'{"inputs": "\xff"}', ["UTF-8", "offset 12"]),
        (b'{"inputs": "\xed\xa0\x80"}', ["UTF-8"]),  # a surrogate encoded as UTF-8 bytes
        (b"", ["JSON"]),
        (b"{", ["JSON"]),
        (b'{"a": 1} x', ["JSON"]),
        (b'{"a": ' + b"9" * 5000 + b"}", ["JSON"]),
        (b"[]", ["JSON object"]),
        (b"null", ["JSON object"]),
        (b'"text"', ["JSON object"]),
    ],
)
def test_refusals_name_the_place(raw: bytes, words: list[str]) -> None:
    message = refusal(raw)
    for word in words:
        assert word in message, message
    assert "0x" not in message and "Traceback" not in message


def test_long_keys_are_shortened_in_messages() -> None:
    message = refusal(json.dumps({"k" * 5000: {"x": float("nan")}}).encode())
    assert len(message) < 200 and "..." in message
