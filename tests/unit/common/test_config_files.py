"""Config declared once: the launcher builds each child's frozen config and hands it over as a file; the
children's own command lines are made from the same dataclass fields, with the same defaults."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from common.flags import from_json, to_json
from launcher.config import ArgumentError, LauncherConfig
from launcher.supervisor import Supervisor
from launcher.weights import ResolvedModel
from router.chat import ChatWrapping
from router.config import RouterConfig
from shard.config import ShardConfig

MODEL = ResolvedModel("org/model", Path("/models/m"), None, "abc123", "local", "m.safetensors")


def test_a_config_survives_its_file_except_its_secret() -> None:
    router = RouterConfig(
        tokenizer_name="/m", model_id="m", max_batch_total_tokens=512, cors_allow_origin=("a", "b"),
        served_model_names=("x",), chat_wrapping=ChatWrapping(user_pre="<u>"), api_key="secret",
        waiting_served_ratio=2.0, graceful_termination_timeout=5,
    )  # fmt: skip
    text = to_json(router)
    assert "secret" not in text and "api_key" not in json.loads(text)
    assert from_json(RouterConfig, text, api_key="secret") == router
    assert from_json(RouterConfig, text).api_key is None
    shard = ShardConfig(model_path=Path("/m"), rank=3, world_size=4, cuda_graphs=(1, 2), plugins=("p",))
    assert from_json(ShardConfig, to_json(shard)) == shard
    assert (
        from_json(ShardConfig, to_json(ShardConfig(model_path=Path("/m"), cuda_graphs=()))).cuda_graphs == ()
    )


def test_a_bad_file_is_refused_by_field_name() -> None:
    with pytest.raises(ValueError, match="ShardConfig has no field `model`"):
        from_json(ShardConfig, json.dumps({"model": "/m"}))
    with pytest.raises(ValueError, match="ShardConfig needs `model_path`"):
        from_json(ShardConfig, "{}")
    with pytest.raises(ValueError, match=r"`rank` must be of type int. Given: '1'"):
        from_json(ShardConfig, json.dumps({"model_path": "/m", "rank": "1"}))


def test_the_launcher_builds_each_childs_config_from_its_own() -> None:
    config = LauncherConfig(
        max_best_of=3, max_batch_total_tokens=4096, cuda_memory_fraction=0.5, cuda_graphs="4,1",
        plugins=("p",), json_output=True, api_key="k", max_input_length=100, max_total_tokens=200,
    )  # fmt: skip
    supervisor = Supervisor(config, MODEL)
    router = supervisor.router_config()
    assert (router.tokenizer_name, router.model_id, router.model_sha) == ("/models/m", "org/model", "abc123")
    assert (router.max_best_of, router.max_batch_total_tokens, router.plugins) == (3, 4096, ("p",))
    assert (router.max_input_length, router.max_total_tokens, router.api_key) == (100, 200, "k")
    shard = supervisor.shard_config(0)
    assert (shard.model_path, shard.max_batch_total_tokens, shard.cuda_memory_fraction) == (
        MODEL.path,
        4096,
        0.5,
    )
    assert (shard.cuda_graphs, shard.plugins, shard.json_output) == ((1, 4), ("p",), True)


def test_the_launchers_defaults_are_the_childrens() -> None:
    """Every field the launcher passes on keeps the child's default when no flag is given."""
    supervisor = Supervisor(LauncherConfig(), MODEL)
    router = supervisor.router_config()
    shard = supervisor.shard_config(0)
    # The socket prefix is the run's private directory's (test_the_sockets_live_in_a_private_directory).
    passed = {"tokenizer_name", "model_id", "model_sha", "model_weights", "num_shard", "chat_wrapping",
              "shard_uds_path"}  # fmt: skip
    for f in dataclasses.fields(RouterConfig):
        if f.name in passed or f.default is dataclasses.MISSING:
            continue
        assert getattr(router, f.name) == f.default, f.name
    for f in dataclasses.fields(ShardConfig):
        if f.name in ("model_path", "rank", "world_size", "uds_path"):
            continue
        assert getattr(shard, f.name) == f.default, f.name


def test_the_child_files_are_private_and_the_commands_name_only_them(tmp_path: Path) -> None:
    supervisor = Supervisor(LauncherConfig(api_key="k", num_shard=2), MODEL)
    command = supervisor.router_command()
    assert command[-4:] == ["-m", "router", "--config", command[-1]]
    path = Path(command[-1])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert from_json(RouterConfig, path.read_text()) == dataclasses.replace(
        supervisor.router_config(), api_key=None
    )
    shard = supervisor.shard_command(1)
    assert shard[-5:] == ["-m", "shard", "serve", "--config", shard[-1]]
    assert from_json(ShardConfig, Path(shard[-1]).read_text()) == supervisor.shard_config(1)
    supervisor.shutdown()
    assert not path.parent.exists()


def test_the_sockets_live_in_a_private_directory(tmp_path: Path) -> None:
    """Beside --shard-uds-path, a fresh directory that only this user can enter holds the sockets (and the
    children's files); nothing is made until it is needed, and shutdown removes it all."""
    supervisor = Supervisor(LauncherConfig(shard_uds_path=str(tmp_path / "tgi"), num_shard=2), MODEL)
    prefix = Path(supervisor.shard_config(1).uds_path)
    assert prefix.name == "tgi" and prefix.parent.parent == tmp_path
    assert prefix.parent.name.startswith("tgi-") and not prefix.parent.exists()
    assert supervisor.router_config().shard_uds_path == str(prefix)
    assert supervisor.shard_socket(1) == f"{prefix}-1"
    directory = supervisor.run_dir()
    assert directory == prefix.parent and stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert directory.stat().st_uid == os.getuid()
    # Another run beside it gets another directory (an unguessable name, made afresh).
    other = Supervisor(LauncherConfig(shard_uds_path=str(tmp_path / "tgi")), MODEL)
    assert Path(other.socket_prefix()).parent != directory
    (directory / "tgi-0").touch()  # as a shard's socket would be
    supervisor.shutdown()
    assert list(tmp_path.iterdir()) == []


def test_a_directory_made_in_advance_is_never_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Should the private directory's name exist already (made by someone else), the launcher starts nothing
    and leaves it alone."""
    supervisor = Supervisor(LauncherConfig(shard_uds_path=str(tmp_path / "tgi")), MODEL)
    planted = Path(supervisor.socket_prefix()).parent
    planted.mkdir(mode=0o777)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert supervisor.run() == 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert "Cannot make the shards' socket directory" in caplog.text and supervisor.shards == []
    assert planted.is_dir()


@pytest.mark.parametrize(
    ("uds", "message"),
    [
        ("/does/not/exist/tgi", "`shard_uds_path` must be a name in an existing directory"),
        ("/tmp/" + "x" * 60, "`shard_uds_path` is too long"),
    ],
)
def test_a_socket_prefix_that_cannot_serve_is_refused(uds: str, message: str) -> None:
    with pytest.raises(ArgumentError, match=message):
        LauncherConfig(shard_uds_path=uds).validate()


@pytest.fixture()
def started(monkeypatch: pytest.MonkeyPatch) -> list:
    """What the router and shard commands would run with (their servers are not started)."""
    seen: list = []
    import router.app
    import shard.server

    async def serve_shard(config: ShardConfig) -> None:
        seen.append(config)

    monkeypatch.setattr(router.app, "run", seen.append)
    monkeypatch.setattr(shard.server, "serve", serve_shard)
    return seen


def test_the_router_takes_its_flags_or_a_file(started: list, tmp_path: Path, monkeypatch) -> None:
    from router.cli import app

    monkeypatch.setenv("API_KEY", "k")
    runner = CliRunner()
    result = runner.invoke(
        app, ["--tokenizer-name", "/m", "--max-best-of", "3", "--plugin", "a", "--plugin", "b"]
    )
    assert result.exit_code == 0, result.output
    config = started.pop()
    assert (config.model_id, config.max_best_of, config.plugins, config.api_key) == ("/m", 3, ("a", "b"), "k")
    assert config.max_total_tokens == 2048 and config.cors_allow_origin == ()
    file = tmp_path / "router.json"
    file.write_text(to_json(config))
    assert runner.invoke(app, ["--config", str(file)]).exit_code == 0
    assert started.pop() == config  # the key from the environment again
    result = runner.invoke(app, ["--config", str(file), "--port", "1"])
    assert result.exit_code == 2 and "--port cannot be given with it" in result.output
    result = runner.invoke(app, [])
    assert result.exit_code == 2 and "a tokenizer is needed" in result.output
    file.write_text(json.dumps({"tokenizer_name": "/m", "model_id": "m", "port": "80"}))
    result = runner.invoke(app, ["--config", str(file)])
    assert result.exit_code == 2 and "`port` must be of type int" in result.output


def test_the_shard_takes_its_flags_or_a_file(started: list, tmp_path: Path, monkeypatch) -> None:
    from shard.cli import app

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    runner = CliRunner()
    args = [
        "serve",
        "/m",
        "--cuda-graphs",
        "8,2",
        "--max-batch-total-tokens",
        "64",
        "--cuda-memory-fraction",
        "0.5",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    config = started.pop()
    assert config == ShardConfig(model_path=Path("/m"), rank=1, world_size=2, cuda_graphs=(2, 8),
                                 max_batch_total_tokens=64, cuda_memory_fraction=0.5)  # fmt: skip
    file = tmp_path / "shard.json"
    file.write_text(to_json(dataclasses.replace(config, rank=0)))
    assert runner.invoke(app, ["serve", "--config", str(file)]).exit_code == 0
    assert started.pop().rank == 0  # the file's rank, not RANK's
    result = runner.invoke(app, ["serve", "/m", "--config", str(file)])
    assert result.exit_code == 2 and "MODEL_PATH cannot be given with it" in result.output
    result = runner.invoke(app, ["serve", "/m", "--cuda-graphs", "x"])
    assert result.exit_code == 2 and "`cuda_graphs` must be comma-separated" in result.output
