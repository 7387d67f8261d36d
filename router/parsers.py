"""The names ``--tool-call-parser`` and ``--reasoning-parser`` accept, checked before any process starts.

The registries live with the parsers (router/toolcalls/registry.py, router/reasoning.py): built-in names,
then the plugins' entry points, loaded the way the router loads them at start-up (``NamedPlugins``)."""

from __future__ import annotations

from common.plugins import PluginError

from .reasoning import get_reasoning_parser, reasoning_parser_names
from .toolcalls import get_tool_parser, tool_parser_names

# The words each flag takes besides a parser's name (router/agent.py): detect it, or (reasoning) none.
TOOL_CALL_PARSER_WORDS = ("auto",)
REASONING_PARSER_WORDS = ("auto", "none")


def parser_problem(tool_call_parser: str, reasoning_parser: str) -> str | None:
    """Why a parser named by ``--tool-call-parser`` or ``--reasoning-parser`` cannot serve (an unknown name,
    with the known ones; or a plugin that fails to load), else None."""
    checks = (
        ("--tool-call-parser", tool_call_parser, TOOL_CALL_PARSER_WORDS, tool_parser_names, get_tool_parser),
        ("--reasoning-parser", reasoning_parser, REASONING_PARSER_WORDS, reasoning_parser_names,
         get_reasoning_parser),
    )  # fmt: skip
    for flag, name, words, names, load in checks:
        if name in words:
            continue
        known = names()
        if name not in known:
            return f"`{flag} {name}` is not a known parser. Known: {', '.join([*words, *known])}"
        try:
            load(name)
        except PluginError as e:
            return f"`{flag} {name}`: {e}"
    return None
