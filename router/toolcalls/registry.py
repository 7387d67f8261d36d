"""Tool-call parsers by name, the parser a model needs, and third-party parsers.

Built-in names: ``hermes``, ``llama3_json``, ``mistral``, ``pythonic``. Other distributions add parsers
through the entry point group ``text_generation.tool_parsers`` (the naming of ``common/plugins.py``'s
groups): the entry point is a callable taking no argument and returning a ``ToolCallParser`` (a parser
class is one). Naming it is what enables it, as ``--backend NAME`` does for backends; a built-in of the
same name wins. A named plugin that is missing or fails to load raises ``common.plugins.PluginError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from common.plugins import NamedPlugins

from .base import ToolCallParser
from .hermes import HermesParser
from .llama3 import Llama3JsonParser
from .mistral import MistralParser
from .pythonic import PythonicParser

TOOL_PARSERS_GROUP = "text_generation.tool_parsers"

BUILTIN_TOOL_PARSERS: dict[str, Callable[[], ToolCallParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "pythonic": PythonicParser,
}


_PLUGINS = NamedPlugins(TOOL_PARSERS_GROUP, "tool call parser", BUILTIN_TOOL_PARSERS, ToolCallParser)


def tool_parser_names() -> list[str]:
    """Every parser name that ``get_tool_parser`` knows: the built-ins, then installed plugins."""
    return _PLUGINS.names()


def get_tool_parser(name: str) -> ToolCallParser:
    """The parser called ``name``: a built-in, else the entry point of that name in
    ``text_generation.tool_parsers``. PluginError when there is none or it fails to load."""
    return _PLUGINS.get(name)


# (marker in the chat template or among the tokenizer's special tokens, parser), first match wins.
_TEMPLATE_MARKERS: tuple[tuple[str, str], ...] = (
    ("<|python_start|>", "pythonic"),
    ("[func_name1(", "pythonic"),  # the instruction of the Llama 3.2 pythonic templates
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3_json"),
    ("ipython", "llama3_json"),
)
_TOKEN_MARKERS: tuple[tuple[str, str], ...] = (
    ("<|python_start|>", "pythonic"),
    ("<tool_call>", "hermes"),
    ("[TOOL_CALLS]", "mistral"),
    ("<|python_tag|>", "llama3_json"),
)


def detect_tool_parser(chat_template: str | None, special_tokens: Iterable[str] = ()) -> str | None:
    """The built-in parser for a model, from its chat template's text, else from its tokenizer's special
    (added) tokens; None when neither says (the model has no known tool format)."""
    if chat_template:
        for marker, name in _TEMPLATE_MARKERS:
            if marker in chat_template:
                return name
    tokens = set(special_tokens)
    for marker, name in _TOKEN_MARKERS:
        if marker in tokens:
            return name
    return None
