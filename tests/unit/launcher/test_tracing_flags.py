"""--otlp-endpoint and --otlp-service-name: declared once (with TGI's environment variables), checked, and
handed to the router and every shard (tests/e2e/test_tracing.py exports real traces)."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer

from common.flags import values_to_fields
from common.tracing import ROUTER_SERVICE_NAME, SHARD_SERVICE_NAME, shard_service_name
from launcher.cli import app
from launcher.config import LauncherConfig
from launcher.supervisor import Supervisor
from launcher.weights import ResolvedModel

MODEL = ResolvedModel("org/model", Path("/models/m"), None, "abc123", "local", "m.safetensors")


def parse(*args: str) -> LauncherConfig:
    ctx = typer.main.get_command(app).make_context("text-generation-launcher", list(args))
    values = dict(ctx.params)
    values.pop("list_plugins")
    return LauncherConfig(**values_to_fields(LauncherConfig, values))


def test_the_flags_and_their_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert (parse().otlp_endpoint, parse().otlp_service_name) == (None, ROUTER_SERVICE_NAME)
    config = parse("--otlp-endpoint", "http://collector:4317", "--otlp-service-name", "llm")
    assert (config.otlp_endpoint, config.otlp_service_name) == ("http://collector:4317", "llm")
    monkeypatch.setenv("OTLP_ENDPOINT", "https://collector:4317")
    monkeypatch.setenv("OTLP_SERVICE_NAME", "llm.router")
    config = parse()
    assert (config.otlp_endpoint, config.otlp_service_name) == ("https://collector:4317", "llm.router")
    with pytest.raises(typer.BadParameter, match="collector address"):
        parse("--otlp-endpoint", " ")


def test_the_router_and_every_shard_get_them() -> None:
    supervisor = Supervisor(
        LauncherConfig(otlp_endpoint="http://c:4317", otlp_service_name="llm.router", num_shard=2), MODEL
    )
    router = supervisor.router_config()
    assert (router.otlp_endpoint, router.otlp_service_name) == ("http://c:4317", "llm.router")
    for rank in (0, 1):
        shard = supervisor.shard_config(rank)
        assert (shard.otlp_endpoint, shard.otlp_service_name) == ("http://c:4317", "llm.server")
    supervisor.shutdown()


def test_the_shards_service_name_is_tgis_pair() -> None:
    assert shard_service_name(ROUTER_SERVICE_NAME) == SHARD_SERVICE_NAME
    assert shard_service_name("llm") == "llm.server"
