"""The Lark grammars (llguidance) that router/agent.py decodes an answer with: tool calls forced
(``tool_choice`` ``required`` or a named function) or lazy (``auto``), a JSON constraint on the content,
and the reasoning allowed before either.

Calls are written in one of the formats a grammar can follow (``GRAMMAR_FORMATS``): hermes'
``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`` blocks, Llama 3's ``{"name": ...,
"parameters": ...}`` objects (``; `` between them), Mistral's ``[TOOL_CALLS][{...}, {...}]``. The call
object is forced word for word (``{"name": "<tool>", "arguments": `` then the arguments, which follow
the tool's JSON schema, then ``}``), so a call is always one the parser reads and its arguments always
validate.

- Forced (``forced_rules``): the answer is calls and nothing else, at most ``limit`` of them.
- Lazy (``lazy_rules``, llama.cpp's lazy grammar in llguidance's form): the answer is free text until the
  model writes the format's opener (hermes ``<tool_call>``; Llama 3 ``<|python_tag|>``; Mistral
  ``[TOOL_CALLS]``), then what follows is forced as above. Hermes: one call, after which the text is free
  again, each call with its own opener; the list formats: their list of calls, which ends the answer (as
  these models end it: a bare call after the list would be read as one more, unconstrained). At most
  ``limit`` calls are allowed: then the opener can no longer be written, so the model cannot write more
  calls than the parser would keep. Free text never holds the opener unforced.
  Llama 3's bare calls (a ``{"name": ...}`` object without ``<|python_tag|>``) have no opener and stay
  free.

A marker that is a special token of the tokenizer (``[TOOL_CALLS]`` in Mistral's, ``<|python_tag|>`` in
Llama's) is written ``<[id]>``: text cannot spell a special token, and the model writes the token itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from common import grammar

from .errors import ValidationError
from .reasoning import ReasoningParser

# Formats whose calls a grammar follows (forced and lazy); the others are forced in hermes' format.
GRAMMAR_FORMATS = ("hermes", "llama3_json", "mistral")
# The opener that starts a call in each format's free text (lazy grammars trigger on it).
OPENERS = {"hermes": "<tool_call>", "llama3_json": "<|python_tag|>", "mistral": "[TOOL_CALLS]"}
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

    def _call_object(self, tools: Sequence[Tool], name: str) -> list[str]:
        """Rules ``{name}_obj`` (first): one call object to any of ``tools``."""
        key = "parameters" if self.fmt == "llama3_json" else "arguments"
        rules: list[str] = []
        for i, tool in enumerate(tools):
            head = lark_literal(f'{{"name": {json.dumps(tool.name, ensure_ascii=False)}, "{key}": ')
            rules.append(f'{name}_obj_{i}: {head} {name}_args_{i} "}}"')
            schema = {**tool.parameters, "x-guidance": grammar.JSON_OPTIONS}
            rules.append(f"{name}_args_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
        obj = f"{name}_obj: {' | '.join(f'{name}_obj_{i}' for i in range(len(tools)))}"
        return [obj, *rules]

    def _body(self, name: str, limit: int) -> str:
        """Rule ``{name}_body``: what follows the opener, 1 to ``limit`` calls (hermes: one block)."""
        obj = f"{name}_obj"
        more = f"{{0,{limit - 1}}}"
        if self.fmt == "hermes":
            return f'{name}_body: "\\n"? {obj} "\\n"? {self.marker("</tool_call>")}'
        if self.fmt == "llama3_json":
            return f'{name}_body: {obj} ("; " {obj}){more}' if limit > 1 else f"{name}_body: {obj}"
        items = f'{obj} (", " {obj}){more}' if limit > 1 else obj
        return f'{name}_body: "[" {items} "]"'

    def forced_rules(self, tools: Sequence[Tool], name: str, limit: int) -> list[str]:
        """Lark rules (rule ``name`` first): the answer is 1 to ``limit`` calls to ``tools``."""
        rules = self._call_object(tools, name)
        if self.fmt == "hermes":
            call = f'{name}_call: {self.marker("<tool_call>")} "\\n" {name}_obj "\\n" {self.marker("</tool_call>")}'
            more = f' ("\\n" {name}_call){{0,{limit - 1}}}' if limit > 1 else ""
            return [f"{name}: {name}_call{more}", call, *rules]
        opener = self.marker(OPENERS["mistral"]) + " " if self.fmt == "mistral" else ""
        return [f"{name}: {opener}{name}_body", self._body(name, limit), *rules]

    def lazy_rules(self, tools: Sequence[Tool], name: str, limit: int) -> list[str]:
        """Lark rules (rule ``name`` first): free text in which openers start at most ``limit`` calls to
        ``tools`` in all (hermes: ``limit`` openers of one call; the list formats: one opener, whose list
        ends the answer)."""
        opener = OPENERS[self.fmt]
        text, rest = f"{name.upper()}_TEXT", f"{name.upper()}_REST"
        if self.fmt == "hermes":
            per_opener, first = 1, f"{name}: {name}_call{{0,{limit}}} {rest}"
        else:
            per_opener, first = limit, f"{name}: {name}_call | {rest}"
        rules = [first, f"{text}: /(?s:.*)/"]
        if opener in self.special:  # text cannot hold a special token: the free text is any text
            rules += [f"{name}_call: {text} {self.marker(opener)} {name}_body", f"{rest}: {text}"]
        else:  # the shortest text up to the opener; the text after the calls cannot write one
            escaped = regex_escape(opener)
            rules += [
                f"{name}_open[lazy]: {text} {lark_literal(opener)}",
                f"{name}_call: {name}_open {name}_body",
                f"{rest}: /(?s:.*)/ & ~/(?s:.*){escaped}(?s:.*)/",
            ]
        return [*rules, self._body(name, per_opener), *self._call_object(tools, name)]


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
