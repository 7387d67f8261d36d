"""Every flag of TGI v0.9.4's launcher is accepted, each with its environment variable; the ngrok tunnel is
refused by name; test-only switches stay off whatever the environment says; parser names are checked
before anything starts (tests/e2e/test_tgi_flags.py starts TGI's documented command lines for real)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import click
import pytest
import typer

from common.flags import values_to_fields
from launcher.cli import app
from launcher.config import ArgumentError, LauncherConfig
from tests.fake_plugins import installed

# TGI v0.9.4's launcher flags (launcher/src/main.rs): each long flag but --env reads the UPPER_SNAKE
# environment variable of its name; two have a one-letter alias.
TGI_FLAGS = (
    "model-id", "revision", "validation-workers", "sharded", "num-shard", "quantize", "dtype",
    "trust-remote-code", "max-concurrent-requests", "max-best-of", "max-stop-sequences", "max-input-length",
    "max-total-tokens", "waiting-served-ratio", "max-batch-prefill-tokens", "max-batch-total-tokens",
    "max-waiting-tokens", "hostname", "port", "shard-uds-path", "master-addr", "master-port",
    "huggingface-hub-cache", "weights-cache-override", "disable-custom-kernels", "cuda-memory-fraction",
    "json-output", "cors-allow-origin", "watermark-gamma", "watermark-delta", "ngrok", "ngrok-authtoken",
    "ngrok-edge", "otlp-endpoint", "env",
)  # fmt: skip
TGI_SHORT = {"port": "-p", "env": "-e"}


def command() -> click.Command:
    return typer.main.get_command(app)


def parse(*args: str) -> LauncherConfig:
    """The config the launcher builds from this command line (and the environment), without starting."""
    ctx = command().make_context("text-generation-launcher", list(args))
    values = dict(ctx.params)
    values.pop("list_plugins")
    return LauncherConfig(**values_to_fields(LauncherConfig, values))


def test_every_tgi_flag_is_declared_with_its_environment_variable() -> None:
    options = {opt: p for p in command().params for opt in p.opts}
    for name in TGI_FLAGS:
        option = options.get(f"--{name}")
        assert option is not None, f"--{name} is missing"
        assert option.envvar == (None if name == "env" else name.upper().replace("-", "_")), name
        if name in TGI_SHORT:
            assert TGI_SHORT[name] in option.opts, name


def test_short_flags_and_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse("-p", "8080", "-e")
    assert (config.port, config.env) == (8080, True)
    monkeypatch.setenv("PORT", "8081")
    monkeypatch.setenv("DISABLE_CUSTOM_KERNELS", "true")
    monkeypatch.setenv("ENV", "/root/.shrc")  # a shell's startup file, not the launcher's flag
    config = parse()
    assert (config.port, config.disable_custom_kernels, config.env) == (8081, True, False)
    assert parse("-p", "9000").port == 9000  # the command line wins over the environment


def test_disable_custom_kernels_reaches_the_shards_and_turns_cuda_graphs_off() -> None:
    from launcher.supervisor import Supervisor
    from launcher.weights import ResolvedModel

    model = ResolvedModel("m", Path("/m"), None, None, "local", "m.safetensors")
    shard = Supervisor(parse("--disable-custom-kernels"), model).shard_config(0)
    assert shard.disable_custom_kernels
    parse("--disable-custom-kernels", "--cuda-graphs", "0").validate()
    with pytest.raises(
        ArgumentError, match=r"`--cuda-graphs 1,2` cannot be honoured with `--disable-custom-kernels`"
    ):
        parse("--disable-custom-kernels", "--cuda-graphs", "1,2").validate()


def test_ngrok_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse("--ngrok", "--ngrok-authtoken", "secret", "--ngrok-edge", "edge")
    with pytest.raises(ArgumentError, match=r"`--ngrok` is not supported: this server opens no tunnel") as e:
        config.validate()
    assert "ngrok http 3000" in str(e.value) and "secret" not in str(e.value)
    monkeypatch.setenv("NGROK", "true")
    with pytest.raises(ArgumentError, match=r"`--ngrok` is not supported"):
        parse().validate()
    # Without --ngrok, TGI ignores the token and the edge too: accepted (the launcher warns).
    monkeypatch.delenv("NGROK")
    parse("--ngrok-authtoken", "secret", "--ngrok-edge", "edge").validate()


def test_fault_injection_is_never_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAULT_INJECTION", "true")
    assert parse().fault_injection is False
    assert parse("--fault-injection").fault_injection is True
    option = next(p for p in command().params if "--fault-injection" in p.opts)
    assert option.envvar is None and option.hidden


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--tool-call-parser", "nope"),
            "`--tool-call-parser nope` is not a known parser. Known: auto, hermes, llama3_json, mistral, pythonic",
        ),
        (
            ("--reasoning-parser", "nope"),
            "`--reasoning-parser nope` is not a known parser. Known: auto, none, think, deepseek_r1, qwen3, "
            "gpt_oss",
        ),
    ],
)
def test_unknown_parser_names_are_refused_with_the_known_ones(args: tuple[str, str], message: str) -> None:
    with pytest.raises(ArgumentError) as e:
        parse(*args).validate()
    assert str(e.value).startswith(message), str(e.value)


def test_known_parser_names_pass() -> None:
    for name in ("auto", "hermes", "llama3_json", "mistral", "pythonic"):
        parse("--tool-call-parser", name).validate()
    for name in ("auto", "none", "think", "deepseek_r1", "qwen3", "gpt_oss"):
        parse("--reasoning-parser", name).validate()


PLUGIN_MODULE = "tgi_fake_launcher_parsers"
PLUGIN_SOURCE = """\
from router.reasoning import ThinkReasoningParser
from router.toolcalls.hermes import HermesParser


def not_a_parser():
    return 42
"""


@pytest.fixture
def parser_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    entry_points = (
        "[text_generation.tool_parsers]\n"
        f"mine = {PLUGIN_MODULE}:HermesParser\n"
        f"broken = {PLUGIN_MODULE}:Missing\n"
        "[text_generation.reasoning_parsers]\n"
        f"mythink = {PLUGIN_MODULE}:ThinkReasoningParser\n"
        f"wrong = {PLUGIN_MODULE}:not_a_parser\n"
    )
    yield from installed(
        tmp_path, monkeypatch, "tgi-fake-launcher-parsers", "0.1", entry_points, PLUGIN_MODULE, PLUGIN_SOURCE
    )


def test_plugin_parser_names_are_loaded_as_the_router_loads_them(parser_plugins: Path) -> None:
    parse("--tool-call-parser", "mine", "--reasoning-parser", "mythink").validate()
    with pytest.raises(
        ArgumentError, match=r"Known: auto, hermes, llama3_json, mistral, pythonic, broken, mine"
    ):
        parse("--tool-call-parser", "other").validate()
    with pytest.raises(ArgumentError, match=r"`--tool-call-parser broken`: .*failed to load"):
        parse("--tool-call-parser", "broken").validate()
    with pytest.raises(ArgumentError, match=r"`--reasoning-parser wrong`: .*is not a ReasoningParser"):
        parse("--reasoning-parser", "wrong").validate()
