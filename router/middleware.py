"""The HTTP server's middlewares, outermost first: CORS, errors -> JSON, the API key, the payload limit.

- CORS is closed unless ``--cors-allow-origin`` names origins (``*`` for any). Allowed origins get
  ``Access-Control-Allow-Origin`` on every response, streams included, and preflight ``OPTIONS`` requests
  are answered here, before the API key is asked for (browsers never send it on a preflight).
  ``Access-Control-Allow-Credentials`` is never sent: the API key travels in a header a script sets, which
  needs no credentials mode, and it must never be combined with ``*``.
- Errors: the router's own errors become their status and JSON body; aiohttp's (404, 405, 413...) become
  JSON too; anything unexpected is logged and answered with a bare JSON 500, never a traceback.
- With ``--api-key`` (API_KEY), every route but ``GET /health`` (and ``GET /metrics`` unless
  ``--metrics-require-auth``) needs ``Authorization: Bearer <key>`` (on the Anthropic routes, ``x-api-key:
  <key>`` too, as Anthropic's clients send it), compared in constant time; otherwise 401 with
  ``WWW-Authenticate: Bearer``.
- A ``Content-Length`` over ``--payload-limit`` gets 413 before any of the body is read (chunked bodies are
  capped by the app's ``client_max_size``: see ``body.read_json_object``).

Errors leave in the shape of the route they were aimed at: Anthropic's on the Messages routes, OpenAI's
envelope on the OpenAI routes, TGI's ``{"error", "error_type"}`` elsewhere.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from . import anthropic_api, openai_api, tgi_api
from .config import RouterConfig
from .errors import AuthenticationError, InferError, PayloadTooLargeError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPENAI_PATHS = frozenset({"/chat/completions", "/completions", "/tokenize", "/version", "/v1"})
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "content-type, authorization, x-api-key, anthropic-version"
CORS_MAX_AGE_S = "600"


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") or path in OPENAI_PATHS


def shaped_error(request: web.Request, error: InferError) -> web.Response:
    """``error`` as the route it was aimed at answers errors."""
    if anthropic_api.is_anthropic_path(request.path):
        return anthropic_api.error_to_anthropic(error)
    if is_openai_path(request.path):
        return openai_api.error_to_openai(error)
    response = tgi_api.error_response(error)
    if isinstance(error, AuthenticationError):
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


# -- errors -------------------------------------------------------------------------------------------------
@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """User errors -> their status with a JSON body; anything unexpected -> a bare 500, no traceback."""
    try:
        return await handler(request)
    except InferError as e:
        return tgi_api.error_response(e)
    except web.HTTPRequestEntityTooLarge:  # a body read by something other than body.read_json_object
        response = shaped_error(request, PayloadTooLargeError(request.client_max_size))
        response.force_close()
        return response
    except web.HTTPException as e:
        if e.content_type == "application/json":
            raise
        if anthropic_api.is_anthropic_path(request.path):  # e.g. 405 for a GET
            response = anthropic_api.error_to_anthropic(e)
            response.headers.update(_allow(e))
            return response
        return web.json_response(
            {"error": e.reason, "error_type": "http"}, status=e.status, headers=_allow(e)
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("Unhandled error on %s %s", request.method, request.path)
        if anthropic_api.is_anthropic_path(request.path):
            return anthropic_api.anthropic_error(500, "internal server error")
        return web.json_response({"error": "internal server error", "error_type": "internal"}, status=500)


def _allow(e: web.HTTPException) -> dict[str, str]:
    return {"Allow": e.headers["Allow"]} if "Allow" in e.headers else {}


# -- CORS ---------------------------------------------------------------------------------------------------
def _allowed_origin(request: web.Request, origins: tuple[str, ...]) -> str | None:
    """The value of Access-Control-Allow-Origin for this request, or None (no CORS headers)."""
    origin = request.headers.get("Origin")
    if origin is None or not origins:
        return None
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def cors_middleware(origins: tuple[str, ...]):
    """Answers allowed preflight requests; the headers themselves come from ``cors_headers``."""

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" and _allowed_origin(request, origins) is not None:
            return web.Response(
                status=204,
                headers={
                    "Access-Control-Allow-Methods": CORS_METHODS,
                    "Access-Control-Allow-Headers": CORS_HEADERS,
                    "Access-Control-Max-Age": CORS_MAX_AGE_S,
                },
            )
        return await handler(request)

    return cors


def cors_headers(origins: tuple[str, ...]):
    """An ``on_response_prepare`` hook: CORS headers on every response to an allowed origin, including
    streams, which are prepared inside their handlers (after a middleware could still touch them)."""

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        allowed = _allowed_origin(request, origins)
        if allowed is None:
            return
        response.headers["Access-Control-Allow-Origin"] = allowed
        response.headers.setdefault("Access-Control-Allow-Methods", CORS_METHODS)
        response.headers.setdefault("Access-Control-Allow-Headers", CORS_HEADERS)
        if allowed != "*":
            response.headers["Vary"] = "Origin"
        # Never Access-Control-Allow-Credentials (and never with "*", which browsers refuse anyway).
        response.headers.popall("Access-Control-Allow-Credentials", None)

    return add_headers


# -- the API key --------------------------------------------------------------------------------------------
def auth_middleware(config: RouterConfig):
    """Requires ``Authorization: Bearer <api_key>`` (or ``x-api-key`` on the Anthropic routes) on every
    route but the open ones."""
    assert config.api_key
    key = config.api_key.encode("utf-8")
    open_paths = {"/health"} if config.metrics_require_auth else {"/health", "/metrics"}

    def matches(token: str) -> bool:
        try:
            given = token.strip().encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            return False
        return hmac.compare_digest(given, key)

    def authorized(request: web.Request) -> bool:
        if "x-api-key" in request.headers and anthropic_api.is_anthropic_path(request.path):
            return matches(request.headers["x-api-key"])
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and matches(token)

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in ("GET", "HEAD") and request.path in open_paths:
            return await handler(request)
        if not authorized(request):
            anthropic = anthropic_api.is_anthropic_path(request.path)
            if "Authorization" in request.headers or (anthropic and "x-api-key" in request.headers):
                message = "invalid API key"
            elif anthropic:
                message = (
                    "missing API key: send the header `x-api-key: <key>` or `Authorization: Bearer <key>`"
                )
            else:
                message = "missing API key: send the header `Authorization: Bearer <key>`"
            return shaped_error(request, AuthenticationError(message))
        return await handler(request)

    return auth


# -- the payload limit -------------------------------------------------------------------------------------
def payload_limit_middleware(limit: int):
    """413 for a declared body over the limit, before reading any of it."""

    @web.middleware
    async def payload_limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        length = request.content_length
        if length is not None and length > limit:
            response = shaped_error(request, PayloadTooLargeError(limit, length))
            response.force_close()  # the unread body makes the connection unusable
            return response
        return await handler(request)

    return payload_limit


def middlewares(config: RouterConfig) -> list:
    """The app's middlewares for ``config``, outermost first."""
    chain = [cors_middleware(config.cors_allow_origin)] if config.cors_allow_origin else []
    chain.append(error_middleware)
    if config.api_key:
        chain.append(auth_middleware(config))
    chain.append(payload_limit_middleware(config.payload_limit))
    return chain
