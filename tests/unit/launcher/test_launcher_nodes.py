"""--nnodes / --node-rank: the launcher's rules and each node's ranks (no process is started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config import ArgumentError, LauncherConfig
from launcher.supervisor import Supervisor
from launcher.weights import ResolvedModel

LLAMA = {"model_type": "llama", "num_attention_heads": 8, "num_key_value_heads": 4, "intermediate_size": 64}


def node(**kwargs: object) -> LauncherConfig:
    return LauncherConfig(**{"num_shard": 2, "nnodes": 2, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nnodes": 0}, "`nnodes` must be >= 1. Given: 0"),
        ({"node_rank": 2}, "`node_rank` must be >= 0 and < `nnodes`. Given: 2 and 2"),
        ({"node_rank": -1}, "`node_rank` must be >= 0 and < `nnodes`. Given: -1 and 2"),
        ({"num_shard": 1, "sharded": False}, "`sharded` is false but there are 2 shards"),
        (
            {"num_shard": 1, "backend": "transformers"},
            "--num-shard 1 x --nnodes 2`: the transformers backend",
        ),
    ],
)
def test_node_flags_are_checked_before_anything_starts(kwargs: dict, message: str) -> None:
    with pytest.raises(ArgumentError, match=message.replace("(", r"\(")):
        node(**kwargs).validate()


def test_the_model_must_split_over_every_rank_of_every_node() -> None:
    node(num_shard=2).check_model(LLAMA, 0)  # 4 ranks: 8 heads, 4 KV heads
    with pytest.raises(
        ArgumentError, match=r"4 key/value heads are not divisible by --num-shard 8 \(--num-shard 4 x"
    ):
        node(num_shard=4).check_model(LLAMA, 0)
    node(num_shard=4, nnodes=1).check_model(LLAMA, 4)  # each node only needs its own GPUs
    node(num_shard=1).check_model(LLAMA, 1)


def test_node_1_runs_the_next_ranks_and_no_router(tmp_path: Path) -> None:
    model = ResolvedModel("m", tmp_path, None, None, "local", "w")
    supervisor = Supervisor(node(node_rank=1, master_addr="10.0.0.1", master_port=1234), model)
    assert list(supervisor.ranks()) == [2, 3]
    env = supervisor.shard_env(3)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("3", "4", "1")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("10.0.0.1", "1234")
    assert supervisor.shard_name(3) == "shard-1 (rank 3)"
    assert Supervisor(node(), model).router_config().num_shard == 4
    assert (supervisor.shard_config(3).rank, supervisor.shard_config(3).world_size) == (3, 4)
    assert Supervisor(LauncherConfig(num_shard=2), model).shard_name(1) == "shard-1"
