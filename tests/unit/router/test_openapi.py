"""router/openapi.py: the OpenAPI document describes every route the app serves (each method; the /docs
page's static files apart), its references resolve, and its path parameters are declared."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from router.app import create_app
from router.config import RouterConfig
from router.openapi import openapi_document

pytestmark = pytest.mark.timeout(30)

METHODS = ("get", "post", "put", "patch", "delete")


def served_routes() -> set[tuple[str, str]]:
    """(path, method) of every API route the app registers (aiohttp's automatic HEAD of a GET and the /docs
    page's static files left out)."""
    app = create_app(RouterConfig(tokenizer_name="t", model_id="t"))
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info["formatter"]
        if not path.startswith("/docs/"):
            routes.add((path, route.method.lower()))
    return routes


def test_every_served_route_is_documented() -> None:
    document = openapi_document()
    documented = {
        (path, method) for path, item in document["paths"].items() for method in item if method in METHODS
    }
    served = served_routes()
    assert ("/v1/responses/{response_id}/input_items", "get") in served  # the routes are really read
    assert served - documented == set()


def test_references_resolve_and_path_parameters_are_declared() -> None:
    document = openapi_document()
    schemas = document["components"]["schemas"]
    refs = re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(document))
    assert refs and set(refs) <= set(schemas)
    for path, item in document["paths"].items():
        for method in (m for m in item if m in METHODS):
            declared = {p["name"] for p in [*item.get("parameters", []), *item[method].get("parameters", [])]
                        if p["in"] == "path"}  # fmt: skip
            assert declared == set(re.findall(r"\{(\w+)\}", path)), (path, method)
            assert item[method]["summary"] and item[method]["responses"], (path, method)


def test_the_chat_route_documents_its_tool_fields() -> None:
    document = openapi_document()
    chat = document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for name in ("tools", "tool_choice", "parallel_tool_calls", "response_format", "reasoning_effort",
                 "chat_template_kwargs", "stream_options"):  # fmt: skip
        assert name in chat
    body: dict[str, Any] = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
