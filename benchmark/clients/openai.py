"""OpenAI-API streaming clients: ``/v1/chat/completions`` and ``/v1/completions`` (any server speaking the
OpenAI API: ours, vLLM, llama.cpp's llama-server, TGI's Messages API).

Every request is greedy (``temperature: 0``), streamed, and asks for ``stream_options.include_usage`` so
that the token count comes from the server's ``usage`` (a chunk need not carry exactly one token: ours skips
tokens that decode to no text yet, speculative decoding sends several); without usage, each chunk with text
counts as one token. ``--ignore-eos`` adds ``ignore_eos: true`` and ``min_tokens: max_tokens`` (vLLM and our
server accept both; llama-server honours ``ignore_eos`` and ignores ``min_tokens``). The stream ends at
``data: [DONE]``: that event is the final one (E2E time), carrying the last ``finish_reason`` and usage seen.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from benchmark.clients import RequestError, StreamEvent, loads
from benchmark.clients.http import HttpStreamClient

DONE = "[DONE]"
# Delta fields of a chat chunk that carry generated text (reasoning models stream their thinking apart).
CHAT_TEXT_FIELDS = ("content", "reasoning_content", "reasoning")


def error_fields(obj: Any) -> tuple[str, str | None] | None:
    """(message, type) of an OpenAI error body, ``{"error": {"message", "type", ...}}`` (or a string), or
    vLLM's older ``{"object": "error", "message", "type"}``; None when ``obj`` is not an error."""
    if not isinstance(obj, dict):
        return None
    error = obj.get("error")
    if isinstance(error, dict):
        return str(error.get("message", error)), error.get("type")
    if error is not None:
        return str(error), obj.get("error_type") or obj.get("type")
    if obj.get("object") == "error":
        return str(obj.get("message", obj)), obj.get("type")
    return None


def http_error(status: int, body: str) -> RequestError:
    """An error answer before the stream (OpenAI error envelope where the server sends one)."""
    message, error_type = body.strip()[:500], None
    try:
        fields = error_fields(json.loads(body))
    except ValueError:
        fields = None
    if fields is not None:
        message, error_type = fields
    return RequestError(f"http_{status}", message, status=status, error_type=error_type)


class ChunkParser:
    """Turns the ``data:`` payloads of one OpenAI stream into StreamEvents (``chat`` or completions).

    ``feed`` returns the event of one payload: a token event for a chunk with text (1 token), None for a
    chunk without (role announcement, finish chunk, usage chunk), the final event for ``[DONE]``. It keeps
    the last ``finish_reason`` and ``usage`` seen for the final event; ``end`` gives the final event for a
    stream that ended without ``[DONE]`` after a finish reason (lenient), or raises ``incomplete``.
    """

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.finish_reason: str | None = None
        self.completion_tokens: int | None = None
        self.prompt_tokens: int | None = None
        self.done = False

    def _text(self, choice: dict[str, Any]) -> str:
        if not self.chat:
            text = choice.get("text")
            return text if isinstance(text, str) else ""
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return ""
        return "".join(v for name in CHAT_TEXT_FIELDS if isinstance(v := delta.get(name), str))

    def final_event(self) -> StreamEvent:
        self.done = True
        return StreamEvent(
            num_tokens=0,
            final=True,
            finish_reason=self.finish_reason,
            server_output_tokens=self.completion_tokens,
            count_from_server=self.completion_tokens is not None,
            prompt_tokens=self.prompt_tokens,
        )

    def feed(self, data: str) -> StreamEvent | None:
        if data.strip() == DONE:
            return self.final_event()
        try:
            obj: Any = loads(data)
        except ValueError:
            raise RequestError("protocol", f"chunk is not JSON: {data[:200]!r}") from None
        fields = error_fields(obj)
        if fields is not None:
            message, error_type = fields
            raise RequestError(f"stream:{error_type or 'error'}", message, error_type=error_type)
        if not isinstance(obj, dict):
            raise RequestError("protocol", f"chunk is not a JSON object: {data[:200]!r}")
        usage = obj.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("completion_tokens"), int):
                self.completion_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                self.prompt_tokens = usage["prompt_tokens"]
        text = ""
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:  # one choice (n = 1); a server may still send an empty list
                if not isinstance(choice, dict):
                    raise RequestError("protocol", f"choice is not a JSON object: {data[:200]!r}")
                text += self._text(choice)
                if choice.get("finish_reason") is not None:
                    self.finish_reason = str(choice["finish_reason"])
        return StreamEvent(num_tokens=1, text=text) if text else None

    def end(self) -> StreamEvent:
        if self.finish_reason is None:
            raise RequestError("incomplete", "the stream ended before [DONE] and without a finish_reason")
        return self.final_event()


class OpenAIClient(HttpStreamClient):
    """Base of the two OpenAI clients: model discovery, the common body, the stream loop."""

    path = ""
    chat = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Accept the server root or its /v1 root.
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[: -len("/v1")]
        self.model = self.options.model

    @property
    def endpoint(self) -> str:
        return self.base_url + self.path

    async def prepare(self) -> None:
        """Asks ``GET /v1/models`` for the model name when none was given: the first id listed."""
        if self.model is not None:
            return
        answer = await self.get_json(self.base_url + "/v1/models", http_error)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or not data or not isinstance(data[0], dict) or "id" not in data[0]:
            raise RequestError("protocol", f"/v1/models lists no model id: {json.dumps(answer)[:200]}")
        self.model = str(data[0]["id"])

    def prompt_fields(self, prompt: str) -> dict[str, Any]:
        raise NotImplementedError

    def payload(
        self, prompt: str, max_new_tokens: int | None = None, model: str | None = None
    ) -> dict[str, Any]:
        """The JSON body of one request; ``model`` replaces the client's model (a LoRA adapter's name)."""
        max_tokens = max_new_tokens or self.params.max_new_tokens
        body: dict[str, Any] = {
            "model": self.model if model is None else model,
            **self.prompt_fields(prompt),
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
        }
        if self.options.stream_usage:
            body["stream_options"] = {"include_usage": True}
        if self.params.ignore_eos:
            body["ignore_eos"] = True
            body["min_tokens"] = max_tokens
        if self.options.extra_body:
            body.update(self.options.extra_body)
        return body

    async def stream(
        self, prompt: str, max_new_tokens: int | None = None, model: str | None = None
    ) -> AsyncIterator[StreamEvent]:
        parser = ChunkParser(self.chat)
        body = self.payload(prompt, max_new_tokens, model)
        async for data in self.post_sse(self.endpoint, body, http_error):
            if parser.done:
                continue  # nothing may follow [DONE]; drain to keep the connection
            event = parser.feed(data)
            if event is not None:
                yield event
        if not parser.done:
            yield parser.end()


class OpenAIChatClient(OpenAIClient):
    """``POST /v1/chat/completions``: the prompt is one user message (the server's chat template applies)."""

    api = "openai-chat"
    path = "/v1/chat/completions"
    chat = True

    def prompt_fields(self, prompt: str) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": prompt}]}


class OpenAICompletionsClient(OpenAIClient):
    """``POST /v1/completions``: the prompt as is."""

    api = "openai-completions"
    path = "/v1/completions"

    def prompt_fields(self, prompt: str) -> dict[str, Any]:
        return {"prompt": prompt}
