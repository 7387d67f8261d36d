"""The ``ban-word`` router extension (entry point group ``text_generation.router_extensions``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from . import WordMatcher, ban_word, token_texts

if TYPE_CHECKING:
    from router.config import RouterConfig


def add_route(app: web.Application, config: RouterConfig) -> None:
    """Adds ``GET /ban-word``: ``{"word", "banned_tokens"}``, the number of vocabulary tokens whose own
    text contains the word (counted from the model's tokenizer.json; null when the router's tokenizer is
    not a local directory holding one)."""
    word = ban_word()
    count: int | None = None
    directory = Path(config.tokenizer_name)
    if (directory / "tokenizer.json").is_file():
        count = len(WordMatcher.of(word).containing(token_texts(directory)))

    async def handler(request: web.Request) -> web.Response:
        return web.json_response({"word": word, "banned_tokens": count})

    app.router.add_get("/ban-word", handler)
