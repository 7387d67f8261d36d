"""The ``grammar`` processor's argument, shared by the router (which writes and checks it) and the shard
(which compiles it): one canonical JSON string per constraint.

Canonical forms (compact JSON, the schema's own key order kept: it is the order of the generated keys):

- ``{"type": "json", "value": <JSON schema object>}``: output is JSON that validates against the schema;
- ``{"type": "json_object"}``: output is any JSON object (OpenAI's ``response_format: json_object``);
- ``{"type": "regex", "value": "<pattern>"}``: the whole output matches the pattern;
- ``{"type": "lark", "value": "<grammar>"}``: llguidance's Lark grammar, written by the router only (forced
  tool calls and constraints after reasoning, router/agent.py); its ``%json`` schemas carry
  ``JSON_OPTIONS`` under ``x-guidance`` themselves.

Constraints are compiled by llguidance (https://github.com/guidance-ai/llguidance). JSON is generated
without free whitespace (``", "`` between items and ``": "`` after keys): a model cannot pad its answer
with endless blanks, and the text still reads like ordinary JSON.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # a TypedDict of llguidance's type stubs only

KINDS = ("json", "json_object", "regex", "lark")
# llguidance's JSON compile options, forced over any "x-guidance" key of a schema.
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


class GrammarError(ValueError):
    """A constraint that is malformed or that llguidance cannot compile."""


def canonical(kind: str, value: Any = None) -> str:
    """The argument string for a constraint (not checked: see ``check``)."""
    body: dict[str, Any] = {"type": kind}
    if kind != "json_object":
        body["value"] = value
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def parse(argument: str) -> tuple[str, Any]:
    """(kind, value) of a canonical argument; GrammarError when it is not one."""
    try:
        body = json.loads(argument)
    except (TypeError, ValueError) as e:
        raise GrammarError(f"the grammar argument is not JSON: {e}") from None
    if not isinstance(body, dict) or body.get("type") not in KINDS:
        raise GrammarError(f"the grammar argument must be an object with `type` one of {', '.join(KINDS)}")
    kind, value = body["type"], body.get("value")
    if kind == "json" and not isinstance(value, dict):
        raise GrammarError("a `json` grammar's `value` must be a JSON schema object")
    if kind in ("regex", "lark") and not isinstance(value, str):
        raise GrammarError(f"a `{kind}` grammar's `value` must be a string")
    return kind, value


def to_llguidance(argument: str) -> str:
    """The llguidance grammar of a canonical argument (GrammarError when malformed; compiling it is what
    finds an unsupported schema or a bad pattern)."""
    import llguidance

    kind, value = parse(argument)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(value)
    schema = value if kind == "json" else {"type": "object"}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(schema, ensure_ascii=False), overrides=JSON_OPTIONS
        )
    except ValueError as e:
        raise GrammarError(str(e)) from None


@functools.lru_cache(maxsize=256)
def check(argument: str) -> str:
    """'' when llguidance compiles the constraint, else why not (cached: clients repeat their schemas).

    The check needs no tokenizer: it compiles the grammar itself (schema features, regular expressions),
    which is what can fail; the shard compiles it again against the model's vocabulary."""
    import llguidance

    try:
        grammar = to_llguidance(argument)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    except Exception as e:  # malformed input of any kind is the client's error, never a crash
        return str(e) or type(e).__name__
    return (messages[0] if messages else "invalid grammar") if failed else ""
