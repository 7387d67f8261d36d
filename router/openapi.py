"""The OpenAPI document of the HTTP API, and the Swagger UI page that shows it at /docs.

The TGI routes and the document's own are described here; the OpenAI, Responses and Anthropic Messages
routes in router/openapi_paths.py. Every route the app serves is in the document (a unit test checks it),
except the /docs page's own static files (``/docs/...``), which are not part of the API.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from . import __version__
from .openapi_paths import PATHS as API_PATHS
from .openapi_paths import SCHEMAS as API_SCHEMAS
from .openapi_paths import json_content as _json
from .openapi_paths import ref as _ref

ERRORS = {
    "422": _json(_ref("ErrorResponse"), "Input validation error"),
    "424": _json(_ref("ErrorResponse"), "Generation error"),
    "429": _json(_ref("ErrorResponse"), "Model is overloaded"),
    "503": _json(_ref("ErrorResponse"), "Model is not ready"),
}

SCHEMAS: dict[str, Any] = {
    "GenerateParameters": {
        "type": "object",
        "properties": {
            "best_of": {"type": "integer", "minimum": 1, "nullable": True},
            "cache_salt": {"type": "string", "minLength": 1, "maxLength": 256, "nullable": True},
            "decoder_input_details": {"type": "boolean", "default": False},
            "details": {"type": "boolean", "default": False},
            "do_sample": {"type": "boolean", "default": False},
            "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2, "nullable": True},
            "max_new_tokens": {"type": "integer", "minimum": 1, "default": 20},
            "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "nullable": True},
            "return_full_text": {"type": "boolean", "nullable": True},
            "seed": {"type": "integer", "minimum": 0, "nullable": True},
            "stop": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            "temperature": {"type": "number", "exclusiveMinimum": 0, "nullable": True},
            "top_k": {"type": "integer", "exclusiveMinimum": 0, "nullable": True},
            "top_n_tokens": {"type": "integer", "minimum": 0, "maximum": 5, "nullable": True},
            "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "nullable": True},
            "truncate": {"type": "integer", "nullable": True},
            "typical_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "nullable": True},
            "watermark": {"type": "boolean", "default": False},
        },
    },
    "GenerateRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {"inputs": {"type": "string"}, "parameters": _ref("GenerateParameters")},
    },
    "CompatGenerateRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "inputs": {"type": "string"},
            "parameters": _ref("GenerateParameters"),
            "stream": {"type": "boolean", "default": False},
        },
    },
    "Token": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "text": {"type": "string"},
            "logprob": {"type": "number", "nullable": True},
            "special": {"type": "boolean"},
        },
    },
    "Details": {
        "type": "object",
        "properties": {
            "finish_reason": {"type": "string", "enum": ["length", "eos_token", "stop_sequence"]},
            "generated_tokens": {"type": "integer"},
            "seed": {"type": "integer", "nullable": True},
            "prefill": {"type": "array", "items": _ref("Token")},
            "tokens": {"type": "array", "items": _ref("Token")},
            "top_tokens": {"type": "array", "items": {"type": "array", "items": _ref("Token")}},
            "best_of_sequences": {"type": "array", "items": {"type": "object"}},
        },
    },
    "GenerateResponse": {
        "type": "object",
        "properties": {"generated_text": {"type": "string"}, "details": _ref("Details")},
    },
    "StreamResponse": {
        "type": "object",
        "properties": {
            "index": {"type": "integer"},
            "token": _ref("Token"),
            "top_tokens": {"type": "array", "items": _ref("Token")},
            "generated_text": {"type": "string", "nullable": True},
            "details": {"type": "object", "nullable": True},
        },
    },
    "Info": {"type": "object", "additionalProperties": True},
    "ErrorResponse": {
        "type": "object",
        "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
    },
}


def openapi_document() -> dict[str, Any]:
    gen_body = {"required": True, "content": {"application/json": {"schema": _ref("GenerateRequest")}}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Text Generation Inference",
            "version": __version__,
            "license": {"name": "Apache-2.0"},
        },
        "paths": {
            "/generate": {
                "post": {
                    "summary": "Generate tokens",
                    "requestBody": gen_body,
                    "responses": {"200": _json(_ref("GenerateResponse"), "Generated text"), **ERRORS},
                }
            },
            "/generate_stream": {
                "post": {
                    "summary": "Generate a stream of tokens (Server-Sent Events)",
                    "requestBody": gen_body,
                    "responses": {
                        "200": {
                            "description": "One event per token",
                            "content": {"text/event-stream": {"schema": _ref("StreamResponse")}},
                        },
                        **ERRORS,
                    },
                }
            },
            "/": {
                "post": {
                    "summary": "Compat route: /generate (JSON array) or /generate_stream by `stream`",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("CompatGenerateRequest")}},
                    },
                    "responses": {
                        "200": _json({"type": "array", "items": _ref("GenerateResponse")}, "Generated text"),
                        **ERRORS,
                    },
                }
            },
            "/info": {
                "get": {"summary": "Model and router info", "responses": {"200": _json(_ref("Info"), "Info")}}
            },
            "/health": {
                "get": {
                    "summary": "Health: 200 once the model is loaded and the shards answer",
                    "responses": {"200": {"description": "Healthy"}, "503": ERRORS["503"]},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            **API_PATHS,
            **{
                path: {"get": {"summary": "This document", "responses": {"200": _json(_OBJECT, "OpenAPI 3")}}}
                for path in ("/openapi.json", "/api-doc/openapi.json")
            },
            "/docs": {"get": {"summary": "Swagger UI of this document", "responses": {"200": _HTML}}},
        },
        "components": {"schemas": {**SCHEMAS, **API_SCHEMAS}},
    }


_OBJECT = {"type": "object"}
_HTML = {"description": "The page", "content": {"text/html": {"schema": {"type": "string"}}}}


# The Swagger UI page, with its script and style served by the router itself (``docs_asset``): /docs works
# without reaching any other host. The assets come from the swagger-ui-bundle package (Swagger UI,
# Apache-2.0), a dependency of this one.
DOCS_ASSETS_PATH = "/docs/assets"
DOCS_ASSETS = {"swagger-ui.css": "text/css", "swagger-ui-bundle.js": "text/javascript"}
SWAGGER_UI = f"""<!doctype html>
<html>
<head>
  <meta charset="utf-8"><title>Text Generation Inference API</title>
  <link rel="stylesheet" href="{DOCS_ASSETS_PATH}/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{DOCS_ASSETS_PATH}/swagger-ui-bundle.js"></script>
  <script>window.ui = SwaggerUIBundle({{url: "/openapi.json", dom_id: "#swagger-ui"}});</script>
  <noscript>The API description is at <a href="/openapi.json">/openapi.json</a>.</noscript>
</body>
</html>
"""


@functools.cache
def docs_asset(name: str) -> tuple[bytes, str]:
    """One of the /docs page's assets (a name in DOCS_ASSETS): its bytes and content type."""
    from swagger_ui_bundle import swagger_ui_path

    return (Path(swagger_ui_path) / name).read_bytes(), DOCS_ASSETS[name]
