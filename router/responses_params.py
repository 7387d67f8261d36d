"""``POST /v1/responses`` bodies -> the API-neutral values of router/agent.py and the shared ``Options``.

Every field of the body is honoured or refused with a 400 naming it (``Fields.finish``): nothing is
silently ignored. Sampling fields go through the chat route's own ``parse_options`` (``max_output_tokens``
is its ``max_tokens``), ``text.format`` through ``response_format``'s grammar (router/grammar.py), function
tools and ``tool_choice`` become ``FunctionTool`` / ``ToolChoice`` / ``Turn``, and input items become
``ChatMessage``s:

- a message (``{"role", "content"}``, with or without ``"type": "message"``): ``user``, ``system``,
  ``developer`` (as ``system``) or ``assistant``; content a string or ``input_text`` / ``output_text`` /
  ``refusal`` parts (other parts, e.g. images, are refused);
- ``function_call`` (``call_id``, ``name``, ``arguments`` as the JSON text of an object): joins the
  assistant message just before it, or starts one;
- ``function_call_output`` (``call_id`` of an earlier call, ``output`` text or text parts): a ``tool``
  message;
- ``reasoning``: accepted (clients send back their output) and left out of the prompt, as chat templates
  leave out earlier turns' reasoning.

Input items are kept normalized (``normalize_input``) so that a stored response's input can be continued
(``previous_response_id``) without parsing the client's original body again.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from .agent import ChatMessage, FunctionTool, ToolChoice, Turn, check_tools
from .errors import ValidationError
from .grammar import from_response_format
from .infer import Infer
from .openai_params import (
    REASONING_EFFORTS,
    Fields,
    Options,
    check_model,
    function_fields,
    parse_chat_extras,
    parse_options,
)
from .toolcalls import ToolCall

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = {"input_text": "text", "output_text": "text", "refusal": "refusal"}
REASONING_SUMMARIES = ("auto", "concise", "detailed")
# Hosted tools of OpenAI's Responses API: refused by name (this server runs function tools only).
_TOOL_FIELDS = {"type", "name", "description", "parameters", "strict"}
# The fields each kind of input item may have (ids and statuses of items a client sends back included).
_ITEM_FIELDS = {
    "message": {"type", "role", "content", "id", "status", "phase"},
    "function_call": {"type", "call_id", "name", "arguments", "id", "status"},
    "function_call_output": {"type", "call_id", "output", "id", "status"},
    "reasoning": {"type", "id", "summary", "content", "encrypted_content", "status"},
}
_PART_FIELDS = {"type", "text", "refusal", "annotations", "logprobs"}


@dataclass(frozen=True)
class ResponsesRequest:
    """A checked ``POST /v1/responses`` body. ``echo`` holds the response object's fields that repeat the
    request (``model``, ``instructions``, ``tools``, ``text``, ...)."""

    input_items: tuple[dict[str, Any], ...]
    instructions: str | None
    previous_response_id: str | None
    turn: Turn
    options: Options
    store: bool
    template_kwargs: dict[str, Any]
    echo: dict[str, Any]


def _fail(message: str, field: str) -> ValidationError:
    return ValidationError(message, field)


# -- input items ------------------------------------------------------------------------------------------
def _text(content: object, where: str) -> str:
    """A string, or the text of a list of text parts."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _fail(f"`{where}` must be a string or an array of text parts", "input")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = TEXT_PARTS.get(kind) if isinstance(kind, str) else None
        if key is None:
            raise _fail(
                f"`{where}[{j}]` has type {json.dumps(kind)[:40]}: only input_text, output_text and refusal "
                "parts are supported",
                "input",
            )
        assert isinstance(part, dict)
        unknown = sorted(set(part) - _PART_FIELDS)
        if unknown:
            raise _fail(f"`{where}[{j}]` has an unknown field `{unknown[0]}`", "input")
        if not isinstance(part.get(key), str):
            raise _fail(f"`{where}[{j}].{key}` must be a string", "input")
        texts.append(part[key])
    return "".join(texts)


def _normalize_item(raw: object, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _fail(f"`{where}` must be an object", "input")
    kind = raw.get("type", "message" if "role" in raw else None)
    if kind == "item_reference":
        raise _fail(f"`{where}`: item references are not supported; send the item itself", "input")
    if kind not in _ITEM_FIELDS:
        raise _fail(
            f"`{where}` has type {json.dumps(kind)[:40]}: supported items are message, function_call, "
            "function_call_output and reasoning",
            "input",
        )
    unknown = sorted(k for k, v in raw.items() if k not in _ITEM_FIELDS[kind] and v is not None)
    if unknown:  # a null field asks for nothing (SDKs send their models' unset fields as null)
        raise _fail(f"`{where}` has an unknown field `{unknown[0]}`", "input")
    if kind == "message":
        role = raw.get("role")
        if role not in MESSAGE_ROLES:
            raise _fail(f"`{where}.role` must be one of {', '.join(MESSAGE_ROLES)}. Given: {role!r}", "input")
        return {"type": "message", "role": role, "content": _text(raw.get("content"), f"{where}.content")}
    if kind == "reasoning":
        summary = raw.get("summary", [])
        if not isinstance(summary, list):
            raise _fail(f"`{where}.summary` must be an array", "input")
        return {"type": "reasoning", "summary": summary}
    call_id = raw.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise _fail(f"`{where}.call_id` must be a non-empty string", "input")
    if kind == "function_call_output":
        return {"type": kind, "call_id": call_id, "output": _text(raw.get("output"), f"{where}.output")}
    name, arguments = raw.get("name"), raw.get("arguments")
    if not isinstance(name, str) or not name:
        raise _fail(f"`{where}.name` must be a non-empty string", "input")
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise _fail(f"`{where}.arguments` must be the JSON text of an object", "input")
    compact = json.dumps(parsed, ensure_ascii=False, separators=(",", ":"))
    return {"type": kind, "call_id": call_id, "name": name, "arguments": compact}


def normalize_input(raw: object) -> tuple[dict[str, Any], ...]:
    """``input``: a string (one user message) or a non-empty array of items -> normalized items."""
    if isinstance(raw, str):
        return ({"type": "message", "role": "user", "content": raw},)
    if not isinstance(raw, list) or not raw:
        raise _fail("`input` must be a string or a non-empty array of items", "input")
    return tuple(_normalize_item(item, f"input[{i}]") for i, item in enumerate(raw))


def normalize_output(output: Iterable[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """A stored response's output items, as input items of a continuation."""
    return tuple(_normalize_item(item, "output") for item in output)


def to_messages(items: Iterable[dict[str, Any]]) -> list[ChatMessage]:
    """Normalized items -> the conversation's messages. A ``function_call_output`` must answer an earlier
    ``function_call`` (by ``call_id``)."""
    out: list[ChatMessage] = []
    names: dict[str, str] = {}
    for item in items:
        kind = item["type"]
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            out.append(ChatMessage(role=role, content=item["content"]))
        elif kind == "function_call":
            call = ToolCall(item["call_id"], item["name"], item["arguments"])
            names[call.id] = call.name
            if out and out[-1].role == "assistant":
                out[-1] = replace(out[-1], tool_calls=(*out[-1].tool_calls, call))
            else:
                out.append(ChatMessage(role="assistant", tool_calls=(call,)))
        elif kind == "function_call_output":
            call_id = item["call_id"]
            if call_id not in names:
                raise _fail(
                    f"`input` has a function_call_output for call_id {call_id!r}, which no function_call "
                    "before it made",
                    "input",
                )
            out.append(
                ChatMessage(role="tool", content=item["output"], tool_call_id=call_id, name=names[call_id])
            )
    return out


# -- tools --------------------------------------------------------------------------------------------------
def _function_tool(raw: object, index: int) -> tuple[FunctionTool, dict[str, Any]]:
    """A Responses function tool (flat: ``{"type": "function", "name", ...}``) and its echo."""
    where = f"tools[{index}]"
    kind = raw.get("type") if isinstance(raw, dict) else None
    if not isinstance(raw, dict) or not isinstance(kind, str):
        raise _fail(f'`{where}` must be an object {{"type": "function", "name", "parameters", ...}}', "tools")
    if kind != "function":
        raise _fail(
            f"`{where}` has type {json.dumps(kind)[:40]}: this server runs function tools only", "tools"
        )
    unknown = sorted(set(raw) - _TOOL_FIELDS)
    if unknown:
        raise _fail(f"`{where}` has an unknown field `{unknown[0]}`", "tools")
    tool = function_fields(raw, where)
    echo = {
        "type": "function",
        "name": tool.name,
        "description": tool.description,
        "parameters": raw.get("parameters"),
        "strict": raw.get("strict", True),
    }
    return tool, echo


def _tool_choice(raw: object, tools: tuple[FunctionTool, ...]) -> ToolChoice:
    if raw is None or raw in ("none", "auto", "required"):
        choice = ToolChoice(raw or "auto")  # type: ignore[arg-type]
    elif isinstance(raw, dict) and raw.get("type") == "function":
        if set(raw) - {"type", "name"} or not isinstance(raw.get("name"), str):
            raise _fail(
                '`tool_choice` of type function must be {"type": "function", "name": ...}', "tool_choice"
            )
        choice = ToolChoice("function", raw["name"])
        if choice.function not in {t.name for t in tools}:
            raise _fail(f"`tool_choice` names {choice.function!r}, which is not in `tools`", "tool_choice")
    else:
        kind = raw.get("type") if isinstance(raw, dict) else raw
        raise _fail(
            '`tool_choice` must be "none", "auto", "required" or {"type": "function", "name": ...}. '
            f"Given: {json.dumps(kind)[:60]}",
            "tool_choice",
        )
    if choice.forced and not tools:
        raise _fail("`tool_choice` forces a call but `tools` is empty", "tool_choice")
    return choice


# -- text ---------------------------------------------------------------------------------------------------
def _text_format(fields: Fields) -> tuple[str | None, dict[str, Any]]:
    """``text``: ``format`` -> the grammar processor's argument (None: free text) and the echo of ``text``."""
    raw = fields.raw("text")
    if raw is None:
        return None, {"format": {"type": "text"}}
    if not isinstance(raw, dict) or set(raw) - {"format", "verbosity"}:
        raise _fail('`text` must be an object {"format": ..., "verbosity": ...}', "text")
    verbosity = raw.get("verbosity")
    if verbosity not in (None, "medium"):
        raise _fail(f"`text.verbosity` {json.dumps(verbosity)[:40]} is not supported (only medium)", "text")
    fmt = raw.get("format")
    if fmt is None:
        fmt = {"type": "text"}
    if not isinstance(fmt, dict):
        raise _fail(
            '`text.format` must be an object {"type": "text" | "json_object" | "json_schema"}', "text"
        )
    if fmt.get("type") == "json_schema":
        spec = {k: v for k, v in fmt.items() if k != "type"}
        response_format: object = {"type": "json_schema", "json_schema": spec}
    else:
        response_format = fmt
    try:
        constraint = from_response_format(response_format)
    except ValidationError as e:
        message = e.detail.replace("`response_format.json_schema", "`text.format").replace(
            "`response_format", "`text.format"
        )
        raise _fail(message, "text") from None
    return constraint, {"format": fmt, "verbosity": verbosity or "medium"}


# -- the body -----------------------------------------------------------------------------------------------
def _refuse(fields: Fields, name: str, allowed: tuple[object, ...], why: str) -> None:
    value = fields.raw(name)
    if value not in allowed:
        raise _fail(f"`{name}` {json.dumps(value)[:60]} is not supported: {why}", name)


def parse_request(body: dict[str, Any], infer: Infer) -> ResponsesRequest:
    """Checks a ``POST /v1/responses`` body; every field is read here or refused by ``fields.finish``."""
    fields = Fields(body)
    model = check_model(fields, infer)
    items = normalize_input(fields.raw("input"))
    instructions = fields.raw("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise _fail("`instructions` must be a string", "instructions")
    previous = fields.raw("previous_response_id")
    if previous is not None and (not isinstance(previous, str) or not previous):
        raise _fail("`previous_response_id` must be a response id", "previous_response_id")
    max_output_tokens = fields.int("max_output_tokens", 1)
    sampling: dict[str, Any] = {
        name: body[name] for name in ("temperature", "top_p", "stream") if name in body
    }
    options = parse_options(Fields({**sampling, "max_tokens": max_output_tokens}), infer, 1, model)
    for key in sampling:
        fields.raw(key)
    constraint, text_echo = _text_format(fields)

    raw_tools = fields.raw("tools")
    if raw_tools is not None and not isinstance(raw_tools, list):
        raise _fail("`tools` must be an array of function tools", "tools")
    parsed = [_function_tool(t, i) for i, t in enumerate(raw_tools or [])]
    tools = tuple(tool for tool, _ in parsed)
    check_tools(tools)
    raw_choice = fields.raw("tool_choice")
    choice = _tool_choice(raw_choice, tools)
    parallel = fields.bool("parallel_tool_calls", True)
    max_tool_calls = fields.int("max_tool_calls", 1)
    turn = Turn(tools, choice, parallel, constraint, "text", max_tool_calls)

    reasoning = fields.raw("reasoning")
    kwargs: dict[str, Any] = {}
    reasoning_echo: dict[str, Any] = {"effort": None, "summary": None}
    if reasoning is not None:
        if not isinstance(reasoning, dict) or set(reasoning) - {"effort", "summary", "generate_summary"}:
            raise _fail('`reasoning` must be an object {"effort", "summary"}', "reasoning")
        effort, summary = reasoning.get("effort"), reasoning.get("summary", reasoning.get("generate_summary"))
        if effort is not None and effort not in REASONING_EFFORTS:
            raise _fail(f"`reasoning.effort` must be one of {', '.join(REASONING_EFFORTS)}", "reasoning")
        if summary is not None and summary not in REASONING_SUMMARIES:
            raise _fail(f"`reasoning.summary` must be one of {', '.join(REASONING_SUMMARIES)}", "reasoning")
        if effort is not None:
            kwargs["reasoning_effort"] = effort
        reasoning_echo = {"effort": effort, "summary": summary}

    store = fields.bool("store", True)
    extras = parse_chat_extras(
        Fields({k: body[k] for k in ("metadata", "service_tier", "user") if body.get(k) is not None})
    )
    for name in ("metadata", "service_tier", "user"):
        fields.raw(name)
    safety_identifier = fields.raw("safety_identifier")
    if safety_identifier is not None and not isinstance(safety_identifier, str):
        raise _fail("`safety_identifier` must be a string", "safety_identifier")
    cache_key = fields.raw("prompt_cache_key")  # a routing hint: the prefix cache is shared by all requests
    if cache_key is not None and not isinstance(cache_key, str):
        raise _fail("`prompt_cache_key` must be a string", "prompt_cache_key")
    include = fields.raw("include")
    if include not in (None, []):
        raise _fail(
            f"`include` {json.dumps(include)[:80]} is not supported (nothing extra to include)", "include"
        )
    _refuse(fields, "background", (None, False), "responses run in the foreground")
    _refuse(fields, "truncation", (None, "disabled"), "an input longer than the context is refused")
    _refuse(fields, "top_logprobs", (None, 0), "log-probabilities are not returned here")
    _refuse(
        fields, "stream_options", (None, {}, {"include_obfuscation": False}), "only include_obfuscation false"
    )
    for name in (
        "conversation",
        "prompt",
        "context_management",
        "prompt_cache_retention",
        "prompt_cache_options",
    ):
        if fields.raw(name) is not None:
            raise _fail(f"`{name}` is not supported", name)
    fields.finish()

    echo: dict[str, Any] = {
        "background": False,
        "instructions": instructions,
        "max_output_tokens": max_output_tokens,
        "max_tool_calls": max_tool_calls,
        "metadata": extras.get("metadata", {}),
        "model": model,
        "parallel_tool_calls": parallel,
        "previous_response_id": previous,
        "reasoning": reasoning_echo,
        "service_tier": "default",
        "store": store,
        "temperature": body.get("temperature", 1.0),
        "text": text_echo,
        "tool_choice": raw_choice if raw_choice is not None else "auto",
        "tools": [echo for _, echo in parsed],
        "top_logprobs": 0,
        "top_p": body.get("top_p", 1.0),
        "truncation": "disabled",
        "user": body.get("user"),
    }
    if safety_identifier is not None:
        echo["safety_identifier"] = safety_identifier
    if cache_key is not None:
        echo["prompt_cache_key"] = cache_key
    return ResponsesRequest(
        input_items=items,
        instructions=instructions,
        previous_response_id=previous,
        turn=turn,
        options=options,
        store=store,
        template_kwargs=kwargs,
        echo=echo,
    )
