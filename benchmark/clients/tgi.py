"""TGI-native streaming client: ``POST {url}/generate_stream`` answered with Server-Sent Events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from benchmark.clients import RequestError, StreamEvent
from benchmark.config import GenerationParams
from benchmark.sse import SSEParser


def http_error(status: int, body: str) -> RequestError:
    """An error answer before the stream: TGI's body is ``{"error": ..., "error_type": ...}``."""
    message, error_type = body.strip()[:500], None
    try:
        obj = json.loads(body)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and "error" in obj:
        message, error_type = str(obj["error"]), obj.get("error_type")
    return RequestError(f"http_{status}", message, status=status, error_type=error_type)


def parse_event(data: str) -> StreamEvent:
    """One ``data:`` payload of the TGI stream -> StreamEvent; an error event raises RequestError."""
    try:
        obj: Any = json.loads(data)
    except ValueError:
        raise RequestError("protocol", f"event is not JSON: {data[:200]!r}") from None
    if not isinstance(obj, dict):
        raise RequestError("protocol", f"event is not a JSON object: {data[:200]!r}")
    if "error" in obj:
        error_type = obj.get("error_type")
        raise RequestError(f"stream:{error_type or 'error'}", str(obj["error"]), error_type=error_type)
    token = obj.get("token")
    text = token.get("text", "") if isinstance(token, dict) else ""
    final = obj.get("generated_text") is not None
    finish_reason = server_tokens = None
    details = obj.get("details")
    if isinstance(details, dict):
        finish_reason = details.get("finish_reason")
        server_tokens = details.get("generated_tokens")
    return StreamEvent(
        num_tokens=1 if token is not None else 0,
        text=text,
        final=final,
        finish_reason=finish_reason,
        server_output_tokens=server_tokens,
    )


class TgiStreamClient:
    """StreamingClient for TGI's ``/generate_stream`` (greedy, ``details: true``)."""

    api = "tgi"

    def __init__(self, url: str, params: GenerationParams, *, max_connections: int = 0) -> None:
        self.endpoint = url.rstrip("/") + "/generate_stream"
        self.params = params
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def payload(self, prompt: str) -> dict[str, Any]:
        """The JSON body of one request."""
        parameters: dict[str, Any] = {
            "max_new_tokens": self.params.max_new_tokens,
            "details": True,
            "do_sample": False,
        }
        if self.params.ignore_eos:
            parameters["ignore_eos"] = True
        return {"inputs": prompt, "parameters": parameters}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._max_connections),
                # Timeouts belong to the runner (per request, per level), not to the transport.
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def stream(self, prompt: str) -> AsyncIterator[StreamEvent]:
        session = self._get_session()
        try:
            async with session.post(
                self.endpoint, json=self.payload(prompt), headers={"Accept": "text/event-stream"}
            ) as response:
                if response.status != 200:
                    raise http_error(response.status, await response.text(errors="replace"))
                parser = SSEParser()
                final_seen = False
                async for chunk in response.content.iter_any():
                    for data in parser.feed(chunk):
                        if final_seen:
                            continue  # nothing may follow the final event; drain to keep the connection
                        event = parse_event(data)
                        final_seen = event.final
                        yield event
                for data in parser.finish():
                    if not final_seen:
                        event = parse_event(data)
                        final_seen = event.final
                        yield event
                if not final_seen:
                    raise RequestError("incomplete", "the stream ended before its final event")
        except aiohttp.ClientError as e:
            raise RequestError("connection", f"{type(e).__name__}: {e}") from e
        except OSError as e:
            raise RequestError("connection", f"{type(e).__name__}: {e}") from e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
