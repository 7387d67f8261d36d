"""The HTTP side shared by the clients: one aiohttp session, a POST answered with Server-Sent Events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from benchmark.clients import ClientOptions, RequestError
from benchmark.config import GenerationParams
from benchmark.sse import SSEParser

ErrorFromBody = Callable[[int, str], RequestError]


class HttpStreamClient:
    """Base of the SSE clients: owns the session (created on first use) and the transport errors."""

    api = ""
    model: str | None = None

    def __init__(
        self,
        url: str,
        params: GenerationParams,
        *,
        max_connections: int = 0,
        options: ClientOptions | None = None,
    ) -> None:
        self.base_url = url.rstrip("/")
        self.params = params
        self.options = options or ClientOptions()
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.options.api_key:
            headers["Authorization"] = f"Bearer {self.options.api_key}"
        return headers

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # A fresh connection per request: some servers (llama-server) close a connection after a
                # stream, and a reused pooled one then fails at once; a loopback connect costs ~0.1 ms.
                connector=aiohttp.TCPConnector(limit=self._max_connections, force_close=True),
                # Timeouts belong to the runner (per request, per level), not to the transport.
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    async def prepare(self) -> None:
        """Nothing to ask the server by default."""

    async def get_json(self, endpoint: str, error_from_body: ErrorFromBody) -> Any:
        """``GET`` a JSON document; failures raise RequestError."""
        session = self._get_session()
        try:
            async with session.get(endpoint, headers=self.headers()) as response:
                text = await response.text(errors="replace")
                if response.status != 200:
                    raise error_from_body(response.status, text)
        except (aiohttp.ClientError, OSError) as e:
            raise RequestError("connection", f"{type(e).__name__}: {e}") from e
        try:
            return json.loads(text)
        except ValueError:
            raise RequestError("protocol", f"{endpoint} did not answer JSON: {text[:200]!r}") from None

    async def post_sse(
        self, endpoint: str, body: dict[str, Any], error_from_body: ErrorFromBody
    ) -> AsyncIterator[str]:
        """``POST`` the JSON body and yield the ``data`` of each Server-Sent Event as it arrives (an event
        left without its closing blank line at the end included). An answer other than 200 raises the
        RequestError built by ``error_from_body(status, body text)``; transport failures raise ``connection``
        errors."""
        session = self._get_session()
        try:
            async with session.post(endpoint, json=body, headers=self.headers()) as response:
                if response.status != 200:
                    raise error_from_body(response.status, await response.text(errors="replace"))
                parser = SSEParser()
                async for chunk in response.content.iter_any():
                    for data in parser.feed(chunk):
                        yield data
                for data in parser.finish():
                    yield data
        except (aiohttp.ClientError, OSError) as e:
            raise RequestError("connection", f"{type(e).__name__}: {e}") from e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
