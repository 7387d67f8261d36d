"""The OpenAPI description of the OpenAI, Responses and Anthropic Messages routes and the other routes
that are not TGI's (router/openapi.py adds them to its document).

Request bodies list their fields (each honoured or refused with a 400 naming it, as the README says);
response bodies are described in outline: the APIs' own references (OpenAI's, Anthropic's) hold the
complete shapes, which these routes follow.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]


def ref(name: str) -> Schema:
    """A reference to a schema of the document's components."""
    return {"$ref": f"#/components/schemas/{name}"}


def json_content(schema: Schema, description: str) -> Schema:
    """A JSON response (or body) of ``schema``."""
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(schema: Schema) -> Schema:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _object(properties: dict[str, Schema], required: tuple[str, ...] = ()) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


def _text(description: str) -> Schema:
    return {"type": "string", "description": description}


_ANY_OBJECT: Schema = {"type": "object", "additionalProperties": True}
_STRINGS: Schema = {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}

# The error envelopes: OpenAI's (chat, completions, Responses, /tokenize) and Anthropic's (Messages).
OPENAI_ERROR = ref("OpenAIError")
ANTHROPIC_ERROR = ref("AnthropicError")


def _errors(schema: Schema, not_found: bool = False) -> dict[str, Schema]:
    out = {
        "400": json_content(schema, "Bad input (the error names the field)"),
        "429": json_content(schema, "The server is full (Retry-After)"),
        "503": json_content(schema, "The model is loading, or the server is draining"),
    }
    if not_found:
        out["404"] = json_content(schema, "No stored response with this id")
    return out


_SAMPLING: dict[str, Schema] = {
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1, "description": "vLLM's extension; -1 or 0: off"},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0},
    "seed": {"type": "integer", "minimum": 0},
    "stop": _STRINGS,
    "stop_token_ids": {"type": "array", "items": {"type": "integer"}},
    "max_tokens": {"type": "integer", "minimum": 1},
    "min_tokens": {"type": "integer", "minimum": 0},
    "n": {"type": "integer", "minimum": 1},
    "logit_bias": {"type": "object", "additionalProperties": {"type": "number"}},
    "ignore_eos": {"type": "boolean"},
    "skip_special_tokens": {"type": "boolean"},
    "cache_salt": {"type": "string", "minLength": 1, "maxLength": 256},
    "stream": {"type": "boolean", "default": False},
    "stream_options": _object(
        {"include_usage": {"type": "boolean"}, "continuous_usage_stats": {"type": "boolean"}}
    ),
    "user": {"type": "string"},
    "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
    "service_tier": {"type": "string", "enum": ["auto", "default"]},
    "store": {"type": "boolean"},
}
_FUNCTION: Schema = _object(
    {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
        "description": {"type": "string"},
        "parameters": {"type": "object", "description": "The JSON schema of the arguments object"},
        "strict": {"type": "boolean"},
    },
    ("name",),
)
_RESPONSE_FORMAT: Schema = {
    "type": "object",
    "description": '{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema", '
    '"strict"}}: the content follows it by constrained decoding',
    "properties": {"type": {"type": "string", "enum": ["text", "json_object", "json_schema"]}},
    "required": ["type"],
}

SCHEMAS: dict[str, Schema] = {
    "OpenAIError": _object(
        {
            "error": _object(
                {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": "string", "nullable": True},
                    "code": {"type": "string", "nullable": True},
                }
            )
        }
    ),
    "AnthropicError": _object(
        {
            "type": {"type": "string", "enum": ["error"]},
            "error": _object({"type": {"type": "string"}, "message": {"type": "string"}}),
        }
    ),
    "ChatMessage": _object(
        {
            "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {
                "description": "A string, or text parts",
                "oneOf": [{"type": "string"}, {"type": "array", "items": _ANY_OBJECT}],
                "nullable": True,
            },
            "name": {"type": "string"},
            "tool_calls": {
                "type": "array",
                "items": _object(
                    {
                        "id": {"type": "string"},
                        "type": {"type": "string", "enum": ["function"]},
                        "function": _object({"name": {"type": "string"}, "arguments": {"type": "string"}}),
                    }
                ),
            },
            "tool_call_id": {"type": "string", "description": "The call a `tool` message answers"},
            "reasoning_content": {"type": "string"},
        },
        ("role",),
    ),
    "ChatCompletionRequest": _object(
        {
            "model": {"type": "string", "description": "Any name is served by the one model"},
            "messages": {"type": "array", "items": ref("ChatMessage"), "minItems": 1},
            **_SAMPLING,
            "max_completion_tokens": {"type": "integer", "minimum": 1},
            "logprobs": {"type": "boolean"},
            "top_logprobs": {"type": "integer", "minimum": 0},
            "response_format": _RESPONSE_FORMAT,
            "tools": {
                "type": "array",
                "items": _object(
                    {"type": {"type": "string", "enum": ["function"]}, "function": _FUNCTION},
                    ("type", "function"),
                ),
            },
            "tool_choice": {
                "description": '"none", "auto" (lazily constrained), "required", or {"type": "function", '
                '"function": {"name"}}; required and named calls are forced by constrained decoding',
                "oneOf": [{"type": "string", "enum": ["none", "auto", "required"]}, _ANY_OBJECT],
            },
            "parallel_tool_calls": {"type": "boolean", "default": True},
            "reasoning_effort": {"type": "string", "description": "Passed to the chat template"},
            "chat_template_kwargs": _ANY_OBJECT,
            "add_generation_prompt": {"type": "boolean", "default": True},
            "continue_final_message": {"type": "boolean", "default": False},
            "modalities": {"type": "array", "items": {"type": "string", "enum": ["text"]}},
        },
        ("messages",),
    ),
    "ChatCompletion": _object(
        {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["chat.completion"]},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "items": _object(
                    {
                        "index": {"type": "integer"},
                        "message": ref("ChatMessage"),
                        "finish_reason": {"type": "string", "enum": ["stop", "length", "tool_calls"]},
                        "logprobs": {"type": "object", "nullable": True},
                    }
                ),
            },
            "usage": ref("Usage"),
        }
    ),
    "Usage": _object(
        {
            "prompt_tokens": {"type": "integer"},
            "completion_tokens": {"type": "integer"},
            "total_tokens": {"type": "integer"},
        }
    ),
    "CompletionRequest": _object(
        {
            "model": {"type": "string"},
            "prompt": {
                "oneOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}},
                    {"type": "array", "items": {"type": "integer"}},
                ]
            },
            **_SAMPLING,
            "echo": {"type": "boolean"},
            "logprobs": {"type": "integer", "minimum": 0},
            "best_of": {"type": "integer", "minimum": 1},
            "suffix": {"type": "string", "nullable": True},
            "response_format": _RESPONSE_FORMAT,
        },
        ("prompt",),
    ),
    "Completion": _object(
        {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["text_completion"]},
            "choices": {"type": "array", "items": _ANY_OBJECT},
            "usage": ref("Usage"),
        }
    ),
    "ModelList": _object(
        {
            "object": {"type": "string", "enum": ["list"]},
            "data": {
                "type": "array",
                "items": _object(
                    {
                        "id": {"type": "string"},
                        "object": {"type": "string", "enum": ["model"]},
                        "created": {"type": "integer"},
                        "owned_by": {"type": "string"},
                        "root": {"type": "string"},
                        "max_model_len": {"type": "integer"},
                    }
                ),
            },
        }
    ),
    "LoadLoraAdapterRequest": _object(
        {"lora_name": {"type": "string"}, "lora_path": _text("The adapter's local PEFT directory")},
        ("lora_name", "lora_path"),
    ),
    "UnloadLoraAdapterRequest": _object({"lora_name": {"type": "string"}}, ("lora_name",)),
    "TokenizeRequest": _object(
        {
            "model": {"type": "string"},
            "prompt": {"type": "string"},
            "messages": {"type": "array", "items": ref("ChatMessage")},
            "add_special_tokens": {"type": "boolean", "default": True},
            "add_generation_prompt": {"type": "boolean", "default": True},
            "continue_final_message": {"type": "boolean", "default": False},
        }
    ),
    "TokenizeResponse": _ANY_OBJECT,
    "ResponseRequest": _object(
        {
            "model": {"type": "string"},
            "input": {
                "description": "A string (one user message) or input items: messages, function_call, "
                "function_call_output, reasoning",
                "oneOf": [{"type": "string"}, {"type": "array", "items": _ANY_OBJECT, "minItems": 1}],
            },
            "instructions": {"type": "string"},
            "previous_response_id": {"type": "string"},
            "max_output_tokens": {"type": "integer", "minimum": 1},
            "temperature": _SAMPLING["temperature"],
            "top_p": _SAMPLING["top_p"],
            "stream": {"type": "boolean", "default": False},
            "store": {"type": "boolean", "default": True},
            "tools": {
                "type": "array",
                "items": {"allOf": [_FUNCTION, _object({"type": {"type": "string", "enum": ["function"]}})]},
            },
            "tool_choice": {"oneOf": [{"type": "string", "enum": ["none", "auto", "required"]}, _ANY_OBJECT]},
            "parallel_tool_calls": {"type": "boolean", "default": True},
            "max_tool_calls": {"type": "integer", "minimum": 1},
            "text": _object({"format": _ANY_OBJECT, "verbosity": {"type": "string", "enum": ["medium"]}}),
            "reasoning": _object({"effort": {"type": "string"}, "summary": {"type": "string"}}),
            "metadata": _SAMPLING["metadata"],
            "user": {"type": "string"},
            "safety_identifier": {"type": "string"},
            "service_tier": {"type": "string"},
            "prompt_cache_key": {"type": "string"},
            "include": {"type": "array", "maxItems": 0},
            "truncation": {"type": "string", "enum": ["disabled"]},
            "background": {"type": "boolean", "enum": [False]},
            "top_logprobs": {"type": "integer", "enum": [0]},
            "stream_options": _object({"include_obfuscation": {"type": "boolean", "enum": [False]}}),
        },
        ("input",),
    ),
    "Response": _object(
        {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["response"]},
            "created_at": {"type": "integer"},
            "status": {"type": "string", "enum": ["completed", "incomplete"]},
            "output": {"type": "array", "items": _ANY_OBJECT},
            "usage": _ANY_OBJECT,
        }
    ),
    "ResponseItemList": _object(
        {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": _ANY_OBJECT},
            "first_id": {"type": "string", "nullable": True},
            "last_id": {"type": "string", "nullable": True},
            "has_more": {"type": "boolean"},
        }
    ),
    "DeletedResponse": _object(
        {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["response"]},
            "deleted": {"type": "boolean"},
        }
    ),
    "MessagesRequest": _object(
        {
            "model": {"type": "string"},
            "messages": {"type": "array", "items": _ANY_OBJECT, "minItems": 1},
            "system": {"oneOf": [{"type": "string"}, {"type": "array", "items": _ANY_OBJECT}]},
            "max_tokens": {"type": "integer", "minimum": 1},
            "stop_sequences": {"type": "array", "items": {"type": "string"}},
            "temperature": {"type": "number", "minimum": 0, "maximum": 1},
            "top_p": {"type": "number"},
            "top_k": {"type": "integer"},
            "stream": {"type": "boolean", "default": False},
            "tools": {"type": "array", "items": _ANY_OBJECT},
            "tool_choice": _ANY_OBJECT,
            "thinking": _ANY_OBJECT,
            "output_config": _ANY_OBJECT,
            "metadata": _object({"user_id": {"type": "string"}}),
            "service_tier": {"type": "string", "enum": ["auto", "standard_only"]},
            "cache_control": _ANY_OBJECT,
        },
        ("model", "messages", "max_tokens"),
    ),
    "Message": _object(
        {
            "id": {"type": "string"},
            "type": {"type": "string", "enum": ["message"]},
            "role": {"type": "string", "enum": ["assistant"]},
            "content": {"type": "array", "items": _ANY_OBJECT},
            "stop_reason": {"type": "string"},
            "stop_sequence": {"type": "string", "nullable": True},
            "usage": _ANY_OBJECT,
        }
    ),
    "CountTokensRequest": _object(
        {
            "model": {"type": "string"},
            "messages": {"type": "array", "items": _ANY_OBJECT},
            "system": {"oneOf": [{"type": "string"}, {"type": "array", "items": _ANY_OBJECT}]},
            "tools": {"type": "array", "items": _ANY_OBJECT},
            "tool_choice": _ANY_OBJECT,
            "thinking": _ANY_OBJECT,
        },
        ("model", "messages"),
    ),
}


def _sse_or_json(schema: Schema, what: str) -> Schema:
    return {
        "description": f"{what} (JSON), or Server-Sent Events with `stream: true`",
        "content": {
            "application/json": {"schema": schema},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }


def _operation(
    summary: str,
    ok: Schema | None,
    errors: Schema | None = None,
    body: str | None = None,
    not_found: bool = False,
) -> Schema:
    """One operation: its summary, request body (a schema's name), 200 answer and error answers."""
    responses = {"200": ok} if ok is not None else {}
    if errors is not None:
        responses.update(_errors(errors, not_found))
    operation: Schema = {"summary": summary, "responses": responses}
    if body is not None:
        operation["requestBody"] = _body(ref(body))
    return operation


def _lora_update(summary: str, done: str, body: str) -> Schema:
    """vLLM's runtime LoRA routes (--enable-lora-runtime-updates): a text answer, OpenAI's errors."""
    ok = {"description": done, "content": {"text/plain": {"schema": {"type": "string"}}}}
    return _operation(
        f"{summary} (vLLM's; --enable-lora-runtime-updates)", ok, OPENAI_ERROR, body, not_found=True
    )


def _chat_paths(prefix: str) -> dict[str, Schema]:
    chat = _sse_or_json(ref("ChatCompletion"), "The completion")
    completion = _sse_or_json(ref("Completion"), "The completion")
    return {
        f"{prefix}/chat/completions": {
            "post": _operation(
                "OpenAI chat completions, with tools and reasoning",
                chat,
                OPENAI_ERROR,
                "ChatCompletionRequest",
            )
        },
        f"{prefix}/completions": {
            "post": _operation("OpenAI completions", completion, OPENAI_ERROR, "CompletionRequest")
        },
    }


def _query(name: str, schema: Schema, description: str | None = None) -> Schema:
    parameter: Schema = {"name": name, "in": "query", "schema": schema}
    if description is not None:
        parameter["description"] = description
    return parameter


_RESPONSE_ID: list[Schema] = [
    {"name": "response_id", "in": "path", "required": True, "schema": {"type": "string"}}
]
_INPUT_ITEMS = _operation(
    "The input items a stored response answered (newest first unless order=asc)",
    json_content(ref("ResponseItemList"), "The items"),
    OPENAI_ERROR,
    not_found=True,
)
_INPUT_ITEMS["parameters"] = [
    _query("limit", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20}),
    _query("order", {"type": "string", "enum": ["asc", "desc"], "default": "desc"}),
    _query("after", {"type": "string"}, "An item id"),
]

PATHS: dict[str, Schema] = {
    **_chat_paths("/v1"),
    **_chat_paths(""),
    "/v1/models": {
        "get": _operation("The served model and its aliases", json_content(ref("ModelList"), "Models"))
    },
    "/v1/load_lora_adapter": {
        "post": _lora_update("Loads a LoRA adapter", "Loaded", "LoadLoraAdapterRequest")
    },
    "/v1/unload_lora_adapter": {
        "post": _lora_update(
            "Unloads a LoRA adapter no live request uses", "Unloaded", "UnloadLoraAdapterRequest"
        )
    },
    "/tokenize": {
        "post": _operation(
            "A prompt or chat messages -> token ids, token strings and the rendered prompt",
            json_content(ref("TokenizeResponse"), "The tokens"),
            OPENAI_ERROR,
            "TokenizeRequest",
        )
    },
    "/version": {
        "get": _operation(
            "The server's version", json_content(_object({"version": {"type": "string"}}), "The version")
        )
    },
    "/v1/responses": {
        "post": _operation(
            "OpenAI Responses: create a response",
            _sse_or_json(ref("Response"), "The response"),
            OPENAI_ERROR,
            "ResponseRequest",
            not_found=True,
        )
    },
    "/v1/responses/{response_id}": {
        "parameters": _RESPONSE_ID,
        "get": _operation(
            "A stored response", json_content(ref("Response"), "The response"), OPENAI_ERROR, not_found=True
        ),
        "delete": _operation(
            "Drop a stored response",
            json_content(ref("DeletedResponse"), "Dropped"),
            OPENAI_ERROR,
            not_found=True,
        ),
    },
    "/v1/responses/{response_id}/input_items": {"parameters": _RESPONSE_ID, "get": _INPUT_ITEMS},
    "/v1/responses/{response_id}/cancel": {
        "parameters": _RESPONSE_ID,
        "post": _operation(
            "Cancel a background response: this server runs none (`background` is refused), so a stored "
            "response's cancel is a 400 naming `background`",
            None,
            OPENAI_ERROR,
            not_found=True,
        ),
    },
    "/v1/messages": {
        "post": _operation(
            "Anthropic Messages (x-api-key accepted as the API key)",
            _sse_or_json(ref("Message"), "The message"),
            ANTHROPIC_ERROR,
            "MessagesRequest",
        )
    },
    "/v1/messages/count_tokens": {
        "post": _operation(
            "The prompt's tokens for a Messages body, as /v1/messages renders it",
            json_content(_object({"input_tokens": {"type": "integer"}}), "The count"),
            ANTHROPIC_ERROR,
            "CountTokensRequest",
        )
    },
}
