"""Tool calls in generated text: parsers from a model's output to OpenAI ``tool_calls``.

Use::

    parser = get_tool_parser(detect_tool_parser(chat_template, special_tokens) or "hermes")
    parser.parse(text)            # -> ParsedOutput(content, calls)
    stream = parser.stream()      # one per choice
    stream.feed(delta)            # -> [ContentDelta | ToolCallDelta, ...]
    stream.finish()

The contract (streaming equals whole-text parsing, malformed calls as content, whitespace, ids) is in
``router.toolcalls.base``; each format's module describes what it accepts.
"""

from .base import (
    ContentDelta,
    Delta,
    ParsedOutput,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    ToolCallStream,
    new_call_id,
)
from .hermes import HermesParser
from .llama3 import Llama3JsonParser
from .mistral import MistralParser
from .pythonic import PythonicParser
from .registry import (
    BUILTIN_TOOL_PARSERS,
    TOOL_PARSERS_GROUP,
    detect_tool_parser,
    get_tool_parser,
    tool_parser_names,
)

__all__ = [
    "BUILTIN_TOOL_PARSERS",
    "TOOL_PARSERS_GROUP",
    "ContentDelta",
    "Delta",
    "HermesParser",
    "Llama3JsonParser",
    "MistralParser",
    "ParsedOutput",
    "PythonicParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallParser",
    "ToolCallStream",
    "detect_tool_parser",
    "get_tool_parser",
    "new_call_id",
    "tool_parser_names",
]
