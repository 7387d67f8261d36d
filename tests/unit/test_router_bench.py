"""``text-generation-benchmark router``: the fake shard and the real router as child processes on loopback,
the serve load generator against them; complete results, and nothing left running afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from benchmark.cli import main
from benchmark.router_bench import summarize

pytestmark = pytest.mark.timeout(240)

STREAMS, TOKENS, REQUESTS = 4, 12, 10


def children() -> set[int]:
    """This process's descendants (other tests' fixtures may hold some of their own)."""
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_router_against_fake_shard(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, raw = tmp_path / "router.json", tmp_path / "raw"
    argv = [
        "router", "--tokenizer", str(tiny_model_dir), "--concurrency", str(STREAMS),
        "--max-new-tokens", str(TOKENS), "--requests-per-level", str(REQUESTS),
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
    # The fake shard timed decode steps and the router's CPU time was read. On a loaded machine the
    # streams may never all share one step, so the full-batch figure is checked only when there is one.
    assert sum(level["decode_steps_by_batch"].values()) > 0
    step = level["router_step_ms"]
    assert step is None or (step["count"] > 0 and 0 < step["median"] <= step["p99"])
    handling = level["shard_decode_ms"]  # the fake shard's own time, kept out of the router's
    assert (handling is None) == (step is None)
    assert handling is None or (handling["count"] >= step["count"] and handling["median"] > 0)
    assert level["prefills"] >= 1 and level["router_cpu_s"] > 0 and level["router_cpu_us_per_token"] > 0
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
    def level(round_: int, streams: int, tokens_per_s: float, step_ms: float | None, cpu_us: float) -> dict:
        step = None if step_ms is None else {"median": step_ms}
        return {"round": round_, "concurrency": streams, "metrics": {"output_tokens_per_s": tokens_per_s},
                "router_step_ms": step, "router_cpu_us_per_token": cpu_us}  # fmt: skip

    levels = [
        level(1, 64, 100.0, 2.0, 30.0), level(1, 256, 50.0, 9.0, 20.0),
        level(2, 64, 300.0, 1.0, 10.0), level(2, 256, 70.0, None, 25.0),
        level(3, 64, 200.0, 4.0, 20.0), level(3, 256, 60.0, 7.0, 22.0),
    ]  # fmt: skip
    summary = summarize(levels)
    assert list(summary) == ["64", "256"]
    assert summary["64"]["output_tokens_per_s"] == {
        "runs": [100.0, 300.0, 200.0],
        "median": 200.0,
        "best": 300.0,
    }
    assert summary["64"]["router_step_ms_median"] == {"runs": [2.0, 1.0, 4.0], "median": 2.0, "best": 1.0}
    assert summary["64"]["router_cpu_us_per_token"]["best"] == 10.0
    assert summary["256"]["router_step_ms_median"] == {"runs": [9.0, 7.0], "median": 8.0, "best": 7.0}
