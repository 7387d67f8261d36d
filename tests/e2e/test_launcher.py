"""The launcher's life cycle on a tiny random model: start, stop, child death, argument errors."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import requests

from .conftest import stop_and_check
from .harness import Launched, run_launcher

pytestmark = pytest.mark.timeout(300)


def test_sigterm_stops_everything_and_exits_zero(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = Launched(["--model-id", str(tiny_model_dir)]).start(tmp_path)
    server.wait_healthy(120)
    children = server.children()
    assert len(children) >= 2  # one shard, one router
    response = requests.post(
        f"{server.url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}, timeout=60
    )
    assert response.status_code == 200
    stop_and_check(server)
    assert "Shut down" in server.log()


def test_sigint_works_like_sigterm(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = Launched(["--model-id", str(tiny_model_dir)]).start(tmp_path)
    server.wait_healthy(120)
    assert server.stop(signal.SIGINT) == 0
    assert server.leftovers() == [] and server.stale_sockets() == []


@pytest.mark.parametrize("victim", ["shard", "router"])
def test_a_dead_child_takes_the_server_down(victim: str, tiny_model_dir: Path, tmp_path: Path) -> None:
    server = Launched(["--model-id", str(tiny_model_dir)]).start(tmp_path)
    server.wait_healthy(120)
    target = next(p for p in server.children() if f"-m {victim}" in " ".join(p.cmdline()))
    target.kill()
    code = server.wait_exit(60)
    assert code != 0
    log = server.log()
    assert f"{victim}" in log and "exited with code" in log
    assert server.leftovers() == [] and server.stale_sockets() == []


def test_missing_model_is_a_one_line_error(tmp_path: Path) -> None:
    result = run_launcher("--model-id", str(tmp_path / "does-not-exist"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "does-not-exist" in errors[0]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--max-input-length", "3000"], {}, "`max_input_length` must be < `max_total_tokens`"),
        ([], {"MAX_INPUT_LENGTH": "4000"}, "Given: 4000 and 2048"),
        (
            ["--max-batch-prefill-tokens", "512"],
            {},
            "`max_batch_prefill_tokens` must be >= `max_input_length`",
        ),
        (["--quantize", "gptq"], {}, "`--quantize gptq` is not supported"),
        (["--quantize", "int3"], {}, "`quantize` must be one of"),
        (["--num-shard", "2"], {}, "9 attention heads are not divisible by --num-shard 2"),
        (["--nnodes", "2", "--node-rank", "2"], {}, "`node_rank` must be >= 0 and < `nnodes`"),
        (["--sharded", "true", "--num-shard", "1"], {}, "`sharded` is true"),
        (["--dtype", "float64"], {}, "`dtype` must be one of"),
    ],
)
def test_argument_rules_fail_fast(args: list[str], env: dict[str, str], message: str) -> None:
    started = time.monotonic()
    result = run_launcher(*args, env=env)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert time.monotonic() - started < 60


def test_every_flag_reads_its_environment_variable() -> None:
    result = run_launcher("--help", env={"COLUMNS": "200"})
    assert result.returncode == 0
    for env_var in (
        "MODEL_ID",
        "MAX_CONCURRENT_REQUESTS",
        "MAX_BATCH_PREFILL_TOKENS",
        "SHARD_UDS_PATH",
        "PORT",
        "NNODES",
        "NODE_RANK",
    ):
        assert env_var in result.stdout


def test_max_total_tokens_past_the_models_positions_stops_before_any_process(
    test_cache: Path, tmp_path: Path
) -> None:
    """The default model has 8192 positions: the launcher refuses 9500 after the weights step, before
    any shard or router starts."""
    args = [
        "--huggingface-hub-cache", str(test_cache / "hub"),
        "--max-input-length", "9000",
        "--max-total-tokens", "9500",
        "--max-batch-prefill-tokens", "9000",
    ]  # fmt: skip
    server = Launched(args).start(tmp_path)
    deadline = time.monotonic() + 600
    while server.process.poll() is None and time.monotonic() < deadline:
        server._remember_children()
        time.sleep(0.05)
    assert server.wait_exit(10) == 2, server.log()[-3000:]
    log = server.log()
    assert (
        "Error: `max_total_tokens` (9500) must be <= the model's 8192 positions (max_position_embeddings)"
        in log
    )
    assert "Traceback" not in log and "Starting shard" not in log
    assert server.seen_pids == set() and server.stale_sockets() == []


def test_max_batch_total_tokens_is_the_paged_kv_cache(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--max-batch-total-tokens sizes the paged backend's KV pool exactly; the router reports that."""
    args = [
        "--model-id", str(tiny_model_dir),
        "--max-batch-total-tokens", "512",
        "--max-total-tokens", "256",
        "--max-input-length", "128",
        "--max-batch-prefill-tokens", "128",
    ]  # fmt: skip
    server = Launched(args).start(tmp_path)
    server.wait_healthy(120)
    info = requests.get(f"{server.url}/info", timeout=10).json()
    assert info["max_batch_total_tokens"] == 512 and info["max_total_tokens"] == 256
    response = requests.post(
        f"{server.url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}, timeout=60
    )
    assert response.status_code == 200
    metrics = requests.get(f"{server.url}/metrics", timeout=10).text
    assert "tgi_kv_cache_tokens 512.0" in metrics.splitlines()
    assert "Paged KV cache: 32 blocks of 16 tokens (512 tokens" in server.log()
    stop_and_check(server)


def test_a_kv_cache_past_the_memory_is_refused_at_start(tiny_model_dir: Path, tmp_path: Path) -> None:
    server = Launched(["--model-id", str(tiny_model_dir), "--max-batch-total-tokens", str(10**12)])
    server.start(tmp_path)
    assert server.wait_exit(120) == 1
    log = server.log()
    assert (
        f"`max_batch_total_tokens` ({10**12}) is more than the " in log
        and "tokens the KV cache can hold" in log
    )
    assert "Traceback" not in log
    assert server.leftovers() == [] and server.stale_sockets() == []
