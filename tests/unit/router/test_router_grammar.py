"""Constrained-decoding fields in the router: TGI's ``grammar`` and OpenAI's ``response_format`` ->
the ``grammar`` processor's canonical argument, and the 4xx messages (each names its field)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from common import grammar
from router.errors import ValidationError
from router.grammar import from_response_format, from_tgi
from router.openai_params import Fields, parse_options
from router.tokenizer import Tokenizer
from router.validation import Validator, parse_parameters

from .test_validation import make_config

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def refused(fn: Any, value: Any, field: str) -> str:
    with pytest.raises(ValidationError) as excinfo:
        fn(value)
    err = excinfo.value
    assert err.status == 422 and err.param == field and f"`{field}" in err.message, err.message
    return err.message


def test_tgi_grammar_spellings() -> None:
    assert from_tgi(None) is None
    expected = grammar.canonical("json", SCHEMA)
    assert from_tgi({"type": "json", "value": SCHEMA}) == expected
    assert from_tgi({"type": "json", "value": json.dumps(SCHEMA)}) == expected  # the schema as JSON text
    assert from_tgi({"type": "json_object", "value": SCHEMA}) == expected  # TGI's alias
    assert from_tgi({"type": "json_schema", "value": {"name": "p", "schema": SCHEMA}}) == expected
    assert from_tgi({"type": "json_object"}) == grammar.canonical("json_object")
    assert from_tgi({"type": "regex", "value": r"\d{3}"}) == grammar.canonical("regex", r"\d{3}")


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("json", "must be an object"),
        ({"type": "yaml", "value": "a"}, "json, json_schema, regex"),
        ({"type": "regex", "value": ""}, "non-empty pattern"),
        ({"type": "regex", "value": "[a-"}, "not valid: "),
        ({"type": "json", "value": "{not json"}, "not valid JSON"),
        ({"type": "json", "value": [1]}, "JSON schema object"),
        ({"type": "json", "value": {"type": "strin"}}, "Invalid type"),
        ({"type": "json", "value": {"not": {"type": "string"}}}, "Unimplemented keys"),
        ({"type": "json", "value": {"$ref": "#/nowhere"}}, "not valid"),
        ({"type": "json_schema", "value": SCHEMA}, "needs `value`"),
        ({"type": "json", "value": SCHEMA, "extra": 1}, "unknown field `extra`"),
    ],
)
def test_bad_tgi_grammars_are_422_naming_the_field(value: Any, words: str) -> None:
    assert words in refused(from_tgi, value, "grammar")


def test_openai_response_format_spellings() -> None:
    assert from_response_format(None) is None
    assert from_response_format({"type": "text"}) is None
    assert from_response_format({"type": "json_object"}) == grammar.canonical("json_object")
    spec = {"name": "person", "schema": SCHEMA, "strict": True, "description": "a person"}
    assert from_response_format({"type": "json_schema", "json_schema": spec}) == grammar.canonical(
        "json", SCHEMA
    )
    spec = {"name": "person", "schema": SCHEMA, "strict": False}
    assert from_response_format({"type": "json_schema", "json_schema": spec}) == grammar.canonical(
        "json", SCHEMA
    )
    assert from_response_format({"type": "json_schema", "json_schema": {"name": "any"}}) == grammar.canonical(
        "json_object"
    )


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("json_object", "must be an object"),
        ({"type": "xml"}, "text, json_object or json_schema"),
        ({"type": "json_schema"}, "must be an object with `name`"),
        ({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, "name` must be"),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": SCHEMA}}, "name` must be"),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA, "strict": "yes"}}, "strict"),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": 3}}, "JSON schema object"),
        ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "nope"}}}, "not valid"),
        ({"type": "json_schema", "json_schema": {"name": "p", "other": 1}}, "unknown field `other`"),
        ({"type": "text", "json_schema": {}}, "unknown field"),
    ],
)
def test_bad_response_formats_are_4xx_naming_the_field(value: Any, words: str) -> None:
    assert words in refused(from_response_format, value, "response_format")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_model_dir)


def validator(tiny_model_dir: Path, tokenizer: Tokenizer, processors: tuple[str, ...]) -> Validator:
    return Validator(make_config(tiny_model_dir), tokenizer, (), "ct2" if not processors else "", processors)


def test_the_grammar_reaches_the_sampling_parameters(tiny_model_dir: Path, tokenizer: Tokenizer) -> None:
    v = validator(tiny_model_dir, tokenizer, ("grammar", "watermark"))
    try:
        p = v.check_parameters(parse_parameters({"grammar": {"type": "regex", "value": "a+"}}), False)
        assert p.processors == (("grammar", grammar.canonical("regex", "a+")),)
        both = parse_parameters({"grammar": {"type": "regex", "value": "a+"}, "watermark": True})
        assert [name for name, _ in v.check_parameters(both, False).processors] == ["grammar", "watermark"]
        assert v.check_parameters(parse_parameters({}), False).processors == ()
    finally:
        v.close()


def test_a_server_without_the_processor_refuses_both_fields(
    tiny_model_dir: Path, tokenizer: Tokenizer
) -> None:
    v = validator(tiny_model_dir, tokenizer, ())
    try:
        with pytest.raises(ValidationError, match="`grammar` is not supported by this server's ct2 backend"):
            v.check_parameters(parse_parameters({"grammar": {"type": "regex", "value": "a+"}}), False)
        infer = fake_infer(v, tokenizer)
        with pytest.raises(ValidationError, match="`response_format` is not supported") as excinfo:
            parse_options(Fields({"response_format": {"type": "json_object"}}), infer, 4)
        assert excinfo.value.param == "response_format"
        assert parse_options(Fields({"response_format": {"type": "text"}}), infer, 4).params.processors == ()
    finally:
        v.close()


def fake_infer(v: Validator, tokenizer: Tokenizer) -> Any:
    return SimpleNamespace(
        config=v.config, validator=v, tokenizer=tokenizer, info=SimpleNamespace(vocab_size=0)
    )


def test_openai_options_carry_the_grammar(tiny_model_dir: Path, tokenizer: Tokenizer) -> None:
    v = validator(tiny_model_dir, tokenizer, ("grammar",))
    try:
        body = {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}}
        fields = Fields(body)
        options = parse_options(fields, fake_infer(v, tokenizer), 4)
        fields.finish()  # the field counts as read
        assert options.params.processors == (("grammar", grammar.canonical("json", SCHEMA)),)
    finally:
        v.close()


def test_min_tokens_cannot_force_a_constrained_output_past_its_end(
    tiny_model_dir: Path, tokenizer: Tokenizer
) -> None:
    v = validator(tiny_model_dir, tokenizer, ("grammar",))
    try:
        body = {"response_format": {"type": "json_object"}, "min_tokens": 3}
        with pytest.raises(ValidationError, match="`min_tokens` cannot be used") as excinfo:
            parse_options(Fields(body), fake_infer(v, tokenizer), 4)
        assert excinfo.value.param == "min_tokens"
    finally:
        v.close()
