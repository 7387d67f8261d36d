"""LauncherConfig's rules that need the model: the token limits against the model's positions."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config import ArgumentError, LauncherConfig

SMOLLM = {"model_type": "llama", "num_attention_heads": 9, "max_position_embeddings": 8192}


def test_max_total_tokens_past_the_models_positions_is_refused_with_both_numbers() -> None:
    config = LauncherConfig(max_input_length=9000, max_total_tokens=9500, max_batch_prefill_tokens=9000)
    config.validate()
    with pytest.raises(ArgumentError) as e:
        config.check_model(SMOLLM, 0)
    assert str(e.value) == (
        "`max_total_tokens` (9500) must be <= the model's 8192 positions (max_position_embeddings)"
    )


def test_a_limit_equal_to_the_positions_is_kept() -> None:
    config = LauncherConfig(max_input_length=8000, max_total_tokens=8192, max_batch_prefill_tokens=8000)
    fitted = config.check_model(SMOLLM, 0)
    assert (fitted.max_input_length, fitted.max_total_tokens) == (8000, 8192)


def test_other_keys_and_a_nested_text_config_declare_positions_too() -> None:
    gpt2 = {"model_type": "gpt2", "n_positions": 1024}
    with pytest.raises(
        ArgumentError, match=r"\(1500\) must be <= the model's 1024 positions \(n_positions\)"
    ):
        LauncherConfig(max_total_tokens=1500).check_model(gpt2, 0)
    nested = {"text_config": {"model_type": "llama", "max_position_embeddings": 512}}
    with pytest.raises(ArgumentError, match="512 positions"):
        LauncherConfig(max_total_tokens=600, max_input_length=100).check_model(nested, 0)


def test_a_model_without_positions_keeps_every_limit() -> None:
    config = LauncherConfig(max_input_length=90000, max_total_tokens=100000, max_batch_prefill_tokens=90000)
    fitted = config.check_model({"model_type": "llama"}, 0)
    assert (fitted.max_input_length, fitted.max_total_tokens) == (90000, 100000)
    assert LauncherConfig().check_model({}, 0).max_total_tokens == 2048


def test_defaults_are_fitted_to_a_model_with_fewer_positions() -> None:
    small = {"model_type": "llama", "max_position_embeddings": 512}
    fitted = LauncherConfig().check_model(small, 0)
    assert (fitted.max_input_length, fitted.max_total_tokens) == (511, 512)
    # A given input length is kept; the default total still fits the model.
    assert LauncherConfig(max_input_length=100).check_model(small, 0).max_total_tokens == 512
    # The defaults stay when the model has room for them.
    fitted = LauncherConfig().check_model(SMOLLM, 0)
    assert (fitted.max_input_length, fitted.max_total_tokens) == (1024, 2048)


def test_a_given_input_length_past_the_positions_is_refused() -> None:
    small = {"model_type": "llama", "max_position_embeddings": 512}
    with pytest.raises(ArgumentError) as e:
        LauncherConfig(max_input_length=1000).check_model(small, 0)
    assert (
        str(e.value)
        == "`max_input_length` (1000) must be < the model's 512 positions (max_position_embeddings)"
    )


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_cuda_memory_fraction_must_be_a_share(fraction: float) -> None:
    with pytest.raises(
        ArgumentError, match=rf"`cuda_memory_fraction` must be > 0 and <= 1. Given: {fraction}"
    ):
        LauncherConfig(cuda_memory_fraction=fraction).validate()


def test_cuda_memory_fraction_is_refused_without_a_cuda_device() -> None:
    config = LauncherConfig(cuda_memory_fraction=0.5)
    config.validate()
    with pytest.raises(ArgumentError, match=r"`cuda_memory_fraction` \(0.5\) applies to CUDA devices"):
        config.check_model(SMOLLM, 0)
    config.check_model({**SMOLLM, "num_attention_heads": 8}, 1)  # one GPU: honoured
    LauncherConfig().check_model(SMOLLM, 0)  # the default is fine anywhere


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"speculate": -1}, r"`speculate` must be >= 0. Given: -1"),
        ({"speculate": 3, "backend": "transformers"}, r"`--speculate 3` needs the paged backend \(--backend transformers"),
        ({"speculate": 2, "quantize": "bitsandbytes-nf4"}, r"`--speculate 2` needs the paged backend \(--quantize bitsandbytes-nf4"),
    ],
)  # fmt: skip
def test_speculate_is_refused_where_it_cannot_run(flags: dict, message: str) -> None:
    with pytest.raises(ArgumentError, match=message):
        LauncherConfig(**flags).validate()


def test_speculate_zero_or_unset_is_fine_anywhere_and_reaches_the_shard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from launcher.supervisor import Supervisor
    from launcher.weights import ResolvedModel
    from tests.unit.launcher.test_tgi_flags import parse

    LauncherConfig(speculate=0, backend="transformers").validate()
    LauncherConfig(backend="transformers").validate()
    model = ResolvedModel("m", Path("/m"), None, None, "local", "m.safetensors")
    assert Supervisor(parse(), model).shard_config(0).speculate is None  # the engine's default
    assert Supervisor(parse("--speculate", "6"), model).shard_config(1).speculate == 6
    monkeypatch.setenv("SPECULATE", "0")  # TGI's variable
    assert parse().speculate == 0
