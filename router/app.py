"""create_app(): routes, start-up (connect to the shards, warm up), clean-up, and middlewares."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os

from aiohttp import web

from . import openai_api, tgi_api
from .chat import ChatPrompter
from .client import ShardClient
from .config import RouterConfig
from .errors import InferError
from .infer import Infer
from .openapi import SWAGGER_UI, openapi_document
from .state import STATE_KEY, RouterState
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

PAYLOAD_LIMIT = 2 * 1024 * 1024
SHARD_READY_TIMEOUT_S = 600.0
STARTUP_KEY = web.AppKey("startup", asyncio.Task)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """User errors -> their status with a JSON body; anything unexpected -> a bare 500, no traceback."""
    try:
        return await handler(request)
    except InferError as e:
        return tgi_api.error_response(e)
    except web.HTTPException as e:
        if e.content_type == "application/json":
            raise
        return web.json_response(
            {"error": e.reason, "error_type": "http"}, status=e.status, headers=_allow(e)
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("Unhandled error on %s %s", request.method, request.path)
        return web.json_response({"error": "internal server error", "error_type": "internal"}, status=500)


def _allow(e: web.HTTPException) -> dict[str, str]:
    return {"Allow": e.headers["Allow"]} if "Allow" in e.headers else {}


def cors_middleware(origins: tuple[str, ...]):
    """CORS for the configured origins only ("*" allows any); no origins configured = no CORS headers."""

    @web.middleware
    async def cors(request: web.Request, handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed = origin is not None and ("*" in origins or origin in origins)
        if request.method == "OPTIONS" and allowed:
            response: web.StreamResponse = web.Response(status=204)
        else:
            response = await handler(request)
        if allowed and not response.prepared:
            response.headers["Access-Control-Allow-Origin"] = "*" if "*" in origins else origin
            response.headers["Access-Control-Allow-Methods"] = "GET, POST"
            response.headers["Access-Control-Allow-Headers"] = "content-type, authorization"
            response.headers["Vary"] = "Origin"
        return response

    return cors


async def _connect(app: web.Application) -> None:
    """Loads the tokenizer, waits for the shards, warms them up, then serves. Fatal on failure."""
    state = app[STATE_KEY]
    config = state.config
    try:
        tokenizer = await asyncio.to_thread(Tokenizer, config.tokenizer_name, config.revision)
        client = ShardClient(config.shard_sockets())
        await client.wait_ready(SHARD_READY_TIMEOUT_S)
        info = await client.info()
        infer = Infer(config, client, tokenizer, info)
        await infer.start()
        state.prompter = ChatPrompter(tokenizer, config.chat_template, config.chat_wrapping)
        state.infer = infer
        log.info("Router ready: %s on %s (%s)", config.model_id, info.device_type, info.dtype)
    except Exception:
        log.exception("Router start-up failed")
        os._exit(1)


async def _on_startup(app: web.Application) -> None:
    app[STARTUP_KEY] = asyncio.create_task(_connect(app), name="router-startup")


async def _on_cleanup(app: web.Application) -> None:
    task = app[STARTUP_KEY]
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    infer = app[STATE_KEY].infer
    if infer is not None:
        await infer.stop()
        await infer.client.close()


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def _docs(request: web.Request) -> web.Response:
    return web.Response(text=SWAGGER_UI, content_type="text/html")


def create_app(config: RouterConfig) -> web.Application:
    app = web.Application(
        middlewares=[cors_middleware(config.cors_allow_origin), error_middleware],
        client_max_size=PAYLOAD_LIMIT,
    )
    app[STATE_KEY] = RouterState(config)
    tgi_api.add_routes(app)
    openai_api.add_routes(app)
    app.router.add_get("/openapi.json", _openapi)
    app.router.add_get("/api-doc/openapi.json", _openapi)
    app.router.add_get("/docs", _docs)
    app.on_startup.append(_on_startup)
    app.on_cleanup.append(_on_cleanup)
    return app


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (it halves the per-token cost of streaming), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(config: RouterConfig) -> None:
    """Serves until SIGINT/SIGTERM; in-flight requests get a grace period to finish."""
    # Every streamed token allocates a few small objects, and a busy router holds hundreds of thousands
    # (each request's tokens): the default collector thresholds would re-scan them all many times a second.
    # Start-up objects are frozen out of collection; cycles are still collected, less often.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    web.run_app(
        create_app(config),
        loop=new_event_loop(),
        host=config.hostname,
        port=config.port,
        handler_cancellation=True,
        shutdown_timeout=30.0,
        access_log=None,
        print=lambda *_: None,
    )
