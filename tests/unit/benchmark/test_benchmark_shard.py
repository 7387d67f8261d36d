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
from tests.unit.benchmark.test_benchmark_floor import synthetic_floor

REPO = Path(__file__).resolve().parents[3]


class CountingShard(pb_grpc.TextGenerationServiceServicer):
    """A fake shard that speaks the Generate stream as the real engine core does: while requests are live
    it runs steps by itself; a step gives every running request its next token and at most
    ``prompts_per_step`` waiting prompts their first one (0: all of them, one step), and ends a request at
    its max_new_tokens (LENGTH), or, with ``end_early_with``, after 2 tokens with that reason. It remembers
    every GenerateRequest and every step output it sent."""

    def __init__(self, prompts_per_step: int = 0, end_early_with: int = pb.FINISH_NONE) -> None:
        self.vocab_size = 1000
        self.prompts_per_step = prompts_per_step
        self.end_early_with = end_early_with
        self.adds: list[list[pb.Request]] = []
        self.outputs: list[pb.StepOutput] = []
        self.streams = 0
        self.streams_ended = 0
        self.live: dict[int, list] = {}  # id -> [request, tokens so far]

    async def Info(self, request, context):
        return pb.InfoResponse(
            requires_padding=False, dtype="float32", device_type="cpu", world_size=1, backend="fake",
            vocab_size=self.vocab_size,
        )  # fmt: skip

    async def Health(self, request, context):
        return pb.HealthResponse()

    async def Generate(self, requests, context):
        self.streams += 1
        inbox: asyncio.Queue[pb.GenerateRequest | None] = asyncio.Queue()
        waiting: list[int] = []
        running: list[int] = []

        async def read() -> None:
            async for message in requests:
                inbox.put_nowait(message)
            inbox.put_nowait(None)

        def apply(message: pb.GenerateRequest) -> None:
            self.adds.append(list(message.add))
            for r in message.add:
                self.live[r.id] = [r, 0]
                waiting.append(r.id)

        reader = asyncio.create_task(read())
        try:
            while True:
                if not self.live:  # idle: wait for requests (or the end of the stream)
                    message = await inbox.get()
                    if message is None:
                        return
                    apply(message)
                while not inbox.empty():
                    message = inbox.get_nowait()
                    if message is None:
                        return
                    apply(message)
                started = time.perf_counter_ns()
                await asyncio.sleep(0.002)  # the step's "forward"
                take = len(waiting) if self.prompts_per_step == 0 else self.prompts_per_step
                joining, waiting[:take] = waiting[:take], []
                rows = [*running, *joining]
                reasons = []
                for rid in rows:
                    entry = self.live[rid]
                    entry[1] += 1
                    if entry[1] >= entry[0].max_new_tokens:
                        reasons.append(pb.FINISH_LENGTH)
                    elif self.end_early_with and entry[1] == 2:
                        reasons.append(self.end_early_with)
                    else:
                        reasons.append(pb.FINISH_NONE)
                running = [rid for rid, reason in zip(rows, reasons, strict=True) if not reason]
                for rid, reason in zip(rows, reasons, strict=True):
                    if reason:
                        del self.live[rid]
                out = pb.StepOutput(
                    generations=pb.Generations(
                        request_ids=rows, token_ids=[7] * len(rows), logprobs=[-0.5] * len(rows),
                        finish_reasons=reasons,
                    ),
                    total_ns=time.perf_counter_ns() - started, waiting=len(waiting), running=len(running),
                    prefill=bool(joining) and len(rows) == len(joining),
                )  # fmt: skip
                self.outputs.append(out)
                yield out
        finally:
            reader.cancel()
            for rid in [*waiting, *running]:  # the stream's requests end with it
                self.live.pop(rid, None)
            self.streams_ended += 1


class ShardThread:
    """A CountingShard served on ``{prefix}-0`` by an event loop in a daemon thread."""

    def __init__(self, shard: CountingShard | None = None) -> None:
        self.prefix = f"/tmp/tgi-shardbench-{uuid.uuid4().hex[:8]}"
        self.shard = shard or CountingShard()
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
def fake(request: pytest.FixtureRequest):
    """The fake shard; an indirect parameter gives CountingShard's arguments."""
    shard = ShardThread(CountingShard(**getattr(request, "param", {}))).start()
    try:
        yield shard
    finally:
        shard.stop()


def runs_of(shard: CountingShard) -> list[tuple[list[int], list[pb.StepOutput]]]:
    """Each GenerateRequest's request ids, with the step outputs that answered for them."""
    runs = []
    for add in shard.adds:
        ids = {r.id for r in add}
        outputs = [o for o in shard.outputs if ids & set(o.generations.request_ids)]
        runs.append(([r.id for r in add], outputs))
    return runs


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
    # decode tokens counted in the run (fewer than batch x steps when the prompts ran over several steps)
    spread = summarize(
        [RunTiming(batch_size=4, prefill_s=0.01, decode_s=0.070, decode_steps=7, decode_tokens=21)]
    )
    assert spread.decode_throughput_tps.avg == pytest.approx(300.0)  # 21 / 0.070
    assert spread.decode_token_latency_ms.avg == pytest.approx(10.0)
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

    # one Generate stream for the whole sweep, ended with it, and nothing left running on the shard
    assert shard.streams == 1 and shard.streams_ended == 1 and shard.live == {}
    # (warmups + runs) additions per batch size, each of batch-size distinct prompts from the vocabulary
    assert [len(add) for add in shard.adds] == [1, 1, 1, 3, 3, 3]
    for add in shard.adds:
        prompts = [tuple(r.input_ids) for r in add]
        assert len(set(prompts)) == len(prompts)
        for r in add:
            assert len(r.input_ids) == 6 and all(0 <= t < 1000 for t in r.input_ids)
            assert r.max_new_tokens == 4 and r.ignore_eos
            assert r.parameters.top_k == 5 and r.parameters.do_sample and r.parameters.seed == 42
            assert r.parameters.temperature == pytest.approx(0.7)
    request_ids = [r.id for add in shard.adds for r in add]
    assert len(set(request_ids)) == len(request_ids)
    # every run: one step gives every request its first token, then 3 decode steps name them all
    runs = runs_of(shard)
    assert len(shard.outputs) == 6 * 4
    for ids, outputs in runs:
        assert [list(o.generations.request_ids) for o in outputs] == [ids] * 4

    assert [r.batch_size for r in result.results] == [1, 3]
    assert [t.batch_size for t in result.timings] == [1, 1, 3, 3]  # measured runs only
    measured = [outputs for _, outputs in runs[1:3] + runs[4:6]]
    for timing, outputs in zip(result.timings, measured, strict=True):
        assert timing.decode_steps == 3 and timing.decode_tokens == 3 * timing.batch_size
        # the shard's own times are those of the outputs of each phase
        assert timing.shard_prefill_s == pytest.approx(outputs[0].total_ns / 1e9)
        assert timing.shard_decode_s == pytest.approx(sum(o.total_ns for o in outputs[1:]) / 1e9)
        # the prefill steps run between sending the requests and reading the last first token (the decode
        # steps run ahead of the reading: the shard does not wait for it)
        assert 0 < timing.shard_prefill_s <= timing.prefill_s and timing.shard_decode_s > 0
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
@pytest.mark.parametrize("fake", [{"prompts_per_step": 2}], indirect=True)
async def test_first_tokens_over_several_steps(fake: ShardThread) -> None:
    """Chunked prefill: 5 prompts, 2 per step. The prefill lasts until the 5th has its first token (3
    outputs, the first 2 requests decoding meanwhile); the decode is what follows: 3 steps, 5 + 3 + 1
    tokens as the requests end one pair after another."""
    config = ShardBenchConfig(
        uds_path=fake.prefix, batch_sizes=(5,), sequence_length=4, decode_length=4, warmups=0, runs=2
    )
    result = await run_shard_benchmark(config)
    runs = runs_of(fake.shard)
    assert len(runs) == 2 and fake.shard.live == {}
    for timing, (ids, outputs) in zip(result.timings, runs, strict=True):
        rows = [list(o.generations.request_ids) for o in outputs]
        assert rows == [ids[:2], ids[:4], ids, ids, ids[2:], ids[4:]]
        assert timing.decode_steps == 3 and timing.decode_tokens == 9
        assert timing.shard_prefill_s == pytest.approx(sum(o.total_ns for o in outputs[:3]) / 1e9)
        assert timing.shard_decode_s == pytest.approx(sum(o.total_ns for o in outputs[3:]) / 1e9)
        assert timing.prefill_s >= 3 * 0.002  # the 3 steps of the prompts, 2 ms each at least
    stats = result.results[0]
    assert stats.decode_steps == 3
    tps = sorted(t.decode_tokens / t.decode_s for t in result.timings)
    assert (stats.decode_throughput_tps.min, stats.decode_throughput_tps.max) == pytest.approx(tuple(tps))


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fake", [{"end_early_with": pb.FINISH_EOS}], indirect=True)
def test_a_request_that_ends_before_its_length_is_an_error(
    fake: ShardThread, capsys: pytest.CaptureFixture
) -> None:
    argv = ["shard", "--uds-path", fake.prefix, "--batch-sizes", "2", "--decode-length", "4", "--no-progress"]
    assert main(argv) == 1
    assert "ended (FINISH_EOS) after 2 tokens" in capsys.readouterr().err
    deadline = time.monotonic() + 5
    while fake.shard.streams_ended < 1:  # the stream was closed, and its requests went with it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert fake.shard.live == {}


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
    assert [len(add) for add in fake.shard.adds] == [2, 2, 2, 4, 4, 4]
    assert len(fake.shard.outputs) == 6 * 3  # one prefill step and 2 decode steps per run
    assert [run["decode_tokens"] for run in data["runs"]] == [4, 4, 4, 8, 8, 8]
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
        for run in data["runs"]:  # the prompts are short: each batch's run in one step
            assert run["decode_steps"] == 2 and run["decode_tokens"] == 2 * run["batch_size"]
            assert 0 < run["shard_prefill_s"] <= run["prefill_s"] and run["shard_decode_s"] > 0
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
