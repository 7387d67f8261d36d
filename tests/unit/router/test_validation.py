"""router/validation.py: TGI v0.9.4's parameter rules and messages, strict JSON types, token lengths.

Every failure is a ``router.errors.ValidationError`` (HTTP 422, ``error_type`` "validation") whose message
starts with "Input validation error: " and names the field in backticks.
"""

from __future__ import annotations

import asyncio
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from router.config import RouterConfig
from router.errors import ValidationError
from router.tokenizer import Tokenizer
from router.validation import (
    U64_MAX,
    GenerateParameters,
    SamplingParams,
    Validator,
    ValidRequest,
    parse_parameters,
)

pytestmark = pytest.mark.timeout(60)

MAX_INPUT = 32
MAX_TOTAL = 48
PREFIX = "Input validation error: "


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_model_dir)


def make_config(tiny_model_dir: Path, **overrides: object) -> RouterConfig:
    values: dict[str, object] = {
        "tokenizer_name": str(tiny_model_dir),
        "model_id": "tiny",
        "max_best_of": 2,
        "max_stop_sequences": 4,
        "max_top_n_tokens": 5,
        "max_input_length": MAX_INPUT,
        "max_total_tokens": MAX_TOTAL,
        "validation_workers": 2,
    }
    values.update(overrides)
    return RouterConfig(**values)


@pytest.fixture(scope="module")
def validator(tiny_model_dir: Path, tokenizer: Tokenizer):
    v = Validator(make_config(tiny_model_dir), tokenizer)
    yield v
    v.close()


def message(excinfo: pytest.ExceptionInfo[ValidationError]) -> str:
    err = excinfo.value
    assert isinstance(err, ValidationError)
    assert err.status == 422
    assert err.error_type == "validation"
    assert err.message.startswith(PREFIX)
    assert str(err) == err.message
    assert err.body() == {"error": err.message, "error_type": "validation"}
    return err.message[len(PREFIX) :]


def names_field(text: str, field: str) -> bool:
    return f"`{field}`" in text


def check(validator: Validator, stream: bool = False, **params: object) -> SamplingParams:
    return validator.check_parameters(parse_parameters(params), stream)


def check_error(validator: Validator, stream: bool = False, **params: object) -> str:
    with pytest.raises(ValidationError) as excinfo:
        check(validator, stream, **params)
    return message(excinfo)


# --------------------------------------------------------------------------------------------- JSON types


def test_parameters_absent_or_empty() -> None:
    assert parse_parameters(None) == GenerateParameters()
    assert parse_parameters({}) == GenerateParameters()


@pytest.mark.parametrize("value", [[], "x", 3, True, 1.5])
def test_parameters_must_be_an_object(value: object) -> None:
    with pytest.raises(ValidationError) as excinfo:
        parse_parameters(value)
    assert names_field(message(excinfo), "parameters")


def test_unknown_keys_are_ignored() -> None:
    assert parse_parameters({"foo": 1, "bar": [1, 2]}) == GenerateParameters()


def test_every_field_is_parsed() -> None:
    params = parse_parameters(
        {
            "best_of": 2,
            "temperature": 0.5,
            "repetition_penalty": 1.2,
            "frequency_penalty": 0.1,
            "presence_penalty": -0.1,
            "top_k": 10,
            "top_p": 0.9,
            "typical_p": 0.8,
            "do_sample": True,
            "max_new_tokens": 7,
            "return_full_text": True,
            "stop": ["a", "b"],
            "truncate": 5,
            "watermark": False,
            "details": True,
            "decoder_input_details": True,
            "seed": 42,
            "top_n_tokens": 3,
            "ignore_eos_token": True,
            "cache_salt": "tenant-a",
        }
    )
    assert params == GenerateParameters(
        best_of=2,
        temperature=0.5,
        repetition_penalty=1.2,
        frequency_penalty=0.1,
        presence_penalty=-0.1,
        top_k=10,
        top_p=0.9,
        typical_p=0.8,
        do_sample=True,
        max_new_tokens=7,
        return_full_text=True,
        stop=["a", "b"],
        truncate=5,
        watermark=False,
        details=True,
        decoder_input_details=True,
        seed=42,
        top_n_tokens=3,
        ignore_eos_token=True,
        cache_salt="tenant-a",
    )


def test_nulls_mean_not_given() -> None:
    fields = [
        "best_of",
        "temperature",
        "repetition_penalty",
        "frequency_penalty",
        "presence_penalty",
        "top_k",
        "top_p",
        "typical_p",
        "do_sample",
        "max_new_tokens",
        "return_full_text",
        "stop",
        "truncate",
        "watermark",
        "details",
        "decoder_input_details",
        "seed",
        "top_n_tokens",
        "ignore_eos_token",
        "cache_salt",
    ]
    assert parse_parameters(dict.fromkeys(fields)) == GenerateParameters()


INT_FIELDS = ["best_of", "top_k", "max_new_tokens", "truncate", "seed", "top_n_tokens"]
FLOAT_FIELDS = [
    "temperature",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "top_p",
    "typical_p",
]
BOOL_FIELDS = [
    "do_sample",
    "return_full_text",
    "watermark",
    "details",
    "decoder_input_details",
    "ignore_eos_token",
]


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [1.0, 2.5, True, False, "3", [3], {"v": 3}])
def test_integer_fields_reject_other_types(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as excinfo:
        parse_parameters({field: value})
    text = message(excinfo)
    assert names_field(text, field)
    assert "integer" in text


@pytest.mark.parametrize("field", INT_FIELDS)
def test_integer_fields_reject_negatives(field: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        parse_parameters({field: -1})
    text = message(excinfo)
    assert names_field(text, field)
    assert "Given: -1" in text


def test_integer_upper_bounds() -> None:
    assert parse_parameters({"seed": U64_MAX}).seed == U64_MAX
    assert parse_parameters({"seed": 0}).seed == 0
    with pytest.raises(ValidationError) as excinfo:
        parse_parameters({"seed": U64_MAX + 1})
    assert names_field(message(excinfo), "seed")
    for field in ("top_k", "max_new_tokens", "truncate", "top_n_tokens", "best_of"):
        assert getattr(parse_parameters({field: 2**32 - 1}), field) == 2**32 - 1
        with pytest.raises(ValidationError) as excinfo:
            parse_parameters({field: 2**32})
        text = message(excinfo)
        assert names_field(text, field)
        assert f"Given: {2**32}" in text


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [True, False, "0.5", [0.5], {"v": 0.5}])
def test_number_fields_reject_other_types(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as excinfo:
        parse_parameters({field: value})
    text = message(excinfo)
    assert names_field(text, field)
    assert "number" in text


@pytest.mark.parametrize("field", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_number_fields_reject_non_finite(field: str, value: float) -> None:
    with pytest.raises(ValidationError) as excinfo:
        parse_parameters({field: value})
    assert names_field(message(excinfo), field)


@pytest.mark.parametrize("field", FLOAT_FIELDS)
def test_number_fields_accept_integers_as_floats(field: str) -> None:
    value = getattr(parse_parameters({field: 1}), field)
    assert value == 1.0 and isinstance(value, float)


@pytest.mark.parametrize("field", BOOL_FIELDS)
@pytest.mark.parametrize("value", [1, 0, "true", 1.0, [True]])
def test_boolean_fields_reject_other_types(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as excinfo:
        parse_parameters({field: value})
    text = message(excinfo)
    assert names_field(text, field)
    assert "boolean" in text


def test_return_full_text_keeps_none_when_absent() -> None:
    assert parse_parameters({}).return_full_text is None
    assert parse_parameters({"return_full_text": False}).return_full_text is False


@pytest.mark.parametrize("value", [[1], ["a", 2], {"a": "b"}, 5, True, [None]])
def test_stop_must_be_strings(value: object) -> None:
    with pytest.raises(ValidationError) as excinfo:
        parse_parameters({"stop": value})
    assert names_field(message(excinfo), "stop")


def test_stop_accepts_string_and_list() -> None:
    assert parse_parameters({"stop": "###"}).stop == ["###"]
    assert parse_parameters({"stop": ["a", "b"]}).stop == ["a", "b"]
    assert parse_parameters({"stop": []}).stop == []


@pytest.mark.parametrize("field", ["grammar", "adapter_id"])
def test_unsupported_features_are_422(field: str) -> None:
    """An unknown grammar type, a non-string adapter_id (an unknown adapter's name: tests/unit/router/test_lora.py)."""
    with pytest.raises(ValidationError) as excinfo:
        parse_parameters({field: {"type": "yaml", "value": {}} if field == "grammar" else ["lora"]})
    assert names_field(message(excinfo), field)


# --------------------------------------------------------------------------------------------- TGI rules


def test_defaults(validator: Validator) -> None:
    chooser = check(validator)
    assert chooser == SamplingParams(seed=0)
    assert not chooser.sampling


@pytest.mark.parametrize(
    ("params", "field", "expected"),
    [
        ({"temperature": 0.0}, "temperature", "`temperature` must be strictly positive"),
        ({"temperature": -1.0}, "temperature", "`temperature` must be strictly positive"),
        ({"repetition_penalty": 0.0}, "repetition_penalty", "`repetition_penalty` must be strictly positive"),
        (
            {"repetition_penalty": -0.5},
            "repetition_penalty",
            "`repetition_penalty` must be strictly positive",
        ),
        ({"frequency_penalty": 2.01}, "frequency_penalty", "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"frequency_penalty": -2.5}, "frequency_penalty", "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"presence_penalty": 3}, "presence_penalty", "`presence_penalty` must be >= -2.0 and <= 2.0"),
        ({"presence_penalty": -2.001}, "presence_penalty", "`presence_penalty` must be >= -2.0 and <= 2.0"),
        ({"top_p": 0.0}, "top_p", None),
        ({"top_p": -0.1}, "top_p", None),
        ({"top_p": 1.5}, "top_p", None),
        ({"typical_p": 0.0}, "typical_p", None),
        ({"typical_p": 1.01}, "typical_p", None),
        ({"top_k": 0}, "top_k", "`top_k` must be strictly positive"),
        ({"max_new_tokens": 0}, "max_new_tokens", "`max_new_tokens` must be strictly positive"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"top_n_tokens": 6}, "top_n_tokens", "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
        ({"watermark": True}, "watermark", None),
        (
            {"truncate": 0},
            "truncate",
            f"`truncate` must be strictly positive and less than {MAX_INPUT}. Given: 0",
        ),
        (
            {"truncate": MAX_INPUT + 1},
            "truncate",
            f"`truncate` must be strictly positive and less than {MAX_INPUT}. Given: {MAX_INPUT + 1}",
        ),
        ({"best_of": 0}, "best_of", "`best_of` must be > 0 and <= 2. Given: 0"),
        ({"best_of": 3, "do_sample": True}, "best_of", "`best_of` must be > 0 and <= 2. Given: 3"),
        ({"best_of": 2}, "best_of", "you must use sampling when `best_of` is > 1"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, "seed", "`seed` must not be set when `best_of` > 1"),
    ],
)
def test_rule_messages(validator: Validator, params: dict, field: str, expected: str | None) -> None:
    text = check_error(validator, **params)
    assert names_field(text, field), text
    if expected is not None:
        assert text == expected


@pytest.mark.parametrize(
    ("params", "field", "expected"),
    [
        (
            {"best_of": 2, "do_sample": True},
            "best_of",
            "`best_of` != 1 is not supported when streaming tokens",
        ),
        (
            {"decoder_input_details": True},
            "decoder_input_details",
            "`decoder_input_details` == true is not supported when streaming tokens",
        ),
    ],
)
def test_streaming_rules(validator: Validator, params: dict, field: str, expected: str) -> None:
    assert check_error(validator, stream=True, **params) == expected
    check(validator, stream=False, **params)  # fine without streaming


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1e-4},
        {"temperature": 100.0},
        {"repetition_penalty": 1e-3},
        {"frequency_penalty": 2.0},
        {"frequency_penalty": -2.0},
        {"presence_penalty": 2},
        {"presence_penalty": -2},
        {"top_p": 1e-6},
        {"top_p": 0.999},
        {"typical_p": 0.5},
        {"top_k": 1},
        {"top_k": 2**32 - 1},
        {"max_new_tokens": 1},
        {"stop": ["a", "b", "c", "d"]},
        {"top_n_tokens": 0},
        {"top_n_tokens": 5},
        {"truncate": 1},
        {"truncate": MAX_INPUT},
        {"best_of": 1},
        {"best_of": 1, "seed": 5},
        {"best_of": 2, "temperature": 0.5},
        {"best_of": 2, "top_k": 4},
        {"best_of": 2, "top_p": 0.5},
        {"best_of": 2, "typical_p": 0.5},
        {"watermark": False},
    ],
)
def test_values_at_the_limits_are_accepted(validator: Validator, params: dict) -> None:
    check(validator, **params)


@pytest.mark.parametrize(
    ("field", "expected"),
    [("top_p", "`top_p` must be > 0.0 and <= 1.0"), ("typical_p", "`typical_p` must be > 0.0 and <= 1.0")],
)
def test_top_p_and_typical_p_accept_one_as_off(validator: Validator, field: str, expected: str) -> None:
    """Deliberately more lenient than TGI v0.9.4 (which rejects 1.0): 1.0 means the warper is off, as in
    transformers and the OpenAI API, so it does not switch sampling on."""
    chooser = validator.check_parameters(parse_parameters({field: 1.0}), stream=False)
    assert getattr(chooser, field) == 1.0 and not chooser.sampling
    assert check_error(validator, **{field: 1.5}) == expected


def test_best_of_disabled_when_max_best_of_is_one(tiny_model_dir: Path, tokenizer: Tokenizer) -> None:
    v = Validator(make_config(tiny_model_dir, max_best_of=1), tokenizer)
    try:
        text = check_error(v, best_of=2, do_sample=True)
        assert text == "`best_of` != 1 is not allowed for this endpoint"
        check(v, best_of=1)
    finally:
        v.close()


def test_limits_come_from_the_config(tiny_model_dir: Path, tokenizer: Tokenizer) -> None:
    v = Validator(
        make_config(
            tiny_model_dir, max_stop_sequences=1, max_top_n_tokens=2, max_best_of=4, max_input_length=8
        ),
        tokenizer,
    )
    try:
        assert check_error(v, stop=["a", "b"]) == "`stop` supports up to 1 stop sequences. Given: 2"
        assert check_error(v, top_n_tokens=3) == "`top_n_tokens` must be >= 0 and <= 2. Given: 3"
        assert check_error(v, best_of=5, do_sample=True) == "`best_of` must be > 0 and <= 4. Given: 5"
        assert check_error(v, truncate=9) == "`truncate` must be strictly positive and less than 8. Given: 9"
        check(v, best_of=4, do_sample=True)
    finally:
        v.close()


def test_every_message_names_a_field(validator: Validator) -> None:
    bad = [
        {"temperature": 0},
        {"repetition_penalty": 0},
        {"frequency_penalty": 9},
        {"presence_penalty": 9},
        {"top_p": 0},
        {"typical_p": 0},
        {"top_k": 0},
        {"max_new_tokens": 0},
        {"stop": ["1", "2", "3", "4", "5"]},
        {"top_n_tokens": 9},
        {"watermark": True},
        {"truncate": 0},
        {"best_of": 0},
        {"best_of": 9},
        {"best_of": 2},
        {"best_of": 2, "do_sample": True, "seed": 3},
    ]
    for params in bad:
        text = check_error(validator, **params)
        assert re.search(r"`[a-z_]+`", text), (params, text)


def test_chooser_values(validator: Validator) -> None:
    chooser = check(
        validator,
        temperature=0.5,
        top_k=7,
        top_p=0.9,
        typical_p=0.8,
        repetition_penalty=1.3,
        frequency_penalty=0.2,
        presence_penalty=-0.4,
        do_sample=True,
        seed=123,
    )
    assert chooser == SamplingParams(
        temperature=0.5,
        top_k=7,
        top_p=0.9,
        typical_p=0.8,
        do_sample=True,
        seed=123,
        repetition_penalty=1.3,
        frequency_penalty=0.2,
        presence_penalty=-0.4,
    )
    assert chooser.sampling


@pytest.mark.parametrize(
    "params",
    [{"do_sample": True}, {"temperature": 0.7}, {"top_k": 5}, {"top_p": 0.5}, {"typical_p": 0.5}],
)
def test_seed_generated_when_sampling(validator: Validator, params: dict) -> None:
    seeds = {check(validator, **params).seed for _ in range(8)}
    assert len(seeds) > 1  # random 64-bit seeds
    assert all(0 <= s <= U64_MAX for s in seeds)
    assert check(validator, **params, seed=77).seed == 77


def test_seed_not_drawn_when_greedy(validator: Validator) -> None:
    chooser = check(validator, repetition_penalty=1.5)
    assert not chooser.sampling
    assert chooser.seed == 0
    assert check(validator, seed=9).seed == 9


# --------------------------------------------------------------------------------------------- lengths


def test_check_lengths_total_tokens_message_has_both_numbers(validator: Validator) -> None:
    p = parse_parameters({"max_new_tokens": 40})
    chooser = validator.check_parameters(p, False)
    with pytest.raises(ValidationError) as excinfo:
        validator.check_lengths("x", list(range(10)), p, chooser)
    assert message(excinfo) == (
        f"`inputs` tokens + `max_new_tokens` must be <= {MAX_TOTAL}. "
        "Given: 10 `inputs` tokens and 40 `max_new_tokens`"
    )
    # Exactly at the limit is fine.
    request = validator.check_lengths("x", list(range(8)), p, chooser)
    assert request.input_length == 8 and request.max_new_tokens == 40


def test_check_lengths_default_max_new_tokens(validator: Validator) -> None:
    p = parse_parameters({})
    chooser = validator.check_parameters(p, False)
    with pytest.raises(ValidationError) as excinfo:
        validator.check_lengths("x", list(range(MAX_TOTAL - 19)), p, chooser)
    assert message(excinfo) == (
        f"`inputs` tokens + `max_new_tokens` must be <= {MAX_TOTAL}. "
        f"Given: {MAX_TOTAL - 19} `inputs` tokens and 20 `max_new_tokens`"
    )
    assert validator.check_lengths("x", list(range(MAX_TOTAL - 20)), p, chooser).max_new_tokens == 20


def test_check_lengths_input_length(validator: Validator) -> None:
    p = parse_parameters({"max_new_tokens": 1})
    chooser = validator.check_parameters(p, False)
    with pytest.raises(ValidationError) as excinfo:
        validator.check_lengths("x", list(range(MAX_INPUT + 1)), p, chooser)
    assert message(excinfo) == f"`inputs` must have less than {MAX_INPUT} tokens. Given: {MAX_INPUT + 1}"
    assert validator.check_lengths("x", list(range(MAX_INPUT)), p, chooser).input_length == MAX_INPUT


def test_check_lengths_total_checked_before_input_length(validator: Validator) -> None:
    """TGI's order: the total-tokens check comes first."""
    p = parse_parameters({"max_new_tokens": 20})
    chooser = validator.check_parameters(p, False)
    with pytest.raises(ValidationError) as excinfo:
        validator.check_lengths("x", list(range(MAX_INPUT + 1)), p, chooser)
    assert message(excinfo).startswith("`inputs` tokens + `max_new_tokens`")


def test_check_lengths_empty_ids(validator: Validator) -> None:
    p = parse_parameters({})
    with pytest.raises(ValidationError) as excinfo:
        validator.check_lengths("x", [], p, validator.check_parameters(p, False))
    assert message(excinfo) == "`inputs` cannot be empty"


def test_check_lengths_builds_the_request(validator: Validator) -> None:
    p = parse_parameters(
        {
            "max_new_tokens": 5,
            "stop": ["x"],
            "details": True,
            "decoder_input_details": True,
            "top_n_tokens": 2,
            "ignore_eos_token": True,
            "do_sample": True,
            "seed": 31,
        }
    )
    chooser = validator.check_parameters(p, False)
    request = validator.check_lengths("hello", [1, 2, 3], p, chooser)
    assert request == ValidRequest(
        inputs="hello",
        input_ids=[1, 2, 3],
        parameters=chooser,
        max_new_tokens=5,
        stop=["x"],
        details=True,
        decoder_input_details=True,
        top_n_tokens=2,
        return_full_text=False,
        seed=31,
        ignore_eos_token=True,
    )
    assert request.stop is not p.stop  # a copy
    # return_full_text: the endpoint default unless given.
    assert validator.check_lengths("h", [1], p, chooser, return_full_text_default=True).return_full_text
    p2 = replace(p, return_full_text=False)
    assert not validator.check_lengths("h", [1], p2, chooser, return_full_text_default=True).return_full_text


# --------------------------------------------------------------------------------------------- validate


async def test_validate_tokenizes(validator: Validator, tokenizer: Tokenizer) -> None:
    text = "Hello world! café 東京"
    request = await validator.validate(text, parse_parameters({"max_new_tokens": 3}), stream=False)
    assert request.inputs == text
    assert request.input_ids == tokenizer.encode(text)
    assert request.max_new_tokens == 3
    assert request.seed is None  # greedy
    assert request.top_n_tokens == 0
    assert request.return_full_text is False


async def test_validate_seed_in_request(validator: Validator) -> None:
    sampled = await validator.validate("Hello", parse_parameters({"do_sample": True}), stream=False)
    assert sampled.seed is not None and sampled.seed == sampled.parameters.seed
    seeded = await validator.validate("Hello", parse_parameters({"temperature": 0.5, "seed": 3}), stream=True)
    assert seeded.seed == 3
    greedy = await validator.validate("Hello", parse_parameters({"seed": 3}), stream=False)
    assert greedy.seed is None


@pytest.mark.parametrize("inputs", [None, 5, ["a"], {"a": 1}, True])
async def test_validate_inputs_must_be_a_string(validator: Validator, inputs: object) -> None:
    with pytest.raises(ValidationError) as excinfo:
        await validator.validate(inputs, parse_parameters({}), stream=False)
    assert names_field(message(excinfo), "inputs")


async def test_validate_empty_inputs(validator: Validator) -> None:
    with pytest.raises(ValidationError) as excinfo:
        await validator.validate("", parse_parameters({}), stream=False)
    assert message(excinfo) == "`inputs` cannot be empty"


async def test_validate_runs_parameter_rules(validator: Validator) -> None:
    with pytest.raises(ValidationError) as excinfo:
        await validator.validate("Hello", parse_parameters({"temperature": 0}), stream=False)
    assert message(excinfo) == "`temperature` must be strictly positive"


async def test_truncate_keeps_the_last_tokens(validator: Validator, tokenizer: Tokenizer) -> None:
    text = "The capital of France is Paris. The capital of Germany is Berlin. 🤗 done"
    ids = tokenizer.encode(text)
    assert len(ids) > 10
    request = await validator.validate(
        text, parse_parameters({"truncate": 6, "max_new_tokens": 2}), stream=False
    )
    assert request.input_ids == ids[-6:]
    assert request.input_length == 6
    assert request.inputs == tokenizer.decode(ids[-6:])
    assert text.endswith(request.inputs)


async def test_truncate_longer_than_prompt_changes_nothing(
    validator: Validator, tokenizer: Tokenizer
) -> None:
    text = "Hello world"
    request = await validator.validate(text, parse_parameters({"truncate": MAX_INPUT}), stream=False)
    assert request.input_ids == tokenizer.encode(text)
    assert request.inputs == text


async def test_lengths_measured_after_truncation(validator: Validator, tokenizer: Tokenizer) -> None:
    text = " ".join(["Paris"] * (MAX_INPUT + 10))
    assert len(tokenizer.encode(text)) > MAX_INPUT
    with pytest.raises(ValidationError) as excinfo:
        await validator.validate(text, parse_parameters({"max_new_tokens": 1}), stream=False)
    n = len(tokenizer.encode(text))
    assert message(excinfo) == f"`inputs` must have less than {MAX_INPUT} tokens. Given: {n}"
    request = await validator.validate(
        text, parse_parameters({"truncate": 10, "max_new_tokens": MAX_TOTAL - 10}), stream=False
    )
    assert request.input_length == 10
    with pytest.raises(ValidationError) as excinfo:
        await validator.validate(
            text, parse_parameters({"truncate": 10, "max_new_tokens": MAX_TOTAL - 9}), stream=False
        )
    assert message(excinfo) == (
        f"`inputs` tokens + `max_new_tokens` must be <= {MAX_TOTAL}. "
        f"Given: 10 `inputs` tokens and {MAX_TOTAL - 9} `max_new_tokens`"
    )


async def test_validate_concurrently(validator: Validator, tokenizer: Tokenizer) -> None:
    texts = [f"request number {i} café" for i in range(20)]
    results = await asyncio.gather(
        *(validator.validate(t, parse_parameters({"max_new_tokens": 2}), stream=False) for t in texts)
    )
    assert [r.inputs for r in results] == texts
    assert [r.input_ids for r in results] == [tokenizer.encode(t) for t in texts]
