"""The router's mutable state: filled in by start-up once the shards are ready, read by the handlers."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from .chat import ChatPrompter
from .config import RouterConfig
from .errors import UnhealthyError
from .infer import Infer


@dataclass
class RouterState:
    config: RouterConfig
    infer: Infer | None = None
    prompter: ChatPrompter | None = None


STATE_KEY = web.AppKey("state", RouterState)


def state(request: web.Request) -> RouterState:
    return request.app[STATE_KEY]


def get_prompter(request: web.Request) -> ChatPrompter:
    """The app's chat prompter, or a 503 while the model is still loading (start-up sets it with Infer)."""
    prompter = request.app[STATE_KEY].prompter
    if prompter is None:
        raise UnhealthyError("the model is still loading")
    return prompter


def get_infer(request: web.Request) -> Infer:
    """The app's Infer, or a 503 while the model is still loading."""
    infer = request.app[STATE_KEY].infer
    if infer is None or not infer.ready:
        raise UnhealthyError("the model is still loading")
    return infer
