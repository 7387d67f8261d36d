"""LoRA adapters in the router: OpenAI's ``model`` names an adapter (an unknown name is a 404 while the
server holds adapters), TGI's ``parameters.adapter_id`` (a 422 naming it), and the adapter reaches the
shard's RequestSpec over the wire."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from proto import pb
from router.engine_client import request_to_pb
from router.errors import ValidationError
from router.openai_params import Fields, ModelNotFoundError, build_requests, check_model, parse_options
from router.tokenizer import Tokenizer
from router.validation import Validator, parse_parameters
from shard.server import request_from_pb

from .test_cache_salt import entry
from .test_validation import make_config

pytestmark = pytest.mark.timeout(60)

ADAPTERS = ("sql", "chat-fr")


@pytest.fixture(scope="module")
def validator(tiny_model_dir: Path):
    v = Validator(make_config(tiny_model_dir), Tokenizer(tiny_model_dir), adapters=ADAPTERS)
    yield v
    v.close()


def infer_of(validator: Validator) -> SimpleNamespace:
    return SimpleNamespace(
        config=validator.config, info=SimpleNamespace(vocab_size=0), tokenizer=validator.tokenizer,
        validator=validator,
    )  # fmt: skip


def test_openai_model_names_an_adapter_and_it_reaches_the_shard(validator: Validator) -> None:
    infer = infer_of(validator)
    fields = Fields({"model": "sql", "n": 2, "temperature": 0.5})
    model = check_model(fields, infer)  # type: ignore[arg-type]
    assert model == "sql"
    options = parse_options(fields, infer, 4, model)  # type: ignore[arg-type]
    assert options.adapter_id == "sql"
    requests = build_requests(infer, "Hi", [5, 6, 7], options, 2, 0, False, False)  # type: ignore[arg-type]
    pbs = [request_to_pb(entry(r)).SerializeToString() for r in requests]  # type: ignore[arg-type]
    wire = [request_from_pb(pb.Request.FromString(b)) for b in pbs]
    assert [s.adapter_id for s in wire] == ["sql", "sql"]
    # The base model's name (and no name) run without an adapter.
    base = validator.config.model_names[0]
    for body in ({"model": base}, {}):
        fields = Fields(body)
        model = check_model(fields, infer)  # type: ignore[arg-type]
        assert model == base and parse_options(fields, infer, 4, model).adapter_id == ""  # type: ignore[arg-type]


def test_openai_unknown_model_is_a_404_naming_it_while_adapters_are_loaded(validator: Validator) -> None:
    with pytest.raises(ModelNotFoundError) as e:
        check_model(Fields({"model": "sqll"}), infer_of(validator))  # type: ignore[arg-type]
    assert "`sqll` does not exist" in e.value.message and "sql, chat-fr" in e.value.message


async def test_tgi_adapter_id_reaches_the_shard(validator: Validator) -> None:
    request = await validator.validate("Hello", parse_parameters({"adapter_id": "chat-fr"}), stream=False)
    assert request.adapter_id == "chat-fr"
    wire = request_to_pb(entry(request)).SerializeToString()  # type: ignore[arg-type]
    assert request_from_pb(pb.Request.FromString(wire)).adapter_id == "chat-fr"
    request = await validator.validate("Hello", parse_parameters({}), stream=False)
    assert request.adapter_id == "" and request_to_pb(entry(request)).adapter_id == ""  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nope", "`adapter_id` 'nope' is not a loaded LoRA adapter (this server holds: sql, chat-fr)"),
        (5, "`adapter_id` must be a string, got an integer"),
    ],
)
async def test_tgi_refuses_a_bad_adapter_id_by_name(
    validator: Validator, value: object, message: str
) -> None:
    with pytest.raises(ValidationError) as e:
        await validator.validate("Hello", parse_parameters({"adapter_id": value}), stream=False)
    assert e.value.status == 422 and e.value.param == "adapter_id" and e.value.detail == message


async def test_a_server_without_adapters_refuses_adapter_id(tiny_model_dir: Path) -> None:
    v = Validator(make_config(tiny_model_dir), Tokenizer(tiny_model_dir))
    try:
        with pytest.raises(
            ValidationError, match="'sql' is not a loaded LoRA adapter \\(this server holds none\\)"
        ):
            await v.validate("Hello", parse_parameters({"adapter_id": "sql"}), stream=False)
    finally:
        v.close()
