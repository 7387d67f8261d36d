"""Constrained decoding requests -> the ``grammar`` processor's canonical argument (common/grammar.py).

Two spellings reach here:

- TGI's ``parameters.grammar``: ``{"type": "json", "value": <schema object, or its JSON text>}``,
  ``{"type": "json_schema", "value": {"name": ..., "schema": <schema>}}``, ``{"type": "regex", "value":
  "<pattern>"}``; TGI's alias ``json_object`` is ``json`` (any JSON object when it has no value).
- OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}`` (any JSON
  object), ``{"type": "json_schema", "json_schema": {"name", "description"?, "schema"?, "strict"?}}``. The
  output follows the schema whatever ``strict`` says; a schema with a feature the compiler does not
  implement is refused rather than half-enforced.

Each constraint is compiled once (common/grammar.check, cached) so that a bad schema or pattern is a
4xx naming the field, never a failure on the shard.
"""

from __future__ import annotations

import json
import re
from typing import Any

from common import grammar

from .errors import ValidationError

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _checked(argument: str, field: str) -> str:
    problem = grammar.check(argument)
    if problem:
        raise ValidationError(f"`{field}` is not valid: {problem}", field)
    return argument


def _schema(value: Any, field: str, what: str) -> dict[str, Any]:
    """A JSON schema given as an object or as the JSON text of one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise ValidationError(f"`{field}` {what} is not valid JSON: {e}", field) from None
    if not isinstance(value, dict):
        raise ValidationError(f"`{field}` {what} must be a JSON schema object", field)
    return value


def from_tgi(value: object) -> str | None:
    """TGI's ``parameters.grammar`` -> canonical argument (None when absent)."""
    if value is None:
        return None
    field = "grammar"
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValidationError(
            '`grammar` must be an object {"type": "json" | "json_schema" | "regex", "value": ...}', field
        )
    unknown = sorted(set(value) - {"type", "value"})
    if unknown:
        raise ValidationError(f"`grammar` has an unknown field `{unknown[0]}`", field)
    kind, body = value["type"], value.get("value")
    if kind == "regex":
        if not isinstance(body, str) or not body:
            raise ValidationError(
                "`grammar` of type regex needs a non-empty pattern string as `value`", field
            )
        return _checked(grammar.canonical("regex", body), field)
    if kind in ("json", "json_object"):
        if body is None and kind == "json_object":
            return _checked(grammar.canonical("json_object"), field)
        return _checked(grammar.canonical("json", _schema(body, field, "`value`")), field)
    if kind == "json_schema":
        if not isinstance(body, dict) or "schema" not in body:
            raise ValidationError('`grammar` of type json_schema needs `value` {"name", "schema"}', field)
        return _checked(grammar.canonical("json", _schema(body["schema"], field, "`value.schema`")), field)
    raise ValidationError(
        f"`grammar` type must be one of json, json_schema, regex. Given: {json.dumps(kind)[:40]}", field
    )


def from_response_format(value: object) -> str | None:
    """OpenAI's ``response_format`` -> canonical argument (None for text or absent)."""
    field = "response_format"
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValidationError(
            '`response_format` must be an object {"type": "text" | "json_object" | "json_schema"}', field
        )
    kind = value["type"]
    allowed = {"text": {"type"}, "json_object": {"type", "schema"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise ValidationError(
            f"`response_format` type must be text, json_object or json_schema. Given: {json.dumps(kind)[:40]}",
            field,
        )
    unknown = sorted(set(value) - allowed[kind])
    if unknown:
        raise ValidationError(f"`response_format` of type {kind} has an unknown field `{unknown[0]}`", field)
    if kind == "text":
        return None
    if kind == "json_object":
        schema = value.get("schema")  # llama.cpp's extension: a json_object with a schema
        if schema is None:
            return _checked(grammar.canonical("json_object"), field)
        return _checked(grammar.canonical("json", _schema(schema, field, "`schema`")), field)
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ValidationError(
            "`response_format.json_schema` must be an object with `name` and `schema`", field
        )
    unknown = sorted(set(spec) - {"name", "description", "schema", "strict"})
    if unknown:
        raise ValidationError(f"`response_format.json_schema` has an unknown field `{unknown[0]}`", field)
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValidationError(
            "`response_format.json_schema.name` must be 1 to 64 letters, digits, underscores or dashes", field
        )
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise ValidationError("`response_format.json_schema.description` must be a string", field)
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise ValidationError("`response_format.json_schema.strict` must be a boolean", field)
    schema = spec.get("schema")
    if schema is None:
        return _checked(grammar.canonical("json_object"), field)
    return _checked(grammar.canonical("json", _schema(schema, field, "`json_schema.schema`")), field)
