"""Anthropic Messages bodies -> the API-neutral values of router/agent.py and the shared sampling options.

What a Messages request becomes (the route itself is router/anthropic_api.py):

- ``system`` (a string or text blocks) -> a first ``system`` ChatMessage; ``messages`` (roles ``user`` and
  ``assistant``, content a string or blocks) -> ChatMessages: ``text`` blocks are the message's text
  (several are joined by a blank line), an assistant's ``tool_use`` blocks are its ``tool_calls`` (``input``
  as the arguments), and each ``tool_result`` block of a user message is a ``tool`` message answering its
  ``tool_use_id`` (its text; with ``is_error`` it starts with ``Error: ``), in block order. An assistant's
  ``thinking`` and ``redacted_thinking`` blocks are dropped (chat templates drop earlier reasoning too).
  A last ``assistant`` message is a prefill: the answer continues it. ``image``, ``document`` and every
  other block type are refused with a 400 naming the block.
- ``tools`` (custom tools: ``name``, ``description``, ``input_schema``) -> FunctionTools; server tools
  (``web_search_...``, ``bash_...``) are refused. ``tool_choice`` ``auto`` / ``any`` / ``tool`` (with
  ``name``) / ``none`` -> ToolChoice ``auto`` / ``required`` / ``function`` / ``none``, and its
  ``disable_parallel_tool_use`` -> ``parallel_tool_calls``. A tool's ``strict: true`` is honoured where a
  grammar constrains the call (``any`` / ``tool``, and ``auto`` where the lazy grammar applies: its input
  follows the schema); elsewhere it is refused (router/agent.py's plan).
- ``thinking``: ``disabled`` (the default), ``adaptive`` (the model decides how long it thinks, within
  ``max_tokens``) or ``enabled`` with ``budget_tokens`` (at least 1 and below ``max_tokens``: the model
  thinks for at most that many tokens, see router/anthropic_api.py), with ``display`` ``summarized`` (the
  thinking is returned) or ``omitted`` (thinking blocks without their text). The chat template gets
  ``enable_thinking``.
- ``max_tokens`` (required), ``temperature`` (0 to 1; 0 is greedy), ``top_p``, ``top_k`` (0: off),
  ``stop_sequences``, ``stream`` -> the same ``Options`` as the OpenAI routes (``parse_options``: one
  validation of sampling parameters for every API).
- ``output_config``: ``format`` ``{"type": "json_schema", "schema"}`` is enforced by constrained decoding
  (after any reasoning; with tools under ``auto``, the answer is a call or that JSON), and ``effort`` goes
  to the chat template as ``reasoning_effort`` (as the OpenAI route's ``reasoning_effort``).
- ``metadata`` (``user_id`` only: logged at debug level) and ``service_tier`` (``auto`` or
  ``standard_only``: this server has one tier) are checked and change nothing the model computes.
  ``cache_control`` (top-level, or on blocks, the system prompt and tools) is accepted: the prefix cache
  is automatic. ``temperature``, ``top_p`` and ``top_k`` are honoured although recent SDKs no longer send
  them (``extra_body`` does).

Any other field is refused with a 400 naming it (``Fields.finish``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from common import grammar

from .agent import ChatMessage, FunctionTool, ToolChoice, Turn, check_tools
from .errors import ValidationError
from .infer import Infer
from .openai_params import Fields, Options, parse_options
from .toolcalls import ToolCall

log = logging.getLogger(__name__)

TEMPERATURE_MAX = 1.0
OUTPUT_EFFORTS = ("low", "medium", "high", "xhigh", "max")
SERVICE_TIERS = ("auto", "standard_only")
THINKING_DISPLAYS = ("summarized", "omitted")
# Blocks a client may send that this server has no way to read (a 400 says so by name).
UNREADABLE_BLOCKS = {"image": "images", "document": "documents"}
CACHE_CONTROL_TYPES = ("ephemeral",)
CACHE_CONTROL_TTLS = ("5m", "1h")


@dataclass(frozen=True)
class Thinking:
    """The request's ``thinking``: whether the model's reasoning comes back as thinking blocks (else it is
    dropped), whether their text is shown (``display: omitted`` leaves it out), and the most tokens the
    model may think for (``budget_tokens``; None: only ``max_tokens`` bounds it)."""

    enabled: bool = False
    shown: bool = True
    budget_tokens: int | None = None


@dataclass(frozen=True)
class Conversation:
    """What to render: the messages (the system prompt first), the turn (tools, choice, and
    ``output_config.format``'s constraint), the thinking asked for, whether the last message is an
    assistant prefill that the answer continues, and ``output_config.effort``."""

    messages: tuple[ChatMessage, ...]
    turn: Turn
    thinking: Thinking
    prefill: bool
    effort: str | None = None

    def template_kwargs(self) -> dict[str, Any]:
        """The chat template's extra variables: ``enable_thinking`` (Qwen3's, SmolLM3's) as asked, and
        ``reasoning_effort`` (gpt-oss') when an effort is given, as the OpenAI route passes it."""
        kwargs: dict[str, Any] = {"enable_thinking": self.thinking.enabled}
        if self.effort is not None:
            kwargs["reasoning_effort"] = self.effort
        return kwargs


def _given(value: object) -> str:
    return json.dumps(value, ensure_ascii=False)[:100]


def _object(value: object, where: str, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValidationError(f"`{where}` must be an object. Given: {_given(value)}", param)
    return value


def _only(value: dict[str, Any], allowed: tuple[str, ...], where: str, param: str) -> None:
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ValidationError(f"`{where}.{unknown[0]}` is not supported", param)


def _string(value: object, where: str, param: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"`{where}` must be a string. Given: {_given(value)}", param)
    return value


def _check_cache_control(value: object, where: str, param: str) -> None:
    """A ``cache_control`` (at ``where``) is accepted, prefix caching being automatic here, when it has
    Anthropic's shape."""
    if value is None:
        return
    control = _object(value, where, param)
    _only(control, ("type", "ttl"), where, param)
    if control.get("type") not in CACHE_CONTROL_TYPES or control.get("ttl", "5m") not in CACHE_CONTROL_TTLS:
        raise ValidationError(
            f'`{where}` must be {{"type": "ephemeral"}} (with an optional `ttl` of '
            f"{' or '.join(CACHE_CONTROL_TTLS)})",
            param,
        )


def _text_block(block: dict[str, Any], where: str, param: str) -> str:
    _only(block, ("type", "text", "cache_control", "citations"), where, param)
    if block.get("citations"):
        raise ValidationError(f"`{where}.citations` is not supported", param)
    _check_cache_control(block.get("cache_control"), f"{where}.cache_control", param)
    text = _string(block.get("text"), f"{where}.text", param)
    if not text:
        raise ValidationError(f"`{where}.text` must be non-empty", param)
    return text


def _blocks(content: object, where: str, param: str) -> list[dict[str, Any]]:
    """A content: a non-empty string (one text block) or a non-empty array of blocks with a ``type``."""
    if isinstance(content, str):
        if not content:
            raise ValidationError(f"`{where}` must be non-empty", param)
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise ValidationError(f"`{where}` must be a non-empty string or a non-empty array of blocks", param)
    blocks = []
    for j, block in enumerate(content):
        block = _object(block, f"{where}[{j}]", param)
        kind = block.get("type")
        if not isinstance(kind, str):
            raise ValidationError(f"`{where}[{j}].type` must be a string", param)
        if kind in UNREADABLE_BLOCKS:
            raise ValidationError(
                f"`{where}[{j}]` is an `{kind}` block: this server reads no {UNREADABLE_BLOCKS[kind]} "
                "(only text, tool_use and tool_result blocks)",
                param,
            )
        blocks.append(block)
    return blocks


def _unsupported_block(kind: str, where: str, role: str, param: str) -> ValidationError:
    return ValidationError(f"`{where}` has type {kind!r}, which {role} messages cannot hold here", param)


def parse_system(value: object) -> ChatMessage | None:
    """``system``: a string or an array of text blocks (joined by a blank line)."""
    if value is None:
        return None
    if isinstance(value, str):
        return ChatMessage("system", value)
    if not isinstance(value, list):
        raise ValidationError("`system` must be a string or an array of text blocks", "system")
    texts = []
    for j, block in enumerate(value):
        block = _object(block, f"system[{j}]", "system")
        if block.get("type") != "text":
            raise ValidationError(f"`system[{j}]` must be a text block", "system")
        texts.append(_text_block(block, f"system[{j}]", "system"))
    return ChatMessage("system", "\n\n".join(texts))


def _tool_result_text(block: dict[str, Any], where: str) -> str:
    _only(block, ("type", "tool_use_id", "content", "is_error", "cache_control"), where, "messages")
    _check_cache_control(block.get("cache_control"), f"{where}.cache_control", "messages")
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        texts = []
        for k, part in enumerate(_blocks(content, f"{where}.content", "messages")):
            if part["type"] != "text":
                raise ValidationError(
                    f"`{where}.content[{k}]` has type {part['type']!r}: tool results hold text blocks only",
                    "messages",
                )
            texts.append(_text_block(part, f"{where}.content[{k}]", "messages"))
        text = "\n\n".join(texts)
    is_error = block.get("is_error", False)
    if not isinstance(is_error, bool):
        raise ValidationError(f"`{where}.is_error` must be a boolean", "messages")
    return f"Error: {text}" if is_error else text


def _user_messages(blocks: list[dict[str, Any]], where: str) -> list[ChatMessage]:
    """A user message's blocks, in order: runs of text -> user messages, each tool result -> a tool
    message."""
    out: list[ChatMessage] = []
    texts: list[str] = []
    for j, block in enumerate(blocks):
        at = f"{where}[{j}]"
        if block["type"] == "text":
            texts.append(_text_block(block, at, "messages"))
        elif block["type"] == "tool_result":
            if texts:
                out.append(ChatMessage("user", "\n\n".join(texts)))
                texts = []
            call_id = _string(block.get("tool_use_id"), f"{at}.tool_use_id", "messages")
            out.append(ChatMessage("tool", _tool_result_text(block, at), tool_call_id=call_id))
        else:
            raise _unsupported_block(block["type"], at, "user", "messages")
    if texts:
        out.append(ChatMessage("user", "\n\n".join(texts)))
    return out


def _assistant_message(blocks: list[dict[str, Any]], where: str) -> ChatMessage:
    """An assistant message's text blocks (joined) and tool_use blocks (its calls); thinking dropped."""
    texts: list[str] = []
    calls: list[ToolCall] = []
    for j, block in enumerate(blocks):
        at = f"{where}[{j}]"
        kind = block["type"]
        if kind == "text":
            texts.append(_text_block(block, at, "messages"))
        elif kind == "tool_use":
            _only(block, ("type", "id", "name", "input", "cache_control", "caller"), at, "messages")
            if block.get("caller") not in (None, {"type": "direct"}):
                raise ValidationError(
                    f'`{at}.caller` must be {{"type": "direct"}} (the model\'s own call)', "messages"
                )
            _check_cache_control(block.get("cache_control"), f"{at}.cache_control", "messages")
            call_id = _string(block.get("id"), f"{at}.id", "messages")
            name = _string(block.get("name"), f"{at}.name", "messages")
            arguments = _object(block.get("input"), f"{at}.input", "messages")
            calls.append(ToolCall(call_id, name, json.dumps(arguments, ensure_ascii=False)))
        elif kind not in ("thinking", "redacted_thinking"):
            raise _unsupported_block(kind, at, "assistant", "messages")
    return ChatMessage("assistant", "\n\n".join(texts), tool_calls=tuple(calls))


def parse_messages(value: object) -> tuple[list[ChatMessage], bool]:
    """``messages`` -> ChatMessages, and whether the last one is an assistant prefill."""
    if not isinstance(value, list) or not value:
        raise ValidationError("`messages` must be a non-empty array", "messages")
    out: list[ChatMessage] = []
    for i, message in enumerate(value):
        message = _object(message, f"messages[{i}]", "messages")
        _only(message, ("role", "content"), f"messages[{i}]", "messages")
        role = message.get("role")
        blocks = _blocks(message.get("content"), f"messages[{i}].content", "messages")
        if role == "user":
            out.extend(_user_messages(blocks, f"messages[{i}].content"))
        elif role == "assistant":
            out.append(_assistant_message(blocks, f"messages[{i}].content"))
        else:
            raise ValidationError(
                f"`messages[{i}].role` must be user or assistant (the system prompt is the top-level "
                f"`system`). Given: {_given(role)}",
                "messages",
            )
    prefill = value[-1].get("role") == "assistant"
    if prefill and out[-1].tool_calls:
        raise ValidationError(
            "the last message is an assistant prefill, which cannot hold tool_use blocks", "messages"
        )
    return out, prefill


def _tool(raw: object, index: int) -> FunctionTool:
    """One custom tool (``strict``: it asks for inputs that follow its schema)."""
    where = f"tools[{index}]"
    tool = _object(raw, where, "tools")
    kind = tool.get("type")
    if kind not in (None, "custom"):
        raise ValidationError(
            f"`{where}` is a server tool ({_given(kind)}): only custom tools (name, description, "
            "input_schema) are supported",
            "tools",
        )
    _only(tool, ("type", "name", "description", "input_schema", "cache_control", "strict"), where, "tools")
    _check_cache_control(tool.get("cache_control"), f"{where}.cache_control", "tools")
    name = _string(tool.get("name"), f"{where}.name", "tools")
    description = tool.get("description")
    if description is not None:
        _string(description, f"{where}.description", "tools")
    schema = _object(tool.get("input_schema"), f"{where}.input_schema", "tools")
    strict = tool.get("strict", False)
    if not isinstance(strict, bool):
        raise ValidationError(f"`{where}.strict` must be a boolean", "tools")
    return FunctionTool(name, description, schema, strict)


def parse_tool_choice(raw: object, tools: tuple[FunctionTool, ...]) -> tuple[ToolChoice, bool]:
    """``tool_choice`` -> the neutral choice and whether parallel calls are allowed."""
    if raw is None:
        return ToolChoice("auto" if tools else "none"), True
    choice = _object(raw, "tool_choice", "tool_choice")
    kind = choice.get("type")
    allowed = {"auto": ("type", "disable_parallel_tool_use"), "any": ("type", "disable_parallel_tool_use"),
               "tool": ("type", "name", "disable_parallel_tool_use"), "none": ("type",)}  # fmt: skip
    if not isinstance(kind, str) or kind not in allowed:
        raise ValidationError(
            f"`tool_choice.type` must be auto, any, tool or none. Given: {_given(kind)}", "tool_choice"
        )
    _only(choice, allowed[kind], "tool_choice", "tool_choice")
    disable_parallel = choice.get("disable_parallel_tool_use", False)
    if not isinstance(disable_parallel, bool):
        raise ValidationError("`tool_choice.disable_parallel_tool_use` must be a boolean", "tool_choice")
    if kind in ("any", "tool") and not tools:
        raise ValidationError(f"`tool_choice` {kind} needs `tools`", "tool_choice")
    if kind == "tool":
        name = _string(choice.get("name"), "tool_choice.name", "tool_choice")
        if name not in {t.name for t in tools}:
            raise ValidationError(
                f"`tool_choice.name` names {name!r}, which is not in `tools`", "tool_choice"
            )
        return ToolChoice("function", name), not disable_parallel
    mode = {"auto": "auto", "any": "required", "none": "none"}[kind]
    return ToolChoice(mode), not disable_parallel  # type: ignore[arg-type]


def parse_output_config(raw: object) -> tuple[str | None, str | None]:
    """``output_config``: ``format`` (``{"type": "json_schema", "schema": ...}``: the answer follows the
    schema by constrained decoding) -> a canonical grammar argument, and ``effort``."""
    if raw is None:
        return None, None
    config = _object(raw, "output_config", "output_config")
    _only(config, ("format", "effort"), "output_config", "output_config")
    effort = config.get("effort")
    if effort is not None and effort not in OUTPUT_EFFORTS:
        raise ValidationError(
            f"`output_config.effort` must be one of {', '.join(OUTPUT_EFFORTS)}. Given: {_given(effort)}",
            "output_config",
        )
    if config.get("format") is None:
        return None, effort
    output_format = _object(config["format"], "output_config.format", "output_config")
    _only(output_format, ("type", "schema"), "output_config.format", "output_config")
    if output_format.get("type") != "json_schema":
        raise ValidationError("`output_config.format.type` must be json_schema", "output_config")
    schema = _object(output_format.get("schema"), "output_config.format.schema", "output_config")
    constraint = grammar.canonical("json", schema)
    problem = grammar.check(constraint)
    if problem:
        raise ValidationError(f"`output_config.format.schema` is not valid: {problem}", "output_config")
    return constraint, effort


def parse_turn(tools_raw: object, choice_raw: object, constraint: str | None = None) -> Turn:
    """``tools``, ``tool_choice`` and ``output_config.format``'s constraint -> the neutral Turn."""
    tools: tuple[FunctionTool, ...] = ()
    if tools_raw is not None:
        if not isinstance(tools_raw, list):
            raise ValidationError("`tools` must be an array of tools", "tools")
        tools = tuple(_tool(t, i) for i, t in enumerate(tools_raw))
        check_tools(tools)
    choice, parallel = parse_tool_choice(choice_raw, tools)
    return Turn(tools, choice, parallel, constraint, constraint_field="output_config")


def parse_thinking(raw: object) -> Thinking:
    """``thinking``: see the module's docstring."""
    if raw is None:
        return Thinking()
    thinking = _object(raw, "thinking", "thinking")
    kind = thinking.get("type")
    if kind == "disabled":
        _only(thinking, ("type",), "thinking", "thinking")
        return Thinking()
    budget: int | None = None
    if kind == "enabled":
        _only(thinking, ("type", "budget_tokens", "display"), "thinking", "thinking")
        budget = thinking.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValidationError(
                f"`thinking.budget_tokens` must be an integer >= 1. Given: {_given(budget)}", "thinking"
            )
    elif kind == "adaptive":
        _only(thinking, ("type", "display"), "thinking", "thinking")
    else:
        raise ValidationError(
            f"`thinking.type` must be enabled, adaptive or disabled. Given: {_given(kind)}", "thinking"
        )
    display = thinking.get("display")
    if display is not None and display not in THINKING_DISPLAYS:
        raise ValidationError(
            f"`thinking.display` must be {' or '.join(THINKING_DISPLAYS)}. Given: {_given(display)}",
            "thinking",
        )
    return Thinking(enabled=True, shown=display != "omitted", budget_tokens=budget)


def parse_conversation(fields: Fields) -> Conversation:
    """``system``, ``messages``, ``tools``, ``tool_choice``, ``output_config``, ``thinking`` and the top-level
    ``cache_control`` (both routes read them)."""
    _check_cache_control(fields.raw("cache_control"), "cache_control", "cache_control")
    system = parse_system(fields.raw("system"))
    messages, prefill = parse_messages(fields.raw("messages"))
    constraint, effort = parse_output_config(fields.raw("output_config"))
    turn = parse_turn(fields.raw("tools"), fields.raw("tool_choice"), constraint)
    if prefill and turn.choice.forced:
        raise ValidationError(
            "an assistant prefill (the last message) cannot be combined with a forced `tool_choice`",
            "tool_choice",
        )
    thinking = parse_thinking(fields.raw("thinking"))
    return Conversation(tuple([system, *messages] if system else messages), turn, thinking, prefill, effort)


def parse_model(fields: Fields) -> None:
    """``model`` is required (the served name is then resolved by ``check_model``)."""
    if fields.body.get("model") is None:
        raise ValidationError("`model` is required", "model")


def parse_sampling(fields: Fields, infer: Infer, model: str = "") -> Options:
    """``max_tokens`` (required), ``temperature``, ``top_p``, ``top_k``, ``stop_sequences`` and ``stream``,
    checked by Anthropic's rules, then validated as every route's sampling options are (``parse_options``)."""
    max_tokens = fields.int("max_tokens", 1)
    if max_tokens is None:
        raise ValidationError("`max_tokens` is required", "max_tokens")
    temperature = fields.float("temperature", 0.0, TEMPERATURE_MAX)
    top_p = fields.float("top_p", 0.0, 1.0, low_open=True)
    top_k = fields.int("top_k", 0)
    stop = fields.raw("stop_sequences")
    if stop is None:
        stop = []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValidationError("`stop_sequences` must be an array of non-empty strings", "stop_sequences")
    limit = infer.config.max_stop_sequences
    if len(stop) > limit:
        raise ValidationError(
            f"`stop_sequences` supports up to {limit} sequences. Given: {len(stop)}", "stop_sequences"
        )
    stream = fields.bool("stream", False)
    shared = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
              "stop": stop, "stream": stream}  # fmt: skip
    return parse_options(Fields({k: v for k, v in shared.items() if v is not None}), infer, 1, model)


def parse_request_extras(fields: Fields) -> None:
    """``metadata`` (``user_id``, logged) and ``service_tier`` (one tier here), checked."""
    metadata = fields.raw("metadata")
    if metadata is not None:
        _only(_object(metadata, "metadata", "metadata"), ("user_id",), "metadata", "metadata")
        user = metadata.get("user_id")
        if user is not None:
            _string(user, "metadata.user_id", "metadata")
            log.debug("request for user %r", user[:200])
    tier = fields.raw("service_tier")
    if tier is not None and tier not in SERVICE_TIERS:
        raise ValidationError(f"`service_tier` must be {' or '.join(SERVICE_TIERS)}", "service_tier")
