"""Parameters a backend cannot honour (InfoResponse.unsupported_parameters, e.g. CTranslate2's) are refused
by name on both APIs, and accepted as before when the backend honours them; and the launcher's
--quantize rules."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from common.quantize import CT2_UNSUPPORTED_PARAMETERS
from launcher.config import ArgumentError, LauncherConfig
from router.errors import ValidationError
from router.openai_params import Fields, parse_options
from router.tokenizer import Tokenizer
from router.validation import Validator, parse_parameters

from .test_validation import make_config

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_model_dir)


@pytest.fixture
def ct2(tiny_model_dir: Path, tokenizer: Tokenizer):
    v = Validator(make_config(tiny_model_dir), tokenizer, CT2_UNSUPPORTED_PARAMETERS, "ct2")
    yield v
    v.close()


@pytest.fixture
def full(tiny_model_dir: Path, tokenizer: Tokenizer):
    v = Validator(make_config(tiny_model_dir), tokenizer)
    yield v
    v.close()


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"typical_p": 0.5}, "typical_p"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": -0.5}, "presence_penalty"),
        ({"do_sample": True, "seed": 3}, "seed"),
    ],
)
def test_tgi_refuses_what_the_backend_cannot_do(
    ct2: Validator, full: Validator, params: dict, field: str
) -> None:
    with pytest.raises(ValidationError) as error:
        ct2.check_parameters(parse_parameters(params), stream=False)
    assert error.value.status == 422 and f"`{field}` is not supported" in error.value.message
    assert "ct2" in error.value.message and error.value.param == field
    full.check_parameters(parse_parameters(params), stream=False)  # a backend that can: accepted


def test_tgi_accepts_what_ct2_honours(ct2: Validator) -> None:
    params = {"do_sample": True, "temperature": 0.7, "top_k": 10, "top_p": 0.9, "repetition_penalty": 1.2}
    ct2.check_parameters(parse_parameters(params), stream=False)
    ct2.check_parameters(parse_parameters({"seed": 5}), stream=False)  # greedy: a seed changes nothing
    ct2.check_parameters(parse_parameters({"typical_p": 1.0, "top_n_tokens": 2}), stream=False)


def _infer(validator: Validator, tokenizer: Tokenizer) -> SimpleNamespace:
    return SimpleNamespace(
        config=validator.config, info=SimpleNamespace(vocab_size=0), tokenizer=tokenizer, validator=validator
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"min_p": 0.1}, "min_p"),
        ({"logit_bias": {"5": 2}}, "logit_bias"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"frequency_penalty": 1.0}, "frequency_penalty"),
        ({"seed": 7}, "seed"),
        ({"min_tokens": 3, "max_tokens": 5}, "min_tokens"),
    ],
)
def test_openai_refuses_what_the_backend_cannot_do(
    ct2: Validator, full: Validator, tokenizer: Tokenizer, body: dict, field: str
) -> None:
    with pytest.raises(ValidationError) as error:
        parse_options(Fields(body), _infer(ct2, tokenizer), 4)  # type: ignore[arg-type]
    assert error.value.param == field and f"`{field}` is not supported" in error.value.detail
    parse_options(Fields(body), _infer(full, tokenizer), 4)  # type: ignore[arg-type]


def test_openai_accepts_what_ct2_honours(ct2: Validator, tokenizer: Tokenizer) -> None:
    body = {"temperature": 0.5, "top_p": 0.9, "top_k": 5, "repetition_penalty": 1.1, "n": 2, "max_tokens": 4}
    parse_options(Fields(body), _infer(ct2, tokenizer), 4)  # type: ignore[arg-type]
    parse_options(Fields({"temperature": 0, "seed": 3}), _infer(ct2, tokenizer), 4)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LauncherConfig(quantize="gptq"), "`--quantize gptq` is not supported"),
        (LauncherConfig(quantize="ct2", num_shard=2), "`--quantize ct2` runs in one shard"),
        (LauncherConfig(quantize="bitsandbytes", num_shard=2), "runs in one shard"),
        (LauncherConfig(quantize="bitsandbytes-fp4", backend="paged"), "transformers backend"),
        (LauncherConfig(quantize="ct2", backend="paged"), "leave `--backend` at auto"),
        (LauncherConfig(quantize="ct2", dtype="float16"), "cannot run on cpu"),
        (LauncherConfig(quantize="ct2", ct2_threads=-1), "`ct2_threads` must be >= 0"),
    ],
)
def test_launcher_quantize_rules(config: LauncherConfig, message: str) -> None:
    with pytest.raises(ArgumentError, match=message.replace("`", ".").replace("(", ".")):
        config.validate()


@pytest.mark.parametrize("mode", ["bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "ct2"])
def test_launcher_accepts_the_quantize_modes(mode: str) -> None:
    LauncherConfig(quantize=mode).validate()
    LauncherConfig(quantize=mode, dtype="float32").validate()
