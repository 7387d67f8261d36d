"""``text-generation-benchmark shard``: the arithmetic on hand-made timings, whole runs against the fake shard
(a real gRPC server on a temporary Unix socket, in a thread of this process), and one run against the real
shard process on the tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import grpc
import psutil
import pytest

from benchmark.cli import main
from benchmark.shard_bench import (
    RunTiming,
    SamplingParams,
    ShardBenchConfig,
    Stats,
    format_summary,
    run_shard_benchmark,
    summarize,
)
from proto import pb, pb_grpc
from tests.fake_shard import FakeShard
from tests.unit.test_benchmark_floor import synthetic_floor

REPO = Path(__file__).resolve().parents[2]


class CountingShard(FakeShard):
    """The fake shard, remembering what each call named."""

    def __init__(self) -> None:
        super().__init__(vocab_size=1000)
        self.prefill_batches: list[list[pb.Request]] = []
        self.decode_calls: list[list[int]] = []
        self.clears: list[int | None] = []

    async def Prefill(self, request, context):
        self.prefill_batches.append(list(request.batch.requests))
        return await super().Prefill(request, context)

    async def Decode(self, request, context):
        self.decode_calls.append([rid for b in request.batches for rid in b.request_ids])
        return await super().Decode(request, context)

    async def ClearCache(self, request, context):
        self.clears.append(request.id if request.HasField("id") else None)
        return await super().ClearCache(request, context)


class ShardThread:
    """A CountingShard served on ``{prefix}-0`` by an event loop in a daemon thread."""

    def __init__(self) -> None:
        self.prefix = f"/tmp/tgi-shardbench-{uuid.uuid4().hex[:8]}"
        self.shard = CountingShard()
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = grpc.aio.server()
        pb_grpc.add_TextGenerationServiceServicer_to_server(self.shard, self.server)
        self.server.add_insecure_port(f"unix://{self.prefix}-0")
        self.loop.run_until_complete(self.server.start())
        self.started.set()
        self.loop.run_forever()

    def start(self) -> ShardThread:
        self.thread.start()
        assert self.started.wait(10), "fake shard did not start"
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        Path(f"{self.prefix}-0").unlink(missing_ok=True)


@pytest.fixture
def fake():
    shard = ShardThread().start()
    try:
        yield shard
    finally:
        shard.stop()


# ---------------------------------------------------------------------------------------------------------
# Arithmetic


@pytest.mark.timeout(10)
def test_stats_of_values() -> None:
    stats = Stats.of([float(v) for v in range(1, 101)])
    assert stats.avg == pytest.approx(50.5) and stats.min == 1 and stats.max == 100
    assert stats.p50 == pytest.approx(50.5)
    assert stats.p90 == pytest.approx(90.1)
    assert stats.p99 == pytest.approx(99.01)
    single = Stats.of([3.0])
    assert single.avg == single.min == single.max == single.p50 == single.p99 == 3.0
    with pytest.raises(ValueError):
        Stats.of([])


@pytest.mark.timeout(10)
def test_summarize_latency_and_throughput() -> None:
    timings = [
        RunTiming(batch_size=4, prefill_s=0.010, decode_s=0.070, decode_steps=7),
        RunTiming(batch_size=4, prefill_s=0.020, decode_s=0.140, decode_steps=7),
    ]
    s = summarize(timings)
    assert s.batch_size == 4 and s.runs == 2 and s.decode_steps == 7
    assert s.prefill_latency_ms.avg == pytest.approx(15.0)
    assert (s.prefill_latency_ms.min, s.prefill_latency_ms.max) == pytest.approx((10.0, 20.0))
    assert s.prefill_latency_ms.p90 == pytest.approx(19.0)
    # requests/s = batch / prefill latency: 4 / 0.010 = 400 and 4 / 0.020 = 200
    assert (s.prefill_throughput_rps.min, s.prefill_throughput_rps.max) == pytest.approx((200.0, 400.0))
    assert s.prefill_throughput_rps.avg == pytest.approx(300.0)
    assert s.decode_latency_ms.avg == pytest.approx(105.0)
    # per step: 70 ms / 7 = 10 ms and 140 ms / 7 = 20 ms
    assert (s.decode_token_latency_ms.min, s.decode_token_latency_ms.max) == pytest.approx((10.0, 20.0))
    # tokens/s = batch x steps / decode time: 28 / 0.070 = 400 and 28 / 0.140 = 200
    assert (s.decode_throughput_tps.min, s.decode_throughput_tps.max) == pytest.approx((200.0, 400.0))
    assert s.decode_throughput_tps.p50 == pytest.approx(300.0)
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([*timings, RunTiming(batch_size=2, prefill_s=0.01, decode_s=0.07, decode_steps=7)])


@pytest.mark.timeout(10)
def test_config_rules() -> None:
    config = ShardBenchConfig(uds_path="/tmp/x", num_shard=2, decode_length=8)
    assert config.socket == "/tmp/x-0" and config.decode_steps == 7
    with pytest.raises(ValueError, match="decode-length"):
        ShardBenchConfig(decode_length=1)


# ---------------------------------------------------------------------------------------------------------
# Against the fake shard


@pytest.mark.timeout(30)
async def test_runs_against_fake_shard(fake: ShardThread) -> None:
    params = SamplingParams(temperature=0.7, top_k=5, do_sample=True, seed=42)
    config = ShardBenchConfig(
        uds_path=fake.prefix, batch_sizes=(1, 3), sequence_length=6, decode_length=4, warmups=1, runs=2,
        params=params,
    )  # fmt: skip
    said: list[str] = []
    result = await run_shard_benchmark(config, progress=said.append)
    shard = fake.shard

    # (warmups + runs) prefills per batch size, each of batch-size distinct prompts from the vocabulary
    assert [len(b) for b in shard.prefill_batches] == [1, 1, 1, 3, 3, 3]
    for batch in shard.prefill_batches:
        prompts = [tuple(r.input_ids) for r in batch]
        assert len(set(prompts)) == len(prompts)
        for r in batch:
            assert len(r.input_ids) == 6 and all(0 <= t < 1000 for t in r.input_ids)
            assert r.max_new_tokens == 4 and r.min_new_tokens == 4
            assert r.parameters.top_k == 5 and r.parameters.do_sample and r.parameters.seed == 42
            assert r.parameters.temperature == pytest.approx(0.7)
    request_ids = [r.id for b in shard.prefill_batches for r in b]
    assert len(set(request_ids)) == len(request_ids)

    # decode_length - 1 = 3 steps per run, every step naming every request of the run
    assert len(shard.decode_calls) == 6 * 3
    for run, batch in enumerate(shard.prefill_batches):
        ids = [r.id for r in batch]
        assert shard.decode_calls[3 * run : 3 * run + 3] == [ids] * 3
    assert len(shard.clears) == 6 and None not in shard.clears
    assert shard.batches == {}  # every run's batch was cleared

    assert [r.batch_size for r in result.results] == [1, 3]
    assert [t.batch_size for t in result.timings] == [1, 1, 3, 3]  # measured runs only
    for stats in result.results:
        assert stats.runs == 2 and stats.decode_steps == 3
        assert (
            0 < stats.prefill_latency_ms.min <= stats.prefill_latency_ms.avg <= stats.prefill_latency_ms.max
        )
        assert stats.decode_throughput_tps.avg > 0
    assert result.info["backend"] == "fake" and result.info["vocab_size"] == 1000
    assert any("batch 3" in line for line in said)

    data = json.loads(json.dumps(result.to_json()))
    assert data["benchmark"] == "shard" and data["config"]["batch_sizes"] == [1, 3]
    first = data["results"][0]
    for key in (
        "prefill_latency_ms", "prefill_throughput_rps", "decode_latency_ms", "decode_token_latency_ms",
        "decode_throughput_tps",
    ):  # fmt: skip
        assert set(first[key]) == {"avg", "min", "max", "p50", "p90", "p99"}
    assert len(data["runs"]) == 4

    summary = format_summary(result)
    for text in ("Prefill", "Decode (token)", "Decode (total)", "Decode (tokens/s)", "p99 (ms)"):
        assert text in summary


@pytest.mark.timeout(30)
def test_cli_against_fake_shard(fake: ShardThread, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "shard.json"
    floor = tmp_path / "floor.json"
    floor.write_text(json.dumps(synthetic_floor()))
    argv = [
        "shard", "--floor", str(floor), "--uds-path", fake.prefix, "--batch-sizes", "2,4",
        "--sequence-length", "5", "--decode-length", "3", "--warmups", "0", "--runs", "3", "--top-p", "0.9",
        "--output", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "Latency" in stdout and "Throughput" in stdout and "versus the floor" in stdout
    data = json.loads(out.read_text())
    assert [r["batch_size"] for r in data["results"]] == [2, 4]
    assert data["config"]["params"]["top_p"] == pytest.approx(0.9)
    assert len(fake.shard.prefill_batches) == 6 and len(fake.shard.decode_calls) == 12
    versus = data["versus_floor"]
    assert [v["batch_size"] for v in versus] == [2, 4]
    for v, r in zip(versus, data["results"], strict=True):
        assert v["steps_per_s"] == pytest.approx(1000 / r["decode_token_latency_ms"]["p50"])
        assert v["fraction_of_decode_floor"] == pytest.approx(v["steps_per_s"] / 39.03, rel=1e-3)
        assert v["fraction_of_compute_ceiling"] == pytest.approx(v["tokens_per_s"] / 1000)


@pytest.mark.timeout(30)
def test_cli_errors(capsys: pytest.CaptureFixture) -> None:
    assert main(["shard", "--decode-length", "1"]) == 2
    assert "decode-length" in capsys.readouterr().err
    assert main(["shard", "--batch-sizes", "0,2"]) == 2
    assert main(["shard", "--floor", "/nonexistent/floor.json"]) == 2
    start = time.monotonic()
    missing = f"/tmp/tgi-shardbench-missing-{uuid.uuid4().hex[:8]}"
    assert main(["shard", "--uds-path", missing, "--no-progress"]) == 1
    assert "shard call failed" in capsys.readouterr().err
    assert time.monotonic() - start < 20


# ---------------------------------------------------------------------------------------------------------
# Against the real shard


@pytest.mark.timeout(120)
def test_against_real_shard(tiny_model_dir: Path, tmp_path: Path) -> None:
    prefix = f"/tmp/tgi-shardbench-real-{uuid.uuid4().hex[:8]}"
    socket = Path(f"{prefix}-0")
    log = (tmp_path / "shard.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "shard", "serve", str(tiny_model_dir), "--uds-path", prefix],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 90
        while not socket.exists():
            assert process.poll() is None, (tmp_path / "shard.log").read_text()
            assert time.monotonic() < deadline, "the shard did not come up"
            time.sleep(0.1)
        children = psutil.Process(process.pid).children(recursive=True)
        out = tmp_path / "real.json"
        argv = [
            "shard", "--uds-path", prefix, "--batch-sizes", "1,2", "--decode-length", "3", "--warmups", "1",
            "--runs", "1", "--output", str(out), "--no-progress",
        ]  # fmt: skip
        assert main(argv) == 0
        data = json.loads(out.read_text())
        assert data["info"]["backend"] == "paged" and data["info"]["vocab_size"] > 0
        assert [r["batch_size"] for r in data["results"]] == [1, 2]
        for r in data["results"]:
            assert r["runs"] == 1 and r["decode_steps"] == 2
            assert r["prefill_latency_ms"]["avg"] > 0 and r["decode_throughput_tps"]["avg"] > 0
        for run in data["runs"]:
            assert run["shard_prefill_s"] > 0 and run["shard_decode_s"] > 0
            assert run["shard_prefill_s"] <= run["prefill_s"]
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()
        leftover = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
        for child in leftover:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        socket_left = socket.exists()
        socket.unlink(missing_ok=True)
    assert process.returncode is not None
    assert not leftover, f"processes left behind: {leftover}"
    assert not socket_left
