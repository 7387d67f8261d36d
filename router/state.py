"""The router's mutable state: filled in by start-up once the shards are ready, read by the handlers."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .agent import Agent
from .config import RouterConfig
from .errors import UnhealthyError
from .infer import Infer
from .tracing import RouterTracer


@dataclass
class RouterState:
    config: RouterConfig
    infer: Infer | None = None
    agent: Agent | None = None
    # The router's spans (--otlp-endpoint), else None.
    tracer: RouterTracer | None = None


STATE_KEY = web.AppKey("state", RouterState)


def state(request: web.Request) -> RouterState:
    return request.app[STATE_KEY]


def get_agent(request: web.Request) -> Agent:
    """The app's chat prompter, tools and reasoning (router/agent.py), or a 503 while the model is still
    loading (start-up sets it with Infer)."""
    agent = request.app[STATE_KEY].agent
    if agent is None:
        raise UnhealthyError("the model is still loading")
    return agent


def get_infer(request: web.Request) -> Infer:
    """The app's Infer, or a 503 while the model is still loading."""
    infer = request.app[STATE_KEY].infer
    if infer is None or not infer.ready:
        raise UnhealthyError("the model is still loading")
    return infer
