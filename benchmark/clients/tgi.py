"""TGI-native streaming client: ``POST {url}/generate_stream`` answered with Server-Sent Events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from benchmark.clients import RequestError, StreamEvent, loads
from benchmark.clients.http import HttpStreamClient


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
        obj: Any = loads(data)
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


class TgiStreamClient(HttpStreamClient):
    """StreamingClient for TGI's ``/generate_stream`` (greedy, ``details: true``)."""

    api = "tgi"

    @property
    def endpoint(self) -> str:
        return self.base_url + "/generate_stream"

    def payload(
        self, prompt: str, max_new_tokens: int | None = None, model: str | None = None
    ) -> dict[str, Any]:
        """The JSON body of one request; ``model`` is TGI's ``parameters.adapter_id`` (a LoRA adapter)."""
        parameters: dict[str, Any] = {
            "max_new_tokens": max_new_tokens or self.params.max_new_tokens,
            "details": True,
            "do_sample": False,
        }
        if self.params.ignore_eos:
            parameters["ignore_eos"] = True
        if model is not None:
            parameters["adapter_id"] = model
        if self.options.extra_body:  # TGI's generation fields all live in "parameters"
            parameters.update(self.options.extra_body)
        return {"inputs": prompt, "parameters": parameters}

    async def stream(
        self, prompt: str, max_new_tokens: int | None = None, model: str | None = None
    ) -> AsyncIterator[StreamEvent]:
        final_seen = False
        body = self.payload(prompt, max_new_tokens, model)
        async for data in self.post_sse(self.endpoint, body, http_error):
            if final_seen:
                continue  # nothing may follow the final event; drain to keep the connection
            event = parse_event(data)
            final_seen = event.final
            yield event
        if not final_seen:
            raise RequestError("incomplete", "the stream ended before its final event")
