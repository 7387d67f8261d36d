"""vLLM's ``cache_salt`` in the router: TGI's ``parameters.cache_salt`` (422 on a bad value) and the OpenAI
routes' ``cache_salt`` (400), carried through ValidRequest and the wire to the shard's RequestSpec."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from proto import pb
from router.engine_client import request_to_pb
from router.errors import ValidationError
from router.openai_params import Fields, build_requests, parse_options
from router.tokenizer import Tokenizer
from router.validation import MAX_CACHE_SALT, Validator, parse_parameters
from shard.server import request_from_pb

from .test_validation import make_config

pytestmark = pytest.mark.timeout(60)

BAD = [
    ("", "0 characters"),
    ("x" * (MAX_CACHE_SALT + 1), f"{MAX_CACHE_SALT + 1} characters"),
    (5, "an integer"),
    (True, "a boolean"),
    (["tenant"], "an array"),
    ({"tenant": 1}, "an object"),
]


@pytest.fixture(scope="module")
def validator(tiny_model_dir: Path):
    v = Validator(make_config(tiny_model_dir), Tokenizer(tiny_model_dir))
    yield v
    v.close()


def openai_options(validator: Validator, body: dict):
    infer = SimpleNamespace(
        config=validator.config, info=SimpleNamespace(vocab_size=0), tokenizer=validator.tokenizer,
        validator=validator,
    )  # fmt: skip
    fields = Fields(body)
    options = parse_options(fields, infer, 4)  # type: ignore[arg-type]
    fields.finish()  # cache_salt is a known field: no "unsupported parameter"
    return infer, options


@pytest.mark.parametrize(("value", "given"), BAD)
def test_tgi_refuses_a_bad_salt_by_name(value: object, given: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        parse_parameters({"cache_salt": value})
    err = excinfo.value
    assert err.status == 422 and err.param == "cache_salt"
    assert err.detail == (
        f"`cache_salt` must be a non-empty string of at most {MAX_CACHE_SALT} characters. Given: {given}"
    )


@pytest.mark.parametrize(("value", "given"), BAD)
def test_openai_refuses_a_bad_salt_by_name(validator: Validator, value: object, given: str) -> None:
    with pytest.raises(ValidationError) as excinfo:
        openai_options(validator, {"cache_salt": value})
    assert excinfo.value.param == "cache_salt" and excinfo.value.detail.endswith(f"Given: {given}")


async def test_tgi_salt_reaches_the_shard(validator: Validator) -> None:
    salt = "tenant-é" + "x" * (MAX_CACHE_SALT - 8)  # the longest allowed, not ASCII
    request = await validator.validate("Hello", parse_parameters({"cache_salt": salt}), stream=False)
    assert request.cache_salt == salt
    spec = request_from_pb(pb.Request.FromString(request_to_pb(entry(request)).SerializeToString()))
    assert spec.cache_salt == salt and spec.input_ids == request.input_ids
    # Absent or null: no salt, as before.
    for params in ({}, {"cache_salt": None}):
        request = await validator.validate("Hello", parse_parameters(params), stream=False)
        assert request.cache_salt == "" and request_from_pb(request_to_pb(entry(request))).cache_salt == ""


def test_openai_salt_reaches_every_sequence(validator: Validator) -> None:
    infer, options = openai_options(validator, {"cache_salt": "tenant-a", "n": 3, "temperature": 0.5})
    requests = build_requests(infer, "Hi", [5, 6, 7], options, 3, 0, False, False)  # type: ignore[arg-type]
    assert [r.cache_salt for r in requests] == ["tenant-a"] * 3
    assert [request_to_pb(entry(r)).cache_salt for r in requests] == ["tenant-a"] * 3
    _, options = openai_options(validator, {})
    assert options.cache_salt == ""


def entry(request) -> SimpleNamespace:
    """What request_to_pb reads of a queue entry."""
    return SimpleNamespace(id=7, request=request, group=0)
