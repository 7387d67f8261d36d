"""The pythonic call format in a grammar (llguidance's Lark): a call's keyword arguments as Python literals
that follow the tool's JSON schema, and the text that starts a call list.

A pythonic call is ``name(key=value, ...)``: ``name`` a Python identifier (a tool whose name is not one
cannot be called in this format), the keys the schema's properties in the schema's order (the required ones
always, the others optional), each value a Python literal of its property's schema:

- ``type``: ``string`` (double or single quotes; the escapes ``\\\\ \\" \\' \\n \\r \\t`` only, so every
  string means the same to Python and to JSON; ``minLength``/``maxLength`` allow no escape), ``integer`` and
  ``number`` (JSON's spelling, which Python reads alike, with every numeric keyword: llguidance's JSON),
  ``boolean`` (``True``/``False``), ``null`` (``None``), ``array`` (``items``, ``minItems``,
  ``maxItems``), ``object`` (a dict of its ``properties`` with ``required``), or a list of them;
- ``enum`` and ``const`` (the values written as Python literals), ``anyOf``; no schema: any literal.

Objects (the arguments included) hold their declared properties only, as in OpenAI's strict mode, except an
object that declares none (``{"type": "object"}``): it holds any keys (any identifiers as arguments; Python
refuses a repeated keyword argument, which makes the list content). A value whose schema uses another
keyword (``pattern``, ``format``, ``$ref``, ``oneOf``, ``allOf``, ``uniqueItems``, ...) is constrained by
llguidance's JSON grammar of that schema and written as JSON, which the parser reads too (``true``,
``false``, ``null`` by name); only JSON's ``\\/`` and surrogate-pair escapes read differently in Python, so
such a tool is not ``exact`` (``strict`` is refused for it), nor is one whose top-level schema has keywords
beyond ``properties``, ``required`` and ``additionalProperties``.
"""

from __future__ import annotations

import json
import keyword
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import grammar

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Keywords that say nothing of the value (annotations): left out of the checks.
_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly"}
)
_ROOT_ONLY = frozenset({"$schema", "$id", "$defs", "definitions"})
_KEYWORDS = {
    "string": frozenset({"minLength", "maxLength"}),
    "integer": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}),
    "number": frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"}),
    "boolean": frozenset(),
    "null": frozenset(),
    "array": frozenset({"items", "minItems", "maxItems"}),
    "object": frozenset({"properties", "required", "additionalProperties"}),
}
# A Python string whose meaning JSON shares: no \u, \x, \N escapes (a lone surrogate cannot be sent on).
_PLAIN_DOUBLE = r'[^"\\\n\r]'
_PLAIN_SINGLE = r"[^'\\\n\r]"
_ESCAPE = r"""\\["'\\nrt]"""
_STRING = f'"({_PLAIN_DOUBLE}|{_ESCAPE})*"' + "|" + f"'({_PLAIN_SINGLE}|{_ESCAPE})*'"
_INTEGER = r"-?(0|[1-9][0-9]*)"
_NUMBER = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?"
_NAME = "[A-Za-z_][A-Za-z0-9_]*"
_KEYWORD_NAMES = "|".join(keyword.kwlist)

# What Python skips between the tokens inside brackets: whitespace, a comment, a line continuation.
_GAP = r"(\s|\x23[^\n]*\n|\\\n)"
#: The start of an answer the pythonic parser reads as a call list (a list whose first item is a call of a
#: name): ``[`` then, past gaps and parentheses, a dotted name and ``(``. A Lark regex body.
CALL_LIST_HEAD = rf"\s*\[({_GAP}|\()*{_NAME}({_GAP}*\.{_GAP}*{_NAME})*({_GAP}|\))*\("


def callable_name(name: str) -> bool:
    """Whether a tool of this name can be called in the pythonic format (an identifier, not a keyword)."""
    return _IDENTIFIER.fullmatch(name) is not None and not keyword.iskeyword(name)


def python_literal(value: Any) -> str:
    """A JSON value as a Python literal that reads back as the same value."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(python_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(k, ensure_ascii=False)}: {python_literal(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    return json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class Arguments:
    """The Lark rules of one call's arguments: ``expression`` (in rule bodies; ``""`` when the call takes
    none) over ``rules``; ``exact``: every value the grammar allows validates against the schema, read by the
    pythonic parser (see the module docstring)."""

    expression: str
    rules: tuple[str, ...]
    exact: bool


def arguments(schema: dict[str, Any], prefix: str) -> Arguments:
    """The keyword arguments (between the parentheses) of a call whose arguments object follows ``schema``
    (``tools[i].function.parameters``, checked by ``check_tools``); rules and terminals named ``prefix_*``."""
    values = _Values(prefix, schema)
    expression = values.arguments(schema)
    return Arguments(expression, tuple(values.rules), values.exact)


def callable_tool(name: str, schema: dict[str, Any]) -> bool:
    """Whether the tool can be called in the pythonic format: its name and its required arguments are
    identifiers (a property of another name can only be left out)."""
    required = schema.get("required", [])
    return callable_name(name) and all(isinstance(r, str) and callable_name(r) for r in required)


def _of_type(value: Any, types: Any) -> bool:
    """Whether a JSON value is of the schema's ``type`` (a name or a list of names; None: any)."""
    if types is None:
        return True
    names = [types] if isinstance(types, str) else types
    checks = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
        "array": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }
    return any(checks.get(name, lambda v: False)(value) for name in names)


def _either(this: str, other: str) -> str:
    """``this`` or ``other`` (``""``: nothing)."""
    return f"({this})?" if not other else f"({this} | {other})"


class _Values:
    """Builds the rules of one tool's arguments (one use)."""

    def __init__(self, prefix: str, root: dict[str, Any]) -> None:
        self.prefix = prefix
        self.rules: list[str] = []
        self.exact = True
        self._count = 0
        self._terminals: dict[str, str] = {}
        self._any: str | None = None
        # Definitions that $ref in a schema the JSON grammar takes over may point to.
        self._defs: dict[str, Any] = {k: root[k] for k in ("$defs", "definitions") if k in root}

    def _rule(self, body: str) -> str:
        name = f"{self.prefix}_{self._count}"
        self._count += 1
        self.rules.append(f"{name}: {body}")
        return name

    def _terminal(self, kind: str, body: str) -> str:
        """A terminal (one lexeme) of this tool's rules, defined once: ``body`` is its Lark definition."""
        name = self._terminals.get(kind)
        if name is None:
            name = f"{self.prefix.upper()}_{kind}"
            self.rules.append(f"{name}: {body}")
            self._terminals[kind] = name
        return name

    def _json(self, schema: dict[str, Any]) -> str:
        """A value of llguidance's JSON grammar of ``schema``."""
        body = {**schema, "x-guidance": grammar.JSON_OPTIONS}
        return self._rule(f"%json {json.dumps(body, ensure_ascii=False)}")

    def any(self) -> str:
        """Any Python literal of a JSON value."""
        if self._any is None:
            name = self._any = f"{self.prefix}_any"
            string = self._terminal("STR", f"/{_STRING}/")
            number = self._terminal("NUM", f"/{_NUMBER}/")
            pair = f'{string} ": " {name}'
            self.rules.append(
                f'{name}: {string} | {number} | "True" | "False" | "None" '
                f'| "[" ({name} (", " {name})*)? "]" | "{{" ({pair} (", " {pair})*)? "}}"'
            )
        return self._any

    def fallback(self, schema: Any) -> str:
        """A value whose schema the Python grammar does not follow: llguidance's JSON grammar of it, written
        as JSON (not ``exact``)."""
        self.exact = False
        body = dict(schema) if isinstance(schema, dict) else {"allOf": [schema]}
        return self._json({**body, **self._defs})

    def literals(self, values: list[Any]) -> str:
        texts = list(dict.fromkeys(python_literal(v) for v in values))
        return "(" + " | ".join(json.dumps(t, ensure_ascii=False) for t in texts) + ")"

    def value(self, schema: Any) -> str:
        """A Lark expression of the Python literals that follow ``schema``."""
        if schema is True:
            return self.any()
        if not isinstance(schema, dict):
            return self.fallback(schema)
        keys = set(schema) - _ANNOTATIONS
        types = schema.get("type")
        if "const" in keys or "enum" in keys:
            choices = [schema["const"]] if "const" in keys else schema["enum"]
            if keys - {"const", "enum", "type"} or not isinstance(choices, list):
                return self.fallback(schema)
            choices = [v for v in choices if _of_type(v, types)]
            return self.literals(choices) if choices else self.fallback(schema)
        if "anyOf" in keys:
            options = schema["anyOf"]
            if keys != {"anyOf"} or not isinstance(options, list) or not options:
                return self.fallback(schema)
            return "(" + " | ".join(self.value(option) for option in options) + ")"
        if types is None:
            return self.any() if not keys else self.fallback(schema)
        names = [types] if isinstance(types, str) else types
        if not isinstance(names, list) or not names or any(n not in _KEYWORDS for n in names):
            return self.fallback(schema)
        if keys - frozenset({"type"}).union(*(_KEYWORDS[n] for n in names)):
            return self.fallback(schema)
        options = [self._typed(n, schema) for n in dict.fromkeys(names)]
        return options[0] if len(options) == 1 else "(" + " | ".join(options) + ")"

    def _typed(self, name: str, schema: dict[str, Any]) -> str:
        own = {k: v for k, v in schema.items() if k in _KEYWORDS[name]}
        if name == "string":
            return self._string(schema, own)
        if name in ("integer", "number"):
            if own:  # JSON's numbers are Python's: exact
                return self._json({"type": name, **own})
            if name == "integer":
                return self._terminal("INT", f"/{_INTEGER}/")
            return self._terminal("NUM", f"/{_NUMBER}/")
        if name == "boolean":
            return '("True" | "False")'
        if name == "null":
            return '"None"'
        if name == "array":
            return self._array(schema, own)
        return self._object(schema, own)

    def _string(self, schema: dict[str, Any], own: dict[str, Any]) -> str:
        if not own:
            return self._terminal("STR", f"/{_STRING}/")
        least, most = _bounds(own, "minLength", "maxLength")
        if least is None:
            return self.fallback(schema)
        bound = f"{{{least},{'' if most is None else most}}}"
        return self._rule(f"/\"{_PLAIN_DOUBLE}{bound}\"|'{_PLAIN_SINGLE}{bound}'/")

    def _array(self, schema: dict[str, Any], own: dict[str, Any]) -> str:
        items = own.get("items", True)
        least, most = _bounds(own, "minItems", "maxItems")
        if least is None or isinstance(items, list):
            return self.fallback(schema)
        if most == 0:
            return '"[" "]"'
        item = self.value(items)
        rest_least, rest_most = max(least - 1, 0), None if most is None else most - 1
        if rest_most == 0:
            listed = item
        elif rest_least == 0 and rest_most is None:
            listed = f'{item} (", " {item})*'
        else:
            listed = f'{item} (", " {item}){{{rest_least},{"" if rest_most is None else rest_most}}}'
        return self._rule(f'"[" ({listed})? "]"' if least == 0 else f'"[" {listed} "]"')

    def _object(self, schema: dict[str, Any], own: dict[str, Any]) -> str:
        members = self._members(own, lambda key: json.dumps(json.dumps(key, ensure_ascii=False) + ": "))
        if members is None:
            return self.fallback(schema)
        extra = own.get("additionalProperties", True)
        if not own.get("properties") and not own.get("required") and extra is not False:
            pair = f'{self._terminal("STR", f"/{_STRING}/")} ": " {self.value(extra)}'
            return self._rule(f'"{{" ({pair} (", " {pair})*)? "}}"')
        return self._rule(f'"{{" {self._sequence(members)} "}}"')

    def arguments(self, schema: dict[str, Any]) -> str:
        """The keyword arguments of the top-level schema (an object's: ``check_tools`` saw to it)."""
        if set(schema) - _ANNOTATIONS - _ROOT_ONLY - _KEYWORDS["object"] - {"type"}:
            self.exact = False  # a keyword on the whole object (allOf, minProperties, ...): not enforced
        members = self._members(schema, lambda key: json.dumps(f"{key}="), identifiers=True)
        if members is None:
            self.exact = False
            return ""
        extra = schema.get("additionalProperties", True)
        if not schema.get("properties") and not schema.get("required") and extra is not False:
            word = self._terminal("KW", f"/{_NAME}/ & ~/({_KEYWORD_NAMES})/")
            kwarg = f'{word} "=" {self.value(extra)}'
            return self._rule(f'({kwarg} (", " {kwarg})*)?')
        return self._sequence(members)

    def _members(
        self, schema: dict[str, Any], head: Callable[[str], str], identifiers: bool = False
    ) -> list[tuple[str, bool]] | None:
        """``(expression, required)`` of each declared property in order (``head(key)``: the Lark literal
        before its value), then the required ones not declared; None: malformed. ``identifiers``: keys must
        be identifiers (keyword arguments): the others are left out (a required one: ``callable_tool``)."""
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(properties, dict) or not isinstance(required, list):
            return None
        keys = list(properties) + [r for r in required if isinstance(r, str) and r not in properties]
        members = []
        for key in keys:
            if identifiers and not callable_name(key):
                continue
            members.append((f"{head(key)} {self.value(properties.get(key, True))}", key in required))
        return members

    def _sequence(self, members: list[tuple[str, bool]]) -> str:
        """The members in order, ``", "`` between those written; an optional one may be left out. Built
        from the end: ``first`` the rest when nothing precedes it, ``more`` when something does."""
        first, more = "", ""
        for i in range(len(members) - 1, -1, -1):
            expression, required = members[i]
            this = f"{expression} {more}".strip()
            if not required:
                this = _either(this, first)
            if i == 0:
                return self._rule(this)
            after = f'", " {expression} {more}'.strip()
            if not required:
                after = _either(after, more)
            # the previous member needs "first" only when it may be left out
            first = self._rule(this) if not members[i - 1][1] else ""
            more = self._rule(after)
        return ""


def _bounds(own: dict[str, Any], low: str, high: str) -> tuple[int | None, int | None]:
    """``(least, most)`` of a length keyword pair (``most`` None: unbounded); ``(None, None)`` when they are
    not counts or contradict each other."""
    least, most = own.get(low, 0), own.get(high)
    if not _count(least) or (most is not None and (not _count(most) or most < least)):
        return None, None
    return least, most


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
