"""OpenAI request bodies -> validated options and ``ValidRequest``s (strict types; unknown fields refused)."""

from __future__ import annotations

import builtins
import json
import math
import random
from dataclasses import dataclass, replace
from typing import Any

from common.params import SamplingParams

from .errors import InferError, ValidationError
from .grammar import from_response_format
from .infer import Infer
from .validation import U64_MAX, ValidRequest, check_cache_salt

# Fields accepted without effect: they change nothing a model computes.
ACCEPTED_NOOP = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
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
        unknown = sorted(set(self.body) - self.seen - set(ACCEPTED_NOOP))
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
    min_tokens: int
    ignore_eos: bool
    stop_token_ids: tuple[int, ...]
    skip_special_tokens: bool
    # Prefix-cache salt (vLLM's): "" = none.
    cache_salt: str = ""


def check_model(fields: Fields, infer: Infer) -> str:
    names = infer.config.model_names
    model = fields.raw("model")
    if model is None:
        return names[0]
    if not isinstance(model, str):
        raise ValidationError("`model` must be a string", "model")
    if model not in names:
        raise ModelNotFoundError(
            f"The model `{model}` does not exist. This server serves: {', '.join(names)}"
        )
    return model


def parse_options(fields: Fields, infer: Infer, max_n: int) -> Options:
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
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
            raise ValidationError("`stream_options` supports only `include_usage`", "stream_options")
        if not stream:
            raise ValidationError("`stream_options` needs `stream: true`", "stream_options")
        include_usage = Fields(stream_options).bool("include_usage", False)
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
        min_tokens=min_tokens,
        ignore_eos=fields.bool("ignore_eos", False),
        stop_token_ids=tuple(stop_token_ids),
        skip_special_tokens=fields.bool("skip_special_tokens", True),
        cache_salt=check_cache_salt(fields.raw("cache_salt")) or "",
    )


def refuse_unsupported(fields: Fields) -> None:
    """Features this server does not have yet: a clear 400, never a silent unconstrained answer."""
    tools = fields.raw("tools")
    if tools:
        raise ValidationError("`tools` are not supported yet", "tools")
    tool_choice = fields.raw("tool_choice")
    if tool_choice not in (None, "none", "auto"):
        raise ValidationError("`tool_choice` needs `tools`, which are not supported yet", "tool_choice")
    for name in (
        "functions",
        "function_call",
        "audio",
        "prediction",
        "web_search_options",
        "reasoning_effort",
    ):
        if fields.raw(name) is not None:
            raise ValidationError(f"`{name}` is not supported", name)
    modalities = fields.raw("modalities")
    if modalities not in (None, ["text"]):
        raise ValidationError('`modalities` supports only ["text"]', "modalities")


def build_requests(
    infer: Infer, inputs: str, ids: list[int], options: Options, count: int, top_n: int, prompt_logprobs: bool,
    echo: bool,
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
                cache_salt=options.cache_salt,
            )
        )
    return out
