"""Request validation: TGI v0.9.4's parameter rules and messages, strict JSON types, token-length checks.

Every rule failure is a ``ValidationError`` (HTTP 422) whose message names the field. Tokenization runs
on a small thread pool, off the event loop.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from common.faults import FAULTS
from common.params import SamplingParams

from .config import RouterConfig
from .errors import ContextLengthError, ValidationError
from .grammar import from_tgi
from .tokenizer import Tokenizer

U64_MAX = 2**64 - 1
# The longest `cache_salt` a request may send (characters).
MAX_CACHE_SALT = 256
T = TypeVar("T")


@dataclass(frozen=True)
class GenerateParameters:
    """TGI's ``parameters`` object after type checks (None = not given)."""

    best_of: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    do_sample: bool = False
    max_new_tokens: int | None = None
    return_full_text: bool | None = None
    stop: list[str] = field(default_factory=list)
    truncate: int | None = None
    watermark: bool = False
    # The `grammar` processor's canonical argument (router/grammar.py), None = unconstrained.
    grammar: str | None = None
    details: bool = False
    decoder_input_details: bool = False
    seed: int | None = None
    top_n_tokens: int | None = None
    ignore_eos_token: bool = False
    # Test-only fault hook, as given (checked only when the server runs with --fault-injection).
    fault: object = None
    # Prefix-cache salt: only requests with the same salt share cached prompt blocks (None = not given).
    cache_salt: str | None = None
    # TGI's LoRA adapter (one of InfoResponse.lora_adapters; None = the base model).
    adapter_id: str | None = None


@dataclass(frozen=True)
class ValidRequest:
    """A request ready for the queue: tokenized, truncated, every limit checked."""

    inputs: str
    input_ids: list[int]
    parameters: SamplingParams
    max_new_tokens: int
    stop: list[str]
    details: bool
    decoder_input_details: bool
    top_n_tokens: int
    return_full_text: bool
    seed: int | None
    ignore_eos_token: bool = False
    # TGI keeps a matched stop string in the text; OpenAI drops it.
    include_stop: bool = True
    # No end of sequence (EOS, stop_token_ids, stop strings) before this many tokens.
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    skip_special_tokens: bool = True
    # Special tokens kept in the text even when skipping them (the markers a tool-call or reasoning parser
    # reads, router/agent.py).
    keep_special_ids: frozenset[int] = frozenset()
    # Test-only fault hook for the shard (see shard/faults.py); "" = none.
    fault: str = ""
    # Prefix-cache salt ("" = none): the shard shares cached prompt blocks only between equal salts.
    cache_salt: str = ""
    # The LoRA adapter it runs with ("" = the base model).
    adapter_id: str = ""

    @property
    def input_length(self) -> int:
        return len(self.input_ids)


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}.get(
        type(value), "an object"
    )


def _get_int(params: dict[str, Any], name: str, maximum: int | None = None) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"`{name}` must be an integer, got {_type_name(value)}")
    if value < 0 or (maximum is not None and value > maximum):
        raise ValidationError(
            f"`{name}` must be an integer between 0 and {maximum or U64_MAX}. Given: {value}"
        )
    return value


def _get_float(params: dict[str, Any], name: str) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"`{name}` must be a number, got {_type_name(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValidationError(f"`{name}` must be a finite number")
    return value


def _get_bool(params: dict[str, Any], name: str, default: bool | None = False) -> bool | None:
    value = params.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValidationError(f"`{name}` must be a boolean, got {_type_name(value)}")
    return value


def check_cache_salt(value: object) -> str | None:
    """vLLM's ``cache_salt``: a non-empty string of at most MAX_CACHE_SALT characters (None = not given)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > MAX_CACHE_SALT:
        given = f"{_type_name(value)}" if not isinstance(value, str) else f"{len(value)} characters"
        raise ValidationError(
            f"`cache_salt` must be a non-empty string of at most {MAX_CACHE_SALT} characters. Given: {given}",
            "cache_salt",
        )
    return value


def parse_parameters(params: object) -> GenerateParameters:
    """Checks the JSON types of TGI's ``parameters`` object (unknown keys are ignored, as TGI does)."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ValidationError(f"`parameters` must be an object, got {_type_name(params)}")
    stop = params.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise ValidationError("`stop` must be an array of strings")
    adapter_id = params.get("adapter_id")
    if adapter_id is not None and not isinstance(adapter_id, str):
        raise ValidationError(f"`adapter_id` must be a string, got {_type_name(adapter_id)}", "adapter_id")
    return GenerateParameters(
        best_of=_get_int(params, "best_of", 2**32 - 1),
        temperature=_get_float(params, "temperature"),
        repetition_penalty=_get_float(params, "repetition_penalty"),
        frequency_penalty=_get_float(params, "frequency_penalty"),
        presence_penalty=_get_float(params, "presence_penalty"),
        top_k=_get_int(params, "top_k", 2**32 - 1),
        top_p=_get_float(params, "top_p"),
        typical_p=_get_float(params, "typical_p"),
        do_sample=bool(_get_bool(params, "do_sample")),
        max_new_tokens=_get_int(params, "max_new_tokens", 2**32 - 1),
        return_full_text=_get_bool(params, "return_full_text", None),
        stop=stop,
        truncate=_get_int(params, "truncate", 2**32 - 1),
        watermark=bool(_get_bool(params, "watermark")),
        grammar=from_tgi(params.get("grammar")),
        details=bool(_get_bool(params, "details")),
        decoder_input_details=bool(_get_bool(params, "decoder_input_details")),
        seed=_get_int(params, "seed", U64_MAX),
        top_n_tokens=_get_int(params, "top_n_tokens", 2**32 - 1),
        ignore_eos_token=bool(_get_bool(params, "ignore_eos_token") or _get_bool(params, "ignore_eos")),
        fault=params.get("fault"),
        cache_salt=check_cache_salt(params.get("cache_salt")),
        adapter_id=adapter_id or None,
    )


class Validator:
    """Applies the server's limits to parsed parameters and tokenizes the prompt off the event loop."""

    def __init__(
        self,
        config: RouterConfig,
        tokenizer: Tokenizer,
        unsupported: Iterable[str] = (),
        backend: str = "",
        processors: Iterable[str] = (),
        adapters: Iterable[str] = (),
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        # Parameters the shards' backend cannot honour (InfoResponse.unsupported_parameters).
        self.unsupported = frozenset(unsupported)
        self.backend = backend
        # Logits processors the shards run (InfoResponse.processors), which requests may name.
        self.processors = frozenset(processors)
        # The LoRA adapters the shards hold (InfoResponse.lora_adapters), in the order given.
        self.adapters = tuple(adapters)
        self._pool = ThreadPoolExecutor(max_workers=config.validation_workers, thread_name_prefix="tokenize")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def check_parameters(self, p: GenerateParameters, stream: bool) -> SamplingParams:
        """TGI's rules, in TGI's order, with TGI's messages."""
        c = self.config
        temperature = 1.0 if p.temperature is None else p.temperature
        top_p = 1.0 if p.top_p is None else p.top_p
        typical_p = 1.0 if p.typical_p is None else p.typical_p
        top_k = 0 if p.top_k is None else p.top_k
        sampling = SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, typical_p=typical_p, do_sample=p.do_sample
        ).sampling
        if p.best_of is not None and p.best_of > 1:
            if c.max_best_of <= 1:
                raise ValidationError("`best_of` != 1 is not allowed for this endpoint")
            if p.best_of > c.max_best_of:
                raise ValidationError(f"`best_of` must be > 0 and <= {c.max_best_of}. Given: {p.best_of}")
            if not sampling:
                raise ValidationError("you must use sampling when `best_of` is > 1")
            if p.seed is not None:
                raise ValidationError("`seed` must not be set when `best_of` > 1")
            if stream:
                raise ValidationError("`best_of` != 1 is not supported when streaming tokens")
        if p.best_of == 0:
            raise ValidationError(f"`best_of` must be > 0 and <= {c.max_best_of}. Given: 0")
        if temperature <= 0:
            raise ValidationError("`temperature` must be strictly positive")
        if p.repetition_penalty is not None and p.repetition_penalty <= 0:
            raise ValidationError("`repetition_penalty` must be strictly positive")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(p, name)
            if value is not None and not -2.0 <= value <= 2.0:
                raise ValidationError(f"`{name}` must be >= -2.0 and <= 2.0")
        if not 0.0 < top_p <= 1.0:
            raise ValidationError("`top_p` must be > 0.0 and <= 1.0")
        if not 0.0 < typical_p <= 1.0:
            raise ValidationError("`typical_p` must be > 0.0 and <= 1.0")
        if p.top_k is not None and p.top_k <= 0:
            raise ValidationError("`top_k` must be strictly positive")
        if p.max_new_tokens is not None and p.max_new_tokens <= 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        if len(p.stop) > c.max_stop_sequences:
            raise ValidationError(
                f"`stop` supports up to {c.max_stop_sequences} stop sequences. Given: {len(p.stop)}"
            )
        if p.top_n_tokens is not None and p.top_n_tokens > c.max_top_n_tokens:
            raise ValidationError(
                f"`top_n_tokens` must be >= 0 and <= {c.max_top_n_tokens}. Given: {p.top_n_tokens}"
            )
        if p.decoder_input_details and stream:
            raise ValidationError("`decoder_input_details` == true is not supported when streaming tokens")
        processors: list[tuple[str, str]] = []
        if p.watermark:
            self.require_processor("watermark", "watermark")
            processors.append(("watermark", ""))
        if p.grammar is not None:
            self.require_processor("grammar", "grammar")
            processors.append(("grammar", p.grammar))
        if p.truncate is not None and not 0 < p.truncate <= c.max_input_length:
            raise ValidationError(
                f"`truncate` must be strictly positive and less than {c.max_input_length}. Given: {p.truncate}"
            )
        self.check_supported(
            {
                "typical_p": typical_p < 1.0,
                "frequency_penalty": bool(p.frequency_penalty),
                "presence_penalty": bool(p.presence_penalty),
                "seed": p.seed is not None and sampling,
            }
        )
        seed = p.seed if p.seed is not None else (random.getrandbits(64) if sampling else 0)
        return SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            typical_p=typical_p,
            do_sample=p.do_sample,
            seed=seed,
            repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
            frequency_penalty=p.frequency_penalty or 0.0,
            presence_penalty=p.presence_penalty or 0.0,
            processors=tuple(sorted(processors)),
        )

    def require_processor(self, name: str, field_name: str) -> None:
        """Refuses a request field that needs the logits processor ``name`` when the shards lack it."""
        if name not in self.processors:
            raise ValidationError(
                f"`{field_name}` is not supported by this server's {self.backend or 'model'} backend",
                field_name,
            )

    def check_supported(self, used: dict[str, bool], fields: dict[str, str] | None = None) -> None:
        """Refuses a parameter the request uses (``used[name]`` true) that the backend cannot honour;
        ``fields`` renames a parameter to the request's own field name."""
        for name, on in used.items():
            if on and name in self.unsupported:
                field_name = (fields or {}).get(name, name)
                raise ValidationError(
                    f"`{field_name}` is not supported by this server's {self.backend or 'model'} backend",
                    field_name,
                )

    def fault(self, p: GenerateParameters) -> str:
        """The test-only ``fault`` hook; ignored (like any unknown key) unless --fault-injection is on."""
        if not self.config.fault_injection or p.fault is None:
            return ""
        if p.fault not in FAULTS:
            raise ValidationError(f"`fault` must be one of {', '.join(FAULTS)}. Given: {p.fault!r}")
        return str(p.fault)

    async def validate(
        self, inputs: object, p: GenerateParameters, stream: bool, return_full_text_default: bool = False
    ) -> ValidRequest:
        if not isinstance(inputs, str):
            raise ValidationError(f"`inputs` must be a string, got {_type_name(inputs)}")
        if not inputs:
            raise ValidationError("`inputs` cannot be empty")
        chooser = self.check_parameters(p, stream)
        text = inputs
        input_ids = await self.run(self.tokenizer.encode, text)
        if p.truncate is not None and len(input_ids) > p.truncate:
            input_ids = input_ids[-p.truncate :]
            text = await self.run(self.tokenizer.decode, input_ids)
        return self.check_lengths(text, input_ids, p, chooser, return_full_text_default)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs tokenizer work (encode, decode, chat templates) on the validation pool."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def new_tokens_budget(
        self, input_length: int, requested: int | None, field: str = "max_new_tokens"
    ) -> int:
        """The tokens a prompt may generate: ``requested``, or what is left of max_total_tokens when None.

        Raises ContextLengthError (both numbers in the message) when the prompt or the sum is too long."""
        c = self.config
        left = c.max_total_tokens - input_length
        if requested is not None and requested > left:
            raise ContextLengthError(
                f"`inputs` tokens + `{field}` must be <= {c.max_total_tokens}. "
                f"Given: {input_length} `inputs` tokens and {requested} `{field}`",
                field,
            )
        if input_length > c.max_input_length:
            raise ContextLengthError(
                f"`inputs` must have less than {c.max_input_length} tokens. Given: {input_length}"
            )
        if requested is None:
            return left
        return requested

    def check_lengths(
        self,
        inputs: str,
        input_ids: list[int],
        p: GenerateParameters,
        chooser: SamplingParams,
        return_full_text_default: bool = False,
    ) -> ValidRequest:
        n = len(input_ids)
        if n == 0:
            raise ValidationError("`inputs` cannot be empty")
        max_new_tokens = self.new_tokens_budget(n, p.max_new_tokens if p.max_new_tokens is not None else 20)
        return ValidRequest(
            inputs=inputs,
            input_ids=input_ids,
            parameters=chooser,
            max_new_tokens=max_new_tokens,
            stop=list(p.stop),
            details=p.details,
            decoder_input_details=p.decoder_input_details,
            top_n_tokens=p.top_n_tokens or 0,
            return_full_text=return_full_text_default if p.return_full_text is None else p.return_full_text,
            seed=chooser.seed if chooser.sampling else None,
            ignore_eos_token=p.ignore_eos_token,
            fault=self.fault(p),
            cache_salt=p.cache_salt or "",
            adapter_id=self.check_adapter(p.adapter_id),
        )

    def check_adapter(self, name: str | None) -> str:
        """TGI's ``adapter_id``: one of the adapters the shards hold ("" for None: the base model); a
        name they do not hold is a 422 naming it."""
        if name is None:
            return ""
        if name not in self.adapters:
            held = (
                f"this server holds: {', '.join(self.adapters)}"
                if self.adapters
                else "this server holds none"
            )
            raise ValidationError(
                f"`adapter_id` {name!r} is not a loaded LoRA adapter ({held})", "adapter_id"
            )
        return name
