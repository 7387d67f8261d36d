"""``--lora-adapters`` / ``LORA_ADAPTERS``: parsed and checked before anything starts (names, local
directories; hub ids refused by name), and handed to each shard as absolute
``name=directory`` entries."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.lora import parse_lora_adapters
from launcher.config import ArgumentError, LauncherConfig
from launcher.supervisor import Supervisor
from launcher.weights import ResolvedModel
from shard.config import ShardConfig

from .test_tgi_flags import parse

pytestmark = pytest.mark.timeout(60)

MODEL = ResolvedModel("org/model", Path("/models/m"), None, "abc123", "hub", "1 safetensors file")


def test_lora_adapters_from_the_flag_or_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path)
    config = parse("--lora-adapters", "sql=./a, b")
    config.validate()
    monkeypatch.setenv("LORA_ADAPTERS", "sql=./a")
    assert parse().lora_adapters == "sql=./a"
    shard = Supervisor(config, MODEL).shard_config(0)
    assert shard.lora_adapters == (f"sql={tmp_path / 'a'}", f"b={tmp_path / 'b'}")
    assert Supervisor(LauncherConfig(), MODEL).shard_config(0).lora_adapters == ()
    assert ShardConfig(model_path=Path("/m")).lora_adapters == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("sql=/no/such/dir", "adapter 'sql': '/no/such/dir' is not a local directory (no such directory)"),
        ("sql=org/sql-lora", "'org/sql-lora' is not a local directory (hub ids are not downloaded yet"),
        ("sql=.,sql=.", "adapter name 'sql' is given twice"),
        ("-x=.", "adapter name '-x' must be 1 to 128 letters"),
        ("sql=.,", "`lora_adapters` has an empty entry"),
        ("sql=", "adapter 'sql' has no path or id"),
    ],
)
def test_bad_lora_adapters_are_refused_by_name(value: str, message: str) -> None:
    with pytest.raises(ArgumentError) as e:
        LauncherConfig(lora_adapters=value).validate()
    assert message in str(e.value)


def test_every_rank_gets_the_adapters(tmp_path: Path) -> None:
    config = LauncherConfig(lora_adapters=f"a={tmp_path}", num_shard=2)
    config.validate()
    supervisor = Supervisor(config, MODEL)
    assert (
        supervisor.shard_config(0).lora_adapters
        == supervisor.shard_config(1).lora_adapters
        == (f"a={tmp_path}",)
    )


def test_max_lora_rank_reaches_the_shards() -> None:
    assert Supervisor(parse("--max-lora-rank", "16"), MODEL).shard_config(0).max_lora_rank == 16
    assert Supervisor(LauncherConfig(), MODEL).shard_config(0).max_lora_rank is None
    with pytest.raises(ArgumentError, match=r"`max_lora_rank` must be >= 1\. Given: 0"):
        LauncherConfig(max_lora_rank=0).validate()


def test_max_loras_reaches_the_shards() -> None:
    assert Supervisor(parse("--max-loras", "4"), MODEL).shard_config(0).max_loras == 4
    assert Supervisor(LauncherConfig(), MODEL).shard_config(0).max_loras is None
    with pytest.raises(ArgumentError, match=r"`max_loras` must be >= 1\. Given: 0"):
        LauncherConfig(max_loras=0).validate()


def test_the_shard_flag_parses_the_same_entries() -> None:
    assert parse_lora_adapters("a=/x, b=/y") == ("a=/x", "b=/y")
    assert parse_lora_adapters(("a=/x",)) == ("a=/x",)
