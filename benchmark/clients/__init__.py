"""The client layer: one small streaming client per API, all behind the StreamingClient protocol.

The runner only sees StreamEvents and RequestErrors, so adding an API is one module here plus one entry in
CLIENTS. Known APIs: ``tgi`` (TGI-native ``/generate_stream``), ``openai-chat`` (``/v1/chat/completions``)
and ``openai-completions`` (``/v1/completions``).
"""

from __future__ import annotations

import json
import json.scanner
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from benchmark.config import GenerationParams

# json's own scanner (its C one), without the Python layers of json.loads around it.
_scan_json = json.scanner.make_scanner(json.JSONDecoder())


def loads(text: str) -> Any:
    """``json.loads(text)``, faster for a document without surrounding whitespace (a stream's payloads:
    one per token, the load generator's own hot path). Raises ValueError as json.loads does."""
    try:
        value, end = _scan_json(text, 0)
    except StopIteration:
        return json.loads(text)  # leading whitespace, or not JSON: json.loads accepts or explains
    if end != len(text):
        return json.loads(text)
    return value


# Made once per streamed token by the load generator: a plain slotted dataclass (a frozen one pays an
# object.__setattr__ per field). Nobody mutates one.
@dataclass(slots=True)
class StreamEvent:
    """One parsed event of a generation stream.

    ``num_tokens`` is the number of generated tokens this event delivers (1 per TGI token event; 1 per
    OpenAI chunk with text, 0 for one without). The ``final`` event closes the answer and carries what the
    server says about it: ``finish_reason`` and its own count of generated tokens (``server_output_tokens``)
    when known. ``count_from_server`` says that this count is the one to use (OpenAI usage: a chunk need not
    carry exactly one token); ``prompt_tokens`` is the server's count of prompt tokens when it sent one.
    """

    num_tokens: int
    text: str = ""
    final: bool = False
    finish_reason: str | None = None
    server_output_tokens: int | None = None
    count_from_server: bool = False
    prompt_tokens: int | None = None


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

    ``prepare`` runs once before the first request (an OpenAI client asks the server for its model name
    there) and raises RequestError when the server cannot be used.

    Contract of ``stream``: it sends one request for ``prompt`` asking for ``max_new_tokens`` tokens (None:
    the client's GenerationParams) and yields each event as soon as it has been received and parsed, in
    arrival order (the caller timestamps them on arrival). It ends normally only after having yielded a
    ``final`` event and read the response to its end; every failure is raised as a RequestError.
    Cancellation (timeouts) propagates and releases the connection. ``model`` (given only when the request
    names one, ``serve --models``) is the model or LoRA adapter this request names instead of the
    client's.
    """

    api: str
    # The model the requests name (OpenAI APIs, known after prepare); None where the API has none.
    model: str | None

    async def prepare(self) -> None: ...

    def stream(
        self, prompt: str, max_new_tokens: int | None = None, model: str | None = None
    ) -> AsyncIterator[StreamEvent]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class ClientOptions:
    """Settings beyond GenerationParams, used by the APIs that have them (OpenAI).

    ``model`` None: the first id of ``GET /v1/models``. ``api_key``: sent as a bearer token.
    ``stream_usage``: ask for ``stream_options.include_usage``. ``extra_body``: fields merged into every
    request body last (e.g. ``{"n_predict": 64}`` for llama-server's own length field).
    """

    model: str | None = None
    api_key: str | None = None
    stream_usage: bool = True
    extra_body: dict[str, Any] | None = None


ClientFactory = Callable[[str, GenerationParams, int, ClientOptions], StreamingClient]


def _tgi(url: str, params: GenerationParams, max_connections: int, options: ClientOptions) -> StreamingClient:
    from benchmark.clients.tgi import TgiStreamClient

    return TgiStreamClient(url, params, max_connections=max_connections, options=options)


def _openai_chat(
    url: str, params: GenerationParams, max_connections: int, options: ClientOptions
) -> StreamingClient:
    from benchmark.clients.openai import OpenAIChatClient

    return OpenAIChatClient(url, params, max_connections=max_connections, options=options)


def _openai_completions(
    url: str, params: GenerationParams, max_connections: int, options: ClientOptions
) -> StreamingClient:
    from benchmark.clients.openai import OpenAICompletionsClient

    return OpenAICompletionsClient(url, params, max_connections=max_connections, options=options)


# API name (the --api flag) -> factory(url, params, max_connections, options).
CLIENTS: dict[str, ClientFactory] = {
    "tgi": _tgi,
    "openai-chat": _openai_chat,
    "openai-completions": _openai_completions,
}


def make_client(
    api: str,
    url: str,
    params: GenerationParams,
    max_connections: int,
    options: ClientOptions | None = None,
) -> StreamingClient:
    """Builds the client for ``api`` (``max_connections`` 0: unbounded); raises ValueError naming the known
    APIs otherwise."""
    try:
        factory = CLIENTS[api]
    except KeyError:
        raise ValueError(f"api: unknown {api!r}, known: {', '.join(sorted(CLIENTS))}") from None
    return factory(url, params, max_connections, options or ClientOptions())
