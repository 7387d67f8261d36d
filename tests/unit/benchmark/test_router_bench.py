"""``text-generation-benchmark router``: the fake shard and the real router as child processes on loopback,
the serve load generator against them; complete results, and nothing left running afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from benchmark.cli import main
from benchmark.router_bench import RouterBenchConfig, summarize

pytestmark = pytest.mark.timeout(240)

STREAMS, TOKENS, REQUESTS, RATE = 4, 12, 10, 2000.0


def children() -> set[int]:
    """This process's descendants (other tests' fixtures may hold some of their own)."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_router_against_fake_shard(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, raw = tmp_path / "router.json", tmp_path / "raw"
    argv = [
        "router", "--tokenizer", str(tiny_model_dir), "--concurrency", str(STREAMS),
        "--max-new-tokens", str(TOKENS), "--requests-per-level", str(REQUESTS), "--tokens-per-s", str(RATE),
        "--output", str(out), "--raw-dir", str(raw), "--no-progress",
    ]  # fmt: skip
    before = children()
    assert main(argv) == 0
    assert children() - before == set()  # the router and the fake shard are gone

    data = json.loads(out.read_text())
    assert data["command"] == "router" and data["config"]["concurrency"] == [STREAMS]
    (level,) = data["levels"]
    m = level["metrics"]
    assert level["concurrency"] == STREAMS
    assert (m["num_requests"], m["num_ok"], m["num_errors"]) == (REQUESTS, REQUESTS, 0)
    assert m["output_tokens"] == REQUESTS * TOKENS and m["token_count_mismatches"] == 0
    assert m["output_tokens_per_s"] > 0 and m["ttft_s"]["count"] == REQUESTS
    assert m["itl_s"]["count"] == REQUESTS * (TOKENS - 1)
    # The fake shard's steps and tokens (the serve warm-up request's included) and the router's CPU time.
    assert level["offered_tokens_per_s"] == RATE and level["shard_step_s"] == pytest.approx(STREAMS / RATE)
    assert level["shard_tokens"] == (REQUESTS + 1) * TOKENS
    steps = level["steps"]
    assert sum(level["steps_by_batch"].values()) == steps > 0
    assert set(map(int, level["steps_by_batch"])) <= set(range(1, STREAMS + 1))
    assert level["tokens_per_step"] == pytest.approx(level["shard_tokens"] / steps)
    assert 1 <= level["tokens_per_step"] <= STREAMS
    assert level["shard_requests"] == REQUESTS + 1 and level["shard_aborts"] == 0
    assert level["router_cpu_s"] > 0 and level["wall_s"] > 0
    assert level["router_cpu_s_per_1k_tokens"] == pytest.approx(
        1000 * level["router_cpu_s"] / level["shard_tokens"]
    )
    assert level["router_cpu_us_per_token"] == pytest.approx(1000 * level["router_cpu_s_per_1k_tokens"])
    assert level["router_cpu_ms_per_step"] == pytest.approx(1000 * level["router_cpu_s"] / steps)
    assert level["router_cpu_share"] == pytest.approx(level["router_cpu_s"] / level["wall_s"])
    # On a loaded machine the streams may never all share a step: the full-batch figures only if they did.
    period, build = level["shard_step_period_ms"], level["shard_step_ms"]
    assert (build is None) == (str(STREAMS) not in level["steps_by_batch"])
    assert build is None or (build["count"] == level["steps_by_batch"][str(STREAMS)] and build["median"] > 0)
    assert period is None or (period["count"] > 0 and 0 < period["median"] <= period["p99"])
    assert level["round"] == 1
    tokens_per_s = data["summary"][str(STREAMS)]["output_tokens_per_s"]
    assert tokens_per_s == {
        "runs": [m["output_tokens_per_s"]],
        "median": m["output_tokens_per_s"],
        "best": m["output_tokens_per_s"],
    }

    # Every request of the raw serve results: ok, exactly TOKENS streamed tokens, as the router counted.
    records = json.loads((raw / f"router-serve-{STREAMS}.json").read_text())["levels"][0]["records"]
    assert len(records) == REQUESTS
    for r in records:
        assert r["ok"] and r["finish_reason"] == "length", r
        assert r["output_tokens"] == r["server_output_tokens"] == len(r["token_times_s"]) == TOKENS

    table = capsys.readouterr().out
    assert str(STREAMS) in table and "tokens/s" in table


def test_router_needs_a_tokenizer_that_exists(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv = ["router", "--tokenizer", str(tmp_path / "nowhere"), "--concurrency", "2", "--no-progress"]
    before = children()
    assert main(argv) == 1
    assert "router exited" in capsys.readouterr().err
    assert children() - before == set()


def test_summary_gives_each_levels_median_and_best_over_rounds() -> None:
    def level(round_: int, streams: int, tokens_per_s: float, cpu_ms: float | None, cpu_s: float) -> dict:
        return {"round": round_, "concurrency": streams, "metrics": {"output_tokens_per_s": tokens_per_s},
                "router_cpu_ms_per_step": cpu_ms, "router_cpu_s_per_1k_tokens": cpu_s,
                "tokens_per_step": streams / 2}  # fmt: skip

    levels = [
        level(1, 64, 100.0, 2.0, 0.030), level(1, 256, 50.0, 9.0, 0.020),
        level(2, 64, 300.0, 1.0, 0.010), level(2, 256, 70.0, None, 0.025),
        level(3, 64, 200.0, 4.0, 0.020), level(3, 256, 60.0, 7.0, 0.022),
    ]  # fmt: skip
    summary = summarize(levels)
    assert list(summary) == ["64", "256"]
    assert summary["64"]["output_tokens_per_s"] == {
        "runs": [100.0, 300.0, 200.0],
        "median": 200.0,
        "best": 300.0,
    }
    assert summary["64"]["router_cpu_ms_per_step"] == {"runs": [2.0, 1.0, 4.0], "median": 2.0, "best": 1.0}
    assert summary["64"]["router_cpu_s_per_1k_tokens"]["best"] == 0.010
    assert summary["256"]["router_cpu_ms_per_step"] == {"runs": [9.0, 7.0], "median": 8.0, "best": 7.0}
    assert summary["256"]["tokens_per_step"] == {"runs": [128.0] * 3, "median": 128.0, "best": 128.0}


def test_the_offered_rate_sets_the_fake_shards_step() -> None:
    config = RouterBenchConfig(tokenizer="unused", concurrency=(64, 256), tokens_per_s=64_000.0)
    assert config.step_s(64) == pytest.approx(0.001) and config.step_s(256) == pytest.approx(0.004)
    assert RouterBenchConfig(tokenizer="unused", tokens_per_s=0.0).step_s(256) == 0.0
