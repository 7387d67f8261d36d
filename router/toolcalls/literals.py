"""Python literals read with ``ast`` (never evaluated), as JSON values."""

from __future__ import annotations

import ast
from typing import Any

from .base import CallError

_JSON_NAMES: dict[str, Any] = {"true": True, "false": False, "null": None, "none": None}


def literal(node: ast.expr) -> Any:
    if isinstance(node, ast.Constant):
        if isinstance(node.value, (str, bool, int, float)) or node.value is None:
            return node.value
        raise CallError(f"unsupported literal {node.value!r}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = literal(node.operand)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CallError("a sign before a non-number")
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        out: dict[str, Any] = {}
        for key, value in zip(node.keys, node.values, strict=True):
            if key is None:
                raise CallError("** in a dict")
            k = literal(key)
            if not isinstance(k, str):
                raise CallError("a dict key that is not a string")
            out[k] = literal(value)
        return out
    if isinstance(node, ast.Name) and node.id.lower() in _JSON_NAMES:
        return _JSON_NAMES[node.id.lower()]
    raise CallError(f"not a literal: {type(node).__name__}")


def python_literal(source: str) -> Any:
    """The JSON value of a Python literal expression (``{'a': [1, True, None]}``); CallError otherwise."""
    try:
        return literal(ast.parse(source.strip(), mode="eval").body)
    except CallError:
        raise
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CallError(str(e)) from e
