"""create_app(): routes, start-up (connect to the shards, warm up), clean-up; middlewares in middleware.py."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable

from aiohttp import web

from common import plugins

from . import anthropic_api, lora_api, middleware, openai_api, tgi_api
from .agent import Agent
from .chat import ChatPrompter
from .client import ShardClient
from .config import RouterConfig
from .infer import Infer
from .openapi import DOCS_ASSETS, DOCS_ASSETS_PATH, SWAGGER_UI, docs_asset, openapi_document
from .responses_api import add_routes as add_responses_routes
from .state import STATE_KEY, RouterState
from .tokenizer import Tokenizer
from .tracing import RouterTracer

log = logging.getLogger(__name__)

SHARD_READY_TIMEOUT_S = 600.0
STARTUP_KEY = web.AppKey("startup", asyncio.Task)


class StartupRefused(RuntimeError):
    """A setting the shards cannot honour, found at start; the message has the numbers."""


async def _connect(app: web.Application) -> None:
    """Loads the tokenizer, waits for the shards, warms them up, then serves. Fatal on failure."""
    state = app[STATE_KEY]
    config = state.config
    try:
        tokenizer = await asyncio.to_thread(Tokenizer, config.tokenizer_name, config.revision)
        client = ShardClient(config.shard_socket())
        await client.wait_ready(SHARD_READY_TIMEOUT_S)
        info = await client.info()
        infer = Infer(config, client, tokenizer, info, state.tracer)
        await infer.start()
        if infer.max_batch_total_tokens < config.max_total_tokens:
            raise StartupRefused(
                f"the batch holds {infer.max_batch_total_tokens} tokens (max_batch_total_tokens: the KV cache "
                f"the shards report), fewer than `max_total_tokens` ({config.max_total_tokens}): one request "
                "could never fit. Lower --max-total-tokens, or give the cache more memory"
            )
        prompter = ChatPrompter(tokenizer, config.chat_template, config.chat_wrapping)
        lazy_calls = "grammar" in infer.validator.processors  # auto's lazy grammar needs the processor
        state.agent = Agent(prompter, tokenizer, config.tool_call_parser, config.reasoning_parser, lazy_calls)
        state.infer = infer
        log.info("Router ready: %s on %s (%s)", config.model_id, info.device_type, info.dtype)
    except StartupRefused as e:
        log.error("Router start-up refused: %s", e)
        os._exit(1)
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
    tracer = app[STATE_KEY].tracer
    if tracer is not None:
        await asyncio.to_thread(tracer.shutdown)  # exports what is pending (a blocking call)


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


async def _docs(request: web.Request) -> web.Response:
    return web.Response(text=SWAGGER_UI, content_type="text/html")


def _docs_asset(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    """The handler of one of the /docs page's assets (served from the package: no CDN)."""

    async def handler(request: web.Request) -> web.Response:
        body, content_type = docs_asset(name)
        return web.Response(body=body, content_type=content_type, headers={"Cache-Control": "max-age=86400"})

    return handler


def create_app(config: RouterConfig) -> web.Application:
    tracer = RouterTracer.from_config(config)
    # The request's span is outermost: it sees the status every other middleware answers with.
    traced = [tracer.middleware()] if tracer is not None else []
    app = web.Application(
        middlewares=[*traced, *middleware.middlewares(config)],
        # Caps bodies sent without a Content-Length (chunked); declared lengths are checked up front.
        client_max_size=config.payload_limit,
    )
    if config.cors_allow_origin:
        app.on_response_prepare.append(middleware.cors_headers(config.cors_allow_origin))
    app[STATE_KEY] = RouterState(config, tracer=tracer)
    tgi_api.add_routes(app)
    openai_api.add_routes(app)
    add_responses_routes(app)
    anthropic_api.add_routes(app)
    lora_api.add_routes(app)
    app.router.add_get("/openapi.json", _openapi)
    app.router.add_get("/api-doc/openapi.json", _openapi)
    app.router.add_get("/docs", _docs)
    for name in DOCS_ASSETS:
        app.router.add_get(f"{DOCS_ASSETS_PATH}/{name}", _docs_asset(name))
    app.on_startup.append(_on_startup)
    app.on_cleanup.append(_on_cleanup)
    add_extensions(app, config)
    return app


def add_extensions(app: web.Application, config: RouterConfig) -> None:
    """Lets each active router-extension plugin add its routes and middlewares (common/plugins.py)."""
    for plugin in plugins.active("router_extensions", config.plugins):
        extend = plugin.load()
        try:
            extend(app, config)
        except Exception as e:
            raise plugins.PluginError(f"plugin {plugin.name!r} failed to extend the router: {e}") from e
        log.info("Router extension %s (from %s %s) added", plugin.name, plugin.distribution, plugin.version)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it is installed (it halves the per-token cost of streaming), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(config: RouterConfig) -> None:
    """Serves until SIGINT/SIGTERM, then drains (see ``serve``)."""
    # Every streamed token allocates a few small objects, and a busy router holds hundreds of thousands
    # (each request's tokens): the default collector thresholds would re-scan them all many times a second.
    # Start-up objects are frozen out of collection; cycles are still collected, less often.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(serve(config))
    finally:
        loop.close()


async def serve(config: RouterConfig) -> None:
    """Serves HTTP until the first SIGINT/SIGTERM; then stops admitting (new requests and /health get
    503, the listening socket stays open so clients see why), lets the admitted requests finish within
    ``graceful_termination_timeout`` seconds, and returns. A second signal exits at once."""
    app = create_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, config.hostname, config.port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("Second signal: exiting now")
            os._exit(128 + signum)
        log.info("Received %s: draining", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await stop.wait()
        infer = app[STATE_KEY].infer
        if infer is not None:
            await infer.drain(config.graceful_termination_timeout)
    finally:
        await runner.cleanup()
    log.info("Router stopped")
