"""OpenAI request bodies -> validated options, ``ValidRequest``s and the neutral values of router/agent.py
(messages, tools, tool choice); strict types, unknown fields refused."""

from __future__ import annotations

import builtins
import json
import logging
import math
import random
from dataclasses import dataclass, replace
from typing import Any

from common.params import SamplingParams

from .agent import ChatMessage, FunctionTool, ToolChoice, Turn, check_tools
from .chat import ChatError
from .errors import InferError, ValidationError
from .grammar import from_response_format
from .infer import Infer
from .toolcalls import ToolCall
from .validation import U64_MAX, ValidRequest, check_cache_salt

log = logging.getLogger(__name__)

MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority", "fast")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")
# Names of unknown models already logged (bounded: a client could send a new one each time).
_LOGGED_NAMES: set[str] = set()
_LOGGED_NAMES_MAX = 1000
TEMPLATE_RESERVED = (
    "messages",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "tokenize",
)


class ModelNotFoundError(InferError):
    status = 404
    error_type = "invalid_request_error"


class Fields:
    """Strict typed access to a JSON body; ``finish()`` refuses any field nobody read."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.seen: set[str] = set()

    def raw(self, name: str) -> Any:
        self.seen.add(name)
        return self.body.get(name)

    def _fail(self, name: str, what: str) -> ValidationError:
        return ValidationError(
            f"`{name}` must be {what}. Given: {json.dumps(self.body.get(name))[:100]}", name
        )

    def bool(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._fail(name, "a boolean")
        return value

    def int(self, name: str, low: int, high: int | None = None) -> int | None:
        value = self.raw(name)
        if value is None:
            return None
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            raise self._fail(name, f"an integer >= {low}" + (f" and <= {high}" if high is not None else ""))
        return value

    def float(self, name: str, low: float, high: float, low_open: builtins.bool = False) -> float | None:
        value = self.raw(name)
        if value is None:
            return None
        bounds = f"{'>' if low_open else '>='} {low} and <= {high}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(name, f"a number {bounds}")
        value = float(value)
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            raise self._fail(name, f"a number {bounds}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.body) - self.seen)
        if unknown:
            raise ValidationError(f"unsupported parameter `{unknown[0]}`", unknown[0])


@dataclass(frozen=True)
class Options:
    """What both routes share, after validation."""

    params: SamplingParams
    seed: int | None
    max_tokens: int | None
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    # vLLM's stream_options.continuous_usage_stats: usage on every chunk.
    continuous_usage: bool
    min_tokens: int
    ignore_eos: bool
    stop_token_ids: tuple[int, ...]
    skip_special_tokens: bool
    # Prefix-cache salt (vLLM's): "" = none.
    cache_salt: str = ""
    # response_format's constraint (a canonical grammar argument), also in ``params.processors``.
    constraint: str | None = None
    # The LoRA adapter the request's ``model`` names ("" = the base model).
    adapter_id: str = ""

    def with_grammar(self, argument: str | None, field: str) -> Options:
        """These options decoding with ``argument`` instead of ``constraint`` (None: unconstrained)."""
        processors = [p for p in self.params.processors if p[0] != "grammar"]
        if argument is not None:
            if self.min_tokens:  # a complete output allows only EOS, which min_tokens forbids
                raise ValidationError(f"`min_tokens` cannot be used with `{field}`", "min_tokens")
            processors.append(("grammar", argument))
        return replace(self, params=replace(self.params, processors=tuple(sorted(processors))))


def check_model(fields: Fields, infer: Infer) -> str:
    """The served name a request's ``model`` stands for. With one model served, any name is served by it
    (as TGI does: huggingface_hub sends "dummy", TGI's documentation "tgi"; each unknown name is logged
    once) and the first served name is reported; with --strict-model-name an unknown name is a 404. A
    loaded LoRA adapter's name is served by that adapter; while the server holds adapters, an unknown name is
    a 404 too, and always with --enable-lora-runtime-updates (a mistyped or unloaded adapter must not run
    on the base model unnoticed)."""
    names = infer.config.model_names
    adapters = infer.validator.adapters
    model = fields.raw("model")
    if model is None:
        return names[0]
    if not isinstance(model, str):
        raise ValidationError("`model` must be a string", "model")
    if model in names or model in adapters:
        return model
    if infer.config.strict_model_name or adapters or infer.config.enable_lora_runtime_updates:
        raise ModelNotFoundError(
            f"The model `{model}` does not exist. This server serves: {', '.join((*names, *adapters))}"
        )
    if model not in _LOGGED_NAMES and len(_LOGGED_NAMES) < _LOGGED_NAMES_MAX:
        _LOGGED_NAMES.add(model)
        log.info("Serving requests for model %r with %s", model[:200], names[0])
    return names[0]


def parse_options(fields: Fields, infer: Infer, max_n: int, model: str = "") -> Options:
    """The sampling options every route shares; ``model``: the served name ``check_model`` gave (a LoRA
    adapter's name selects it)."""
    c = infer.config
    vocab = infer.info.vocab_size or len(infer.tokenizer.hf)
    temperature = fields.float("temperature", 0.0, 2.0)
    top_p = fields.float("top_p", 0.0, 1.0, low_open=True)
    top_k = fields.int("top_k", -1)
    min_p = fields.float("min_p", 0.0, 1.0)
    repetition_penalty = fields.float("repetition_penalty", 0.0, math.inf, low_open=True)
    presence = fields.float("presence_penalty", -2.0, 2.0)
    frequency = fields.float("frequency_penalty", -2.0, 2.0)
    seed = fields.int("seed", -(2**63), U64_MAX)
    max_tokens = fields.int("max_tokens", 1)
    max_completion_tokens = fields.int("max_completion_tokens", 1)
    if max_tokens is not None and max_completion_tokens is not None and max_tokens != max_completion_tokens:
        raise ValidationError("`max_tokens` and `max_completion_tokens` disagree; send one", "max_tokens")
    n = fields.int("n", 1, max_n) or 1
    stop = fields.raw("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValidationError("`stop` must be a non-empty string or an array of them", "stop")
    if len(stop) > c.max_stop_sequences:
        raise ValidationError(
            f"`stop` supports up to {c.max_stop_sequences} sequences. Given: {len(stop)}", "stop"
        )
    stream = fields.bool("stream", False)
    stream_options = fields.raw("stream_options")
    include_usage = continuous_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict) or set(stream_options) - {
            "include_usage",
            "continuous_usage_stats",
        }:
            raise ValidationError(
                "`stream_options` supports only `include_usage` and `continuous_usage_stats`",
                "stream_options",
            )
        if not stream:
            raise ValidationError("`stream_options` needs `stream: true`", "stream_options")
        try:
            include_usage = Fields(stream_options).bool("include_usage", False)
            continuous_usage = Fields(stream_options).bool("continuous_usage_stats", False)
        except ValidationError as e:
            raise ValidationError(e.detail, "stream_options") from None
        if continuous_usage and not include_usage:
            raise ValidationError(
                "`stream_options.continuous_usage_stats` needs `include_usage: true`", "stream_options"
            )
    logit_bias = fields.raw("logit_bias")
    bias: list[tuple[int, float]] = []
    if logit_bias is not None:
        if not isinstance(logit_bias, dict):
            raise ValidationError("`logit_bias` must map token ids to numbers", "logit_bias")
        for key, value in logit_bias.items():
            digits = key.strip()
            # ASCII digits only: str.isdigit() is true for "²", which int() refuses.
            token = int(digits) if digits.isascii() and digits.isdigit() and len(digits) < 12 else -1
            if not 0 <= token < vocab:
                raise ValidationError(
                    f"`logit_bias` key {key[:24]!r} is not a token id below {vocab}", "logit_bias"
                )
            if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
                raise ValidationError(f"`logit_bias[{key}]` must be a number from -100 to 100", "logit_bias")
            bias.append((token, float(value)))
    stop_token_ids = fields.raw("stop_token_ids") or []
    if not isinstance(stop_token_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in stop_token_ids
    ):
        raise ValidationError(
            f"`stop_token_ids` must be an array of token ids below {vocab}", "stop_token_ids"
        )
    min_tokens = fields.int("min_tokens", 0) or 0
    limit = max_tokens if max_tokens is not None else max_completion_tokens
    if limit is not None and min_tokens > limit:
        raise ValidationError(f"`min_tokens` ({min_tokens}) must be <= `max_tokens` ({limit})", "min_tokens")
    processors: list[tuple[str, str]] = []
    constraint = from_response_format(fields.raw("response_format"))
    if constraint is not None:
        infer.validator.require_processor("grammar", "response_format")
        if min_tokens:  # a complete output allows only EOS, which min_tokens forbids: nothing is left
            raise ValidationError("`min_tokens` cannot be used with a `response_format`", "min_tokens")
        processors.append(("grammar", constraint))
    greedy = temperature == 0.0
    infer.validator.check_supported(
        {
            "min_p": not greedy and bool(min_p),
            "frequency_penalty": bool(frequency),
            "presence_penalty": bool(presence),
            "logit_bias": bool(bias),
            "seed": seed is not None and not greedy,
            "min_new_tokens": min_tokens > 0,
        },
        {"min_new_tokens": "min_tokens"},
    )
    params = SamplingParams(
        temperature=1.0 if greedy or temperature is None else temperature,
        # top_k >= the vocabulary keeps every token: off (and never a number the shard's uint32 can't hold).
        top_k=0 if greedy or top_k is None or top_k <= 0 or top_k >= vocab else top_k,
        top_p=1.0 if greedy or top_p is None else top_p,
        min_p=0.0 if greedy or min_p is None else min_p,
        do_sample=not greedy,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        frequency_penalty=frequency or 0.0,
        presence_penalty=presence or 0.0,
        logit_bias=tuple(bias),
        processors=tuple(sorted(processors)),
    )
    return Options(
        params=params,
        seed=None if seed is None else seed % 2**64,
        max_tokens=limit,
        n=n,
        stop=stop,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        min_tokens=min_tokens,
        ignore_eos=fields.bool("ignore_eos", False),
        stop_token_ids=tuple(stop_token_ids),
        skip_special_tokens=fields.bool("skip_special_tokens", True),
        cache_salt=check_cache_salt(fields.raw("cache_salt")) or "",
        constraint=constraint,
        adapter_id=model if model in infer.validator.adapters else "",
    )


def refuse_unsupported(fields: Fields) -> None:
    """Features this server does not have: a clear 400, never a silent unconstrained answer."""
    for name in ("functions", "function_call", "audio", "prediction", "web_search_options"):
        if fields.raw(name) is not None:
            raise ValidationError(f"`{name}` is not supported", name)
    modalities = fields.raw("modalities")
    if modalities not in (None, ["text"]):
        raise ValidationError('`modalities` supports only ["text"]', "modalities")


def parse_user(fields: Fields) -> None:
    """``user``: an end-user id for abuse monitoring; this server only logs it (debug level)."""
    user = fields.raw("user")
    if user is not None and not isinstance(user, str):
        raise ValidationError("`user` must be a string", "user")
    if user:
        log.debug("request for user %r", user[:200])


def parse_chat_extras(fields: Fields) -> dict[str, Any]:
    """The chat fields about the request rather than its generation, checked: ``user`` (logged),
    ``metadata`` (echoed, as OpenAI's chat completion object carries it), ``service_tier`` (one tier:
    the response says ``default``), ``store`` (``true`` is refused: nothing is stored). Returns the fields
    the response carries."""
    parse_user(fields)
    echo: dict[str, Any] = {}
    metadata = fields.raw("metadata")
    if metadata is not None:
        if (
            not isinstance(metadata, dict)
            or len(metadata) > 16
            or not all(isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in metadata.items())
        ):
            raise ValidationError(
                "`metadata` must be an object of at most 16 string values (keys up to 64 characters, "
                "values up to 512)",
                "metadata",
            )
        echo["metadata"] = metadata
    tier = fields.raw("service_tier")
    if tier is not None:
        if tier not in SERVICE_TIERS:
            raise ValidationError(f"`service_tier` must be one of {', '.join(SERVICE_TIERS)}", "service_tier")
        echo["service_tier"] = "default"
    if fields.bool("store", False):
        raise ValidationError("`store: true` is not supported: this server stores no completions", "store")
    return echo


def parse_reasoning_effort(fields: Fields) -> str | None:
    """``reasoning_effort``: passed to the chat template as the ``reasoning_effort`` variable."""
    effort = fields.raw("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise ValidationError(
            f"`reasoning_effort` must be one of {', '.join(REASONING_EFFORTS)}", "reasoning_effort"
        )
    return effort


# -- messages and tools -----------------------------------------------------------------------------------
def _content_text(content: object, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            where = f"messages[{index}].content[{j}]"
            if not isinstance(part, dict):
                raise ChatError(f"`{where}` must be an object with a `type`", "messages")
            kind = part.get("type")
            if kind != "text":
                raise ChatError(f"`{where}` has type {kind!r}: only text parts are supported", "messages")
            if not isinstance(part.get("text"), str):
                raise ChatError(f"`{where}.text` must be a string", "messages")
            texts.append(part["text"])
        return "".join(texts)
    raise ChatError(f"`messages[{index}].content` must be a string or a list of text parts", "messages")


def _message_tool_calls(raw: object, index: int) -> tuple[ToolCall, ...]:
    where = f"messages[{index}].tool_calls"
    if not isinstance(raw, list):
        raise ChatError(f"`{where}` must be an array", "messages")
    calls = []
    for j, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        if (
            not isinstance(call, dict)
            or call.get("type", "function") != "function"
            or not isinstance(call.get("id"), str)
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
        ):
            raise ChatError(
                f'`{where}[{j}]` must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}',
                "messages",
            )
        arguments = function.get("arguments", "{}")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ChatError(
                f"`{where}[{j}].function.arguments` must be the JSON text of an object", "messages"
            )
        calls.append(ToolCall(call["id"], function["name"], json.dumps(parsed, ensure_ascii=False)))
    return tuple(calls)


def parse_messages(messages: object) -> list[ChatMessage]:
    """OpenAI chat messages -> ChatMessages (text content; ``developer`` is ``system``; an assistant's
    ``tool_calls``; a tool result's ``tool_call_id``)."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("`messages` must be a non-empty array", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(f"`messages[{i}]` must be an object", "messages")
        role = message.get("role")
        if role not in MESSAGE_ROLES:
            raise ChatError(
                f"`messages[{i}].role` must be one of {', '.join(MESSAGE_ROLES)}. Given: {role!r}", "messages"
            )
        calls: tuple[ToolCall, ...] = ()
        if message.get("tool_calls") is not None:
            if role != "assistant":
                raise ChatError(f"`messages[{i}].tool_calls`: only assistant messages make calls", "messages")
            calls = _message_tool_calls(message["tool_calls"], i)
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        tool_call_id = message.get("tool_call_id")
        if role == "tool" and not isinstance(tool_call_id, str):
            raise ChatError(
                f"`messages[{i}].tool_call_id` must name the call this tool message answers", "messages"
            )
        name = message.get("name")
        out.append(
            ChatMessage(
                role="system" if role == "developer" else role,
                content=_content_text(content, i),
                tool_calls=calls,
                tool_call_id=tool_call_id if role == "tool" else None,
                name=name if isinstance(name, str) else None,
            )
        )
    return out


def _function_tool(raw: object, index: int) -> FunctionTool:
    where = f"tools[{index}]"
    if (
        not isinstance(raw, dict)
        or raw.get("type") != "function"
        or not isinstance(raw.get("function"), dict)
    ):
        raise ValidationError(
            f'`{where}` must be {{"type": "function", "function": {{"name", ...}}}}', "tools"
        )
    unknown = sorted(set(raw) - {"type", "function"})
    if unknown:
        raise ValidationError(f"`{where}` has an unknown field `{unknown[0]}`", "tools")
    function = raw["function"]
    unknown = sorted(set(function) - {"name", "description", "parameters", "strict"})
    if unknown:
        raise ValidationError(f"`{where}.function` has an unknown field `{unknown[0]}`", "tools")
    return function_fields(function, f"{where}.function")


def function_fields(function: dict[str, Any], where: str) -> FunctionTool:
    """A function tool's ``name``, ``description``, ``strict`` and ``parameters`` (in OpenAI's chat tools
    and, flat, in its Responses tools), checked; ``where`` is the object's path in errors."""
    name, description = function.get("name"), function.get("description")
    if not isinstance(name, str):
        raise ValidationError(f"`{where}.name` must be a string", "tools")
    if description is not None and not isinstance(description, str):
        raise ValidationError(f"`{where}.description` must be a string", "tools")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise ValidationError(f"`{where}.strict` must be a boolean", "tools")
    parameters = function.get("parameters")
    if parameters is None:
        return FunctionTool(name, description, strict=strict is True)
    if not isinstance(parameters, dict):
        raise ValidationError(f"`{where}.parameters` must be a JSON schema object", "tools")
    return FunctionTool(name, description, parameters, strict is True)


def _tool_choice(raw: object, tools: tuple[FunctionTool, ...]) -> ToolChoice:
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    if raw in ("none", "auto", "required"):
        choice = ToolChoice(raw)  # type: ignore[arg-type]
    else:
        function = raw.get("function") if isinstance(raw, dict) else None
        if (
            not isinstance(raw, dict)
            or raw.get("type") != "function"
            or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)
        ):
            raise ValidationError(
                '`tool_choice` must be "none", "auto", "required" or {"type": "function", "function": '
                '{"name": ...}}',
                "tool_choice",
            )
        choice = ToolChoice("function", function["name"])
        if tools and choice.function not in {t.name for t in tools}:
            raise ValidationError(
                f"`tool_choice` names {choice.function!r}, which is not in `tools`", "tool_choice"
            )
    if choice.mode in ("required", "function") and not tools:
        raise ValidationError(
            f"`tool_choice` {raw if isinstance(raw, str) else 'function'} needs `tools`", "tool_choice"
        )
    return choice


def parse_turn(fields: Fields, options: Options) -> Turn:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` (with ``response_format``'s constraint) ->
    the neutral Turn."""
    raw = fields.raw("tools")
    tools: tuple[FunctionTool, ...] = ()
    if raw is not None:
        if not isinstance(raw, list):
            raise ValidationError("`tools` must be an array of function tools", "tools")
        tools = tuple(_function_tool(t, i) for i, t in enumerate(raw))
        check_tools(tools)
    choice = _tool_choice(fields.raw("tool_choice"), tools)
    parallel = fields.bool("parallel_tool_calls", True)
    return Turn(tools, choice, parallel, options.constraint)


def build_requests(
    infer: Infer, inputs: str, ids: list[int], options: Options, count: int, top_n: int, prompt_logprobs: bool,
    echo: bool, keep_special_ids: frozenset[int] = frozenset(),
) -> list[ValidRequest]:  # fmt: skip
    """``count`` requests for one prompt: seeds seed, seed + 1, ... (or random) when sampling."""
    max_new = infer.validator.new_tokens_budget(len(ids), options.max_tokens, "max_tokens")
    if options.min_tokens > max_new:
        raise ValidationError(f"`min_tokens` ({options.min_tokens}) must be <= {max_new}", "min_tokens")
    out = []
    for i in range(count):
        if options.params.sampling:
            seed = (options.seed + i) % 2**64 if options.seed is not None else random.getrandbits(64)
        else:
            seed = 0
        out.append(
            ValidRequest(
                inputs=inputs,
                input_ids=ids,
                parameters=replace(options.params, seed=seed),
                max_new_tokens=max_new,
                stop=options.stop,
                details=True,
                decoder_input_details=prompt_logprobs,
                top_n_tokens=top_n,
                return_full_text=echo,
                seed=seed if options.params.sampling else None,
                ignore_eos_token=options.ignore_eos,
                include_stop=False,
                min_new_tokens=options.min_tokens,
                stop_token_ids=options.stop_token_ids,
                skip_special_tokens=options.skip_special_tokens,
                keep_special_ids=keep_special_ids,
                cache_salt=options.cache_salt,
                adapter_id=options.adapter_id,
            )
        )
    return out
