"""The client layer: one small streaming client per API, all behind the StreamingClient protocol.

The runner only sees StreamEvents and RequestErrors, so adding an API (OpenAI completions, chat) is one
module here plus one entry in CLIENTS.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from benchmark.config import GenerationParams


@dataclass(frozen=True)
class StreamEvent:
    """One parsed event of a generation stream.

    ``num_tokens`` is the number of generated tokens this event delivers (1 per TGI token event; an OpenAI
    chunk may carry 0 or more). The ``final`` event closes the answer and carries what the server says about
    it: ``finish_reason`` and its own count of generated tokens (``server_output_tokens``) when known.
    """

    num_tokens: int
    text: str = ""
    final: bool = False
    finish_reason: str | None = None
    server_output_tokens: int | None = None


class RequestError(Exception):
    """A request that failed; ``kind`` is the short, countable name of the failure.

    Kinds: ``http_<status>`` (error answer before the stream, e.g. ``http_429`` when overloaded),
    ``stream:<error_type>`` (error event inside the stream), ``connection`` (transport failure),
    ``protocol`` (malformed event), ``incomplete`` (stream ended before its final event). The runner adds
    ``timeout``, ``level_timeout`` and ``internal``.
    """

    def __init__(
        self, kind: str, message: str, *, status: int | None = None, error_type: str | None = None
    ) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message
        self.status = status
        self.error_type = error_type


class StreamingClient(Protocol):
    """A client of one streaming generation API.

    Contract of ``stream``: it sends one request for ``prompt`` and yields each event as soon as it has been
    received and parsed, in arrival order (the caller timestamps them on arrival). It ends normally only
    after having yielded a ``final`` event and read the response to its end; every failure is raised as a
    RequestError. Cancellation (timeouts) propagates and releases the connection.
    """

    api: str

    def stream(self, prompt: str) -> AsyncIterator[StreamEvent]: ...

    async def close(self) -> None: ...


ClientFactory = Callable[[str, GenerationParams, int], StreamingClient]


def _tgi(url: str, params: GenerationParams, max_connections: int) -> StreamingClient:
    from benchmark.clients.tgi import TgiStreamClient

    return TgiStreamClient(url, params, max_connections=max_connections)


# API name (the --api flag) -> factory(url, params, max_connections).
CLIENTS: dict[str, ClientFactory] = {"tgi": _tgi}


def make_client(api: str, url: str, params: GenerationParams, max_connections: int) -> StreamingClient:
    """Builds the client for ``api``; raises ValueError naming the known APIs otherwise."""
    try:
        factory = CLIENTS[api]
    except KeyError:
        raise ValueError(f"api: unknown {api!r}, known: {', '.join(sorted(CLIENTS))}") from None
    return factory(url, params, max_connections)
