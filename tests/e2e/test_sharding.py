"""Tensor parallelism on CPU (gloo): N shard processes, each with 1/N of the weights, answer exactly as one.

The default model (9 heads, 3 KV heads) runs on 3 shards and is refused on 2; a tiny random model with
even head counts runs on 2. Greedy token ids must equal the single-shard ones for 20 prompts, streamed
and in concurrent batches. A killed shard takes the server down.

Two "nodes" on loopback (two launchers, --nnodes 2, one shard each, one master port) answer as one shard;
stopping node 0 stops node 1 (exit 0), and a shard killed on node 1 takes node 0 down (exit 1).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest
import requests

from .conftest import stop_and_check
from .harness import FLOAT32, Launched, free_port
from .test_launcher import run_launcher

pytestmark = pytest.mark.timeout(900)

PROMPTS = [f"Prompt {i}: the {w} of the" for i, w in enumerate(["capital", "history", "colour", "size"] * 5)]
TOKENS = 12


def greedy_ids(server: Launched, prompts: list[str], stream: bool) -> list[list[int]]:
    """Every prompt's greedy token ids, all requests in flight at once (one concurrent batch)."""

    async def one(session: aiohttp.ClientSession, prompt: str) -> list[int]:
        params = {"max_new_tokens": TOKENS, "ignore_eos_token": True, "details": True}
        body = {"inputs": prompt, "parameters": params}
        if not stream:
            async with session.post(f"{server.url}/generate", json=body) as r:
                assert r.status == 200, await r.text()
                return [t["id"] for t in (await r.json())["details"]["tokens"]]
        ids = []
        async with session.post(f"{server.url}/generate_stream", json=body) as r:
            assert r.status == 200, await r.text()
            async for raw in r.content:
                if raw.startswith(b"data:"):
                    ids.append(json.loads(raw[5:])["token"]["id"])
        return ids

    async def run() -> list[list[int]]:
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(one(session, p) for p in prompts))

    return asyncio.run(run())


def shard_rss_mb(server: Launched) -> list[float]:
    shards = [p for p in server.children() if "-m shard" in " ".join(p.cmdline())]
    return [round(p.memory_info().rss / 2**20) for p in shards]


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One shard's answers on the tiny model (the baseline for the sharded run)."""
    server = Launched(["--model-id", str(tiny_model_dir)]).start(tmp_path_factory.mktemp("one"))
    try:
        server.wait_healthy(180)
        yield {"plain": greedy_ids(server, PROMPTS, False), "stream": greedy_ids(server, PROMPTS, True)}
    finally:
        stop_and_check(server)


def test_two_shards_answer_as_one(tiny_model_dir: Path, reference: dict, tmp_path: Path) -> None:
    server = Launched(["--model-id", str(tiny_model_dir), "--num-shard", "2"]).start(tmp_path)
    try:
        server.wait_healthy(180)
        info = requests.get(f"{server.url}/info", timeout=10).json()
        assert info["num_shard"] == 2
        assert greedy_ids(server, PROMPTS, False) == reference["plain"]
        assert greedy_ids(server, PROMPTS, True) == reference["stream"]
        print(
            f"\n2 shards: 20 prompts identical to 1 shard, streamed and batched; shard RSS {shard_rss_mb(server)} MB"
        )
    finally:
        stop_and_check(server)


def test_a_killed_shard_takes_the_sharded_server_down(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = Launched(["--model-id", str(tiny_model_dir), "--num-shard", "2"]).start(tmp_path)
    try:
        server.wait_healthy(180)
        victim = next(
            p
            for p in server.children()
            if "-m shard" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"
        )
        killed_at = time.monotonic()
        victim.kill()
        code = server.wait_exit(10)
        print(f"\nrank 1 killed: launcher exit {code} after {time.monotonic() - killed_at:.1f} s")
        assert code != 0
        assert "shard-1 exited" in server.log()
        assert server.leftovers() == []
        assert server.stale_sockets() == []
    finally:
        if server.process is not None and server.process.poll() is None:
            server.kill_all()


def start_two_nodes(model_dir: Path, tmp_path: Path) -> tuple[Launched, Launched]:
    """Node 0 (shard rank 0 and the router) and node 1 (rank 1), as two machines would run them."""
    common = ["--model-id", str(model_dir), "--nnodes", "2", "--num-shard", "1",
              "--master-addr", "127.0.0.1", "--master-port", str(free_port())]  # fmt: skip
    node0 = Launched([*common, "--node-rank", "0"]).start(tmp_path)
    node1 = Launched([*common, "--node-rank", "1"]).start(tmp_path)
    try:
        node0.wait_healthy(300)
    except BaseException:
        node0.kill_all()
        node1.kill_all()
        raise
    node1.children()  # remembered, for leftovers()
    return node0, node1


def shard_of(server: Launched) -> psutil.Process:
    return next(p for p in server.children() if "-m shard" in " ".join(p.cmdline()))


def test_two_nodes_answer_as_one_and_stop_together(
    tiny_model_dir: Path, reference: dict, tmp_path: Path
) -> None:
    node0, node1 = start_two_nodes(tiny_model_dir, tmp_path)
    try:
        assert requests.get(f"{node0.url}/info", timeout=10).json()["num_shard"] == 2
        assert shard_of(node1).environ()["RANK"] == "1" and "Node 1 of 2 serving ranks [1]" in node1.log()
        assert greedy_ids(node0, PROMPTS, False) == reference["plain"]
        assert greedy_ids(node0, PROMPTS, True) == reference["stream"]
        # A clean stop of node 0 stops node 1 cleanly too: rank 0 tells its followers to stop.
        stopped_at = time.monotonic()
        stop_and_check(node0)
        code = node1.wait_exit(60)
        print(f"\n2 nodes: 20 prompts identical to 1 shard; node 0 stopped, node 1 exit {code} after "
              f"{time.monotonic() - stopped_at:.1f} s")  # fmt: skip
        assert code == 0, node1.log()[-3000:]
        assert "shard-0 (rank 1) stopped: node 0 shut the server down" in node1.log()
        assert node1.leftovers() == [] and node1.stale_sockets() == []
    finally:
        for node in (node0, node1):
            if node.process is not None and node.process.poll() is None:
                node.kill_all()


def test_a_shard_killed_on_node_1_takes_node_0_down(tiny_model_dir: Path, tmp_path: Path) -> None:
    node0, node1 = start_two_nodes(tiny_model_dir, tmp_path)
    try:
        killed_at = time.monotonic()
        shard_of(node1).kill()
        code1 = node1.wait_exit(30)
        code0 = node0.wait_exit(30)
        print(f"\nrank 1 killed on node 1: node 1 exit {code1}, node 0 exit {code0} after "
              f"{time.monotonic() - killed_at:.1f} s")  # fmt: skip
        assert code1 != 0 and "shard-0 (rank 1) exited with code -9" in node1.log()
        assert code0 != 0 and "Lost rank 1" in node0.log()
        assert "shard-0 (rank 0) exited with code 1" in node0.log()
        for node in (node0, node1):
            assert node.leftovers() == [] and node.stale_sockets() == []
    finally:
        for node in (node0, node1):
            if node.process is not None and node.process.poll() is None:
                node.kill_all()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-shard", "2"], "9 attention heads are not divisible by --num-shard 2"),
        (["--num-shard", "3", "--backend", "transformers"], "the transformers backend cannot shard"),
        (
            ["--nnodes", "2"],
            "9 attention heads are not divisible by --num-shard 2 (--num-shard 1 x --nnodes 2)",
        ),
        (["--nnodes", "2", "--node-rank", "2"], "`node_rank` must be >= 0 and < `nnodes`. Given: 2 and 2"),
    ],
)
def test_impossible_splits_are_refused_before_start(args: list[str], message: str, test_cache: Path) -> None:
    result = run_launcher("--huggingface-hub-cache", str(test_cache / "hub"), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_default_model_on_three_shards(default_server: Launched, test_cache: Path, tmp_path: Path) -> None:
    prompts = PROMPTS  # 20, all in flight at once
    one = greedy_ids(default_server, prompts, False)
    # In default_server's dtype: the two servers' tokens are compared.
    args = ["--huggingface-hub-cache", str(test_cache / "hub"), "--num-shard", "3", *FLOAT32]
    server = Launched(args).start(tmp_path)
    try:
        server.wait_healthy(600)
        assert greedy_ids(server, prompts, False) == one
        assert greedy_ids(server, prompts, True) == one
        ranks = [float(m) for m in re.findall(r"Weights on rank \d/3: ([\d.]+) MB", server.log())]
        alone = [float(m) for m in re.findall(r"Weights on rank 0/1: ([\d.]+) MB", default_server.log())]
        print(
            f"\n3 shards on the default model: identical greedy ids; weights per rank {ranks} MB vs {alone} alone"
        )
        assert len(ranks) == 3 and max(ranks) < 0.4 * alone[0]
    finally:
        stop_and_check(server)
