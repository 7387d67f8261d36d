"""Request bodies: strict JSON objects, checked once at the edge so that nothing downstream (validation, the
tokenizer, chat templates, error messages) ever sees a value it cannot handle.

Refused, each with a 4xx whose message names the place: a wrong content type (415), a body over the
payload limit (413), bytes that are not UTF-8 or text that is not JSON (400), anything but an object, and
values no JSON parser should produce: ``NaN``/``Infinity`` (Python's parser accepts them) or numbers that
overflow to infinity, strings holding lone UTF-16 surrogates (``"\\ud800"``: not Unicode; tokenizers and
encoders fail on them), and nesting deeper than ``MAX_DEPTH``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from .errors import PayloadTooLargeError, ValidationError

# Deeper than any real request (chat content parts are 4 levels down); deep enough for any template kwargs.
MAX_DEPTH = 32


def _json_error(status: type[web.HTTPClientError], message: str) -> web.HTTPClientError:
    return status(
        text=json.dumps({"error": message, "error_type": "validation"}), content_type="application/json"
    )


def bad_request(message: str) -> web.HTTPBadRequest:
    return _json_error(web.HTTPBadRequest, message)  # type: ignore[return-value]


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 4xx naming what is wrong."""
    if request.content_type != "application/json":
        raise _json_error(
            web.HTTPUnsupportedMediaType,
            f"Expected request with `Content-Type: application/json`, got `{request.content_type}`",
        )
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:  # a chunked body over client_max_size
        raise PayloadTooLargeError(request.client_max_size) from None
    return parse_json_object(raw)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (bad byte at offset {e.start})") from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise bad_request(f"the request body is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as e:
        raise bad_request(f"Failed to parse the request body as JSON: {e}") from None
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object")
    check_values(body)
    return body


def _where(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            name = part if len(part) <= 40 else part[:40] + "..."
            out += f".{name}" if out else name
    return out or "body"


def _fail(path: tuple[str | int, ...], what: str) -> ValidationError:
    param = path[0] if path and isinstance(path[0], str) else None
    return ValidationError(f"`{_where(path)}` {what}", param)


def _is_text(value: str) -> bool:
    """False for a string holding a lone surrogate (it has no UTF-8 form)."""
    if value.isascii():
        return True
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_values(body: object) -> None:
    """Walks a parsed body (iteratively) and refuses what JSON cannot mean; see the module's docstring."""
    stack: list[tuple[tuple[str | int, ...], object]] = [((), body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not _is_text(value):
                raise _fail(path, "holds a lone UTF-16 surrogate: it is not valid Unicode text")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise _fail(path, "must be a finite number (NaN and Infinity are not JSON)")
        elif isinstance(value, dict | list):
            if len(path) >= MAX_DEPTH:
                raise _fail(path, f"is nested too deeply (at most {MAX_DEPTH} levels)")
            if isinstance(value, dict):
                for key, item in value.items():
                    if not _is_text(key):
                        raise _fail(path, "has a key holding a lone UTF-16 surrogate")
                    stack.append(((*path, key), item))
            else:
                stack.extend(((*path, i), item) for i, item in enumerate(value))
