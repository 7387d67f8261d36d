"""The Lark grammars (llguidance) that router/agent.py decodes an answer with: tool calls forced
(``tool_choice`` ``required`` or a named function) or lazy (``auto``), a JSON constraint on the content,
and the reasoning allowed before either.

Calls are written in one of the formats a grammar can follow (``GRAMMAR_FORMATS``): hermes'
``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`` blocks, Llama 3's ``{"name": ...,
"parameters": ...}`` objects (``; `` between them), Mistral's ``[TOOL_CALLS][{...}, {...}]``, the pythonic
``[f(a=1), g(b="x")]``. The call is forced word for word (``{"name": "<tool>", "arguments": `` then the
arguments, which follow the tool's JSON schema, then ``}``; pythonic: ``<tool>(`` then keyword arguments
whose values are Python literals that follow the schema, router/pythonic_grammar.py, then ``)``), so a
call is always one the parser reads and its arguments always validate.

- Forced (``forced_rules``): the answer is calls and nothing else, at most ``limit`` of them.
- Lazy (``lazy_rules``, llama.cpp's lazy grammar in llguidance's form): the answer is free text until the
  model starts a call, then what follows is forced as above. A call starts with the format's opener
  (hermes ``<tool_call>``; Llama 3 ``<|python_tag|>``; Mistral ``[TOOL_CALLS]``; pythonic
  ``<|python_start|>``) anywhere, or, where the parser reads calls without one at the start of the answer
  (``BARE_HEADS``: Llama 3's bare ``{"name": ...}`` object, the pythonic ``[f(``), with what the parser
  would read as a call's beginning there (llama.cpp's full-pattern trigger). Hermes: one call, after which
  the text is free again, each call with its own opener; the other formats: their list of calls, which
  ends the answer (as these models end it: a bare call after the list would be read as one more,
  unconstrained). At most ``limit`` calls are allowed: then the opener can no longer be written, so the
  model cannot write more calls than the parser would keep. Free text never holds an opener, nor starts
  as a bare call, unforced: a call is always constrained.

A marker that is a special token of the tokenizer (``[TOOL_CALLS]`` in Mistral's, ``<|python_tag|>`` in
Llama's) is written ``<[id]>``: text cannot spell a special token, and the model writes the token itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from common import grammar

from . import pythonic_grammar
from .errors import ValidationError
from .reasoning import ReasoningParser

# Formats whose calls a grammar follows (forced and lazy); the others are forced in hermes' format.
GRAMMAR_FORMATS = ("hermes", "llama3_json", "mistral", "pythonic")
# The opener that starts a call in each format's free text (lazy grammars trigger on it).
OPENERS = {
    "hermes": "<tool_call>",
    "llama3_json": "<|python_tag|>",
    "mistral": "[TOOL_CALLS]",
    "pythonic": "<|python_start|>",
}
# The start of an answer that the parser reads as a call without an opener (a Lark regex body; lazy grammars
# trigger on it): Llama 3's bare object whose first key is one a call has (or holds an escape, which could
# spell one), the pythonic list whose first item calls a name.
BARE_HEADS = {
    "llama3_json": r'\s*\{\s*"((name|type|parameters|arguments)"|[^"\\]*\\)',
    "pythonic": pythonic_grammar.CALL_LIST_HEAD,
}
# What closes the pythonic format's ``<|python_start|>`` call.
PYTHON_END = "<|python_end|>"
# Reasoning parsers whose <think> ... </think> a grammar can allow before the answer.
THINK_PARSERS = ("think", "deepseek_r1", "qwen3")
# The most calls one answer may hold under constrained decoding when the request sets no bound (Responses'
# ``max_tool_calls`` does): a small model forced to call may otherwise repeat calls until its tokens run out.
MAX_CALLS = 8
# Characters with a meaning in llguidance's regular expressions (``/`` ends a Lark regex literal).
_REGEX_META = frozenset("\\.+*?()|[]{}^$#&-~/")


class Tool(Protocol):
    """A tool as a grammar needs it (router/agent.py's ``FunctionTool``): its name and the JSON schema of
    its arguments object."""

    @property
    def name(self) -> str: ...

    @property
    def parameters(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class CallSyntax:
    """How one model writes calls: ``fmt`` (one of ``GRAMMAR_FORMATS``) and the tokenizer's special tokens
    by text (``special``: only those that text cannot spell)."""

    fmt: str
    special: Mapping[str, int] = field(default_factory=dict)

    def marker(self, text: str) -> str:
        """A marker in a rule: the special token itself when it is one, else its text."""
        token = self.special.get(text)
        return f"<[{token}]>" if token is not None else lark_literal(text)

    def writable(self, tools: Sequence[Tool]) -> tuple[Tool, ...]:
        """The tools a call in this format can name (pythonic: ``callable_tool``'s; else all of them)."""
        if self.fmt != "pythonic":
            return tuple(tools)
        return tuple(t for t in tools if pythonic_grammar.callable_tool(t.name, t.parameters))

    def exact(self, tool: Tool) -> bool:
        """Whether every call to ``tool`` the grammar allows has arguments that validate against its schema
        (always, but for the pythonic values llguidance's JSON writes: router/pythonic_grammar.py)."""
        return self.fmt != "pythonic" or pythonic_grammar.arguments(tool.parameters, "tool").exact

    def _arguments(self, tools: Sequence[Tool], name: str) -> tuple[list[str], list[str]]:
        """The Lark expression of each tool's arguments (``""``: none) and the rules they use."""
        expressions: list[str] = []
        rules: list[str] = []
        for i, tool in enumerate(tools):
            if self.fmt == "pythonic":
                arguments = pythonic_grammar.arguments(tool.parameters, f"{name}_args_{i}")
                expressions.append(arguments.expression)
                rules += arguments.rules
                continue
            schema = {**tool.parameters, "x-guidance": grammar.JSON_OPTIONS}
            expressions.append(f"{name}_args_{i}")
            rules.append(f"{name}_args_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
        return expressions, rules

    def _close(self) -> str:
        """What ends one call object."""
        return ")" if self.fmt == "pythonic" else "}"

    def _call_object(self, tools: Sequence[Tool], name: str, arguments: list[str]) -> list[str]:
        """Rules ``{name}_obj`` (first): one call to any of ``tools`` (``arguments``: ``_arguments``')."""
        key = "parameters" if self.fmt == "llama3_json" else "arguments"
        rules: list[str] = []
        for i, (tool, expression) in enumerate(zip(tools, arguments, strict=True)):
            if self.fmt == "pythonic":
                head = f"{tool.name}("
            else:
                head = f'{{"name": {json.dumps(tool.name, ensure_ascii=False)}, "{key}": '
            body = " ".join(p for p in (lark_literal(head), expression, lark_literal(self._close())) if p)
            rules.append(f"{name}_obj_{i}: {body}")
        obj = f"{name}_obj: {' | '.join(f'{name}_obj_{i}' for i in range(len(tools)))}"
        return [obj, *rules]

    def _list(self, name: str, limit: int) -> str:
        """Rule ``{name}_list``: ``[`` 1 to ``limit`` call objects ``]`` (mistral, pythonic)."""
        obj = f"{name}_obj"
        items = f'{obj} (", " {obj}){{0,{limit - 1}}}' if limit > 1 else obj
        return f'{name}_list: "[" {items} "]"'

    def _body(self, name: str, limit: int) -> list[str]:
        """Rule ``{name}_body`` (first): what follows the opener, 1 to ``limit`` calls (hermes: one block;
        pythonic: a list, or one call, then ``<|python_end|>``)."""
        obj = f"{name}_obj"
        if self.fmt == "hermes":
            return [f'{name}_body: "\\n"? {obj} "\\n"? {self.marker("</tool_call>")}']
        if self.fmt == "llama3_json":
            more = f' ("; " {obj}){{0,{limit - 1}}}' if limit > 1 else ""
            return [f"{name}_body: {obj}{more}"]
        if self.fmt == "pythonic":
            end = self.marker(PYTHON_END)
            return [f"{name}_body: ({name}_list | {obj}) {end}", self._list(name, limit)]
        return [f"{name}_body: {name}_list", self._list(name, limit)]

    def _bare(self, tools: Sequence[Tool], name: str, arguments: list[str], limit: int) -> list[str]:
        """Rule ``{name}_bare`` (first): the calls at the start of the answer without an opener, the first
        one's beginning (what the free text cannot start with, ``BARE_HEADS``) in a single lexeme."""
        heads = []
        for tool, expression in zip(tools, arguments, strict=True):
            tool_name = regex_escape(tool.name)
            if self.fmt == "pythonic":
                head = rf"\s*\[ ?{tool_name} ?\("
            else:  # Llama 3.x writes "type" first at times
                head = rf'\s*\{{ ?("type": ?"function", ?)?"name": ?"{tool_name}", ?"parameters": ?'
            heads.append(" ".join(p for p in (f"/{head}/", expression, lark_literal(self._close())) if p))
        sep, end = ('", "', ' "]"') if self.fmt == "pythonic" else ('"; "', "")
        more = f" ({sep} {name}_obj){{0,{limit - 1}}}" if limit > 1 else ""
        return [f"{name}_bare: {name}_first{more}{end}", f"{name}_first: {' | '.join(heads)}"]

    def forced_rules(self, tools: Sequence[Tool], name: str, limit: int) -> list[str]:
        """Lark rules (rule ``name`` first): the answer is 1 to ``limit`` calls to ``tools``."""
        arguments, argument_rules = self._arguments(tools, name)
        rules = [*self._call_object(tools, name, arguments), *argument_rules]
        if self.fmt == "hermes":
            call = f'{name}_call: {self.marker("<tool_call>")} "\\n" {name}_obj "\\n" {self.marker("</tool_call>")}'
            more = f' ("\\n" {name}_call){{0,{limit - 1}}}' if limit > 1 else ""
            return [f"{name}: {name}_call{more}", call, *rules]
        if self.fmt == "pythonic":
            return [f"{name}: {name}_list", self._list(name, limit), *rules]
        opener = self.marker(OPENERS["mistral"]) + " " if self.fmt == "mistral" else ""
        return [f"{name}: {opener}{name}_body", *self._body(name, limit), *rules]

    def lazy_rules(self, tools: Sequence[Tool], name: str, limit: int) -> list[str]:
        """Lark rules (rule ``name`` first): free text in which calls start at most ``limit`` calls to
        ``tools`` in all (hermes: ``limit`` openers of one call; the others: one opener, or the bare calls
        at the start, whose list ends the answer)."""
        opener = OPENERS[self.fmt]
        bare = BARE_HEADS.get(self.fmt)
        text, rest = f"{name.upper()}_TEXT", f"{name.upper()}_REST"
        free = "/(?s:.*)/" + (f" & ~/{bare}(?s:.*)/" if bare else "")
        if self.fmt == "hermes":
            per_opener, first = 1, f"{name}: {name}_call{{0,{limit}}} {rest}"
        else:
            per_opener, first = limit, f"{name}: {name}_call | {rest}" + (f" | {name}_bare" if bare else "")
        rules = [first, f"{text}: {free}"]
        if opener in self.special:  # text cannot hold a special token: the free text is any text
            rules += [f"{name}_call: {text} {self.marker(opener)} {name}_body", f"{rest}: {text}"]
        else:  # the shortest text up to the opener; the text after the calls cannot write one
            escaped = regex_escape(opener)
            rules += [
                f"{name}_open[lazy]: {text} {lark_literal(opener)}",
                f"{name}_call: {name}_open {name}_body",
                f"{rest}: {free} & ~/(?s:.*){escaped}(?s:.*)/",
            ]
        arguments, argument_rules = self._arguments(tools, name)
        if bare:
            rules += self._bare(tools, name, arguments, limit)
        rules += self._body(name, per_opener)
        return [*rules, *self._call_object(tools, name, arguments), *argument_rules]


def lark_literal(text: str) -> str:
    """A Lark string literal (JSON's escapes are Lark's)."""
    return json.dumps(text, ensure_ascii=False)


def regex_escape(text: str) -> str:
    """``text`` matched literally inside a Lark regex ``/.../``."""
    return "".join(f"\\{c}" if c in _REGEX_META else c for c in text)


def constraint_rules(constraint: str, name: str, field: str) -> list[str]:
    """Lark rules (rule ``name``) for a canonical JSON constraint."""
    kind, value = grammar.parse(constraint)
    if kind == "json_object":
        value = {"type": "object"}
    elif kind != "json":
        raise ValidationError(f"`{field}`: only JSON constraints can follow reasoning or tools", field)
    schema = {**value, "x-guidance": grammar.JSON_OPTIONS}
    return [f"{name}: %json {json.dumps(schema, ensure_ascii=False)}"]


def reasoning_rules(reasoning: ReasoningParser | None, in_reasoning: bool, field: str) -> list[str]:
    """The grammar's start: the reasoning the parser allows, then the rule ``answer``. A reasoning format a
    grammar cannot follow is a ValidationError naming ``field``."""
    if reasoning is None:
        return ["start: answer"]
    if reasoning.name not in THINK_PARSERS:
        raise ValidationError(
            f"`{field}` cannot be enforced after {reasoning.name} reasoning: start the server with "
            "--reasoning-parser none to constrain the whole answer",
            field,
        )
    return [
        "start: thought answer" if in_reasoning else 'start: ("<think>" thought)? answer',
        "thought: THOUGHT /\\s*/",
        # any text up to the first </think>, one lexeme (a lexeme stopping before it could not be ended)
        "THOUGHT: /(?s:.*)<\\/think>/ & ~/(?s:.*<\\/think>.+)/",
    ]
