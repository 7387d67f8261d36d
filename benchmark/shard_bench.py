"""``text-generation-benchmark shard``: prefill and decode latency measured straight on the shards' gRPC
service, without the router (TGI's ``text-generation-benchmark``).

It opens the shard's one ``Generate`` stream (proto/generate.proto) for the whole sweep. For every batch
size, ``warmups`` unmeasured runs then ``runs`` measured ones, each: one ``GenerateRequest`` adding
``batch_size`` random prompts of ``sequence_length`` token ids (``max_new_tokens = decode_length``,
``ignore_eos``: every request runs to its length), then the shard's step outputs, read as they come:

- **prefill**: from sending the requests to the step output that gives the last of them its first token.
  With chunked prefill (the paged backend) a large batch's prompts may run over several steps, so the
  first tokens come over several outputs, and the requests that have theirs already decode in the
  meantime: all of that is prefill time.
- **decode**: from there, the following step outputs until every request has ended at its length
  (``FINISH_LENGTH`` after ``decode_length`` tokens, the first one included: ``decode_length - 1`` steps
  after the last first token, as in TGI). ``decode_steps`` and ``decode_tokens`` are the outputs and the
  tokens of this phase, counted as they came: when the first tokens came over several steps, the requests
  that started earlier end earlier, and the last steps carry fewer than ``batch_size`` tokens.

The times are taken on this side (gRPC and protobuf included, as the router would see them);
``shard_prefill_s`` and ``shard_decode_s`` add up the shard's own ``total_ns`` of the same outputs. A step
that gives no token at all (a chunk of a long prompt run alone) sends no output, so its own time is
missing from ``shard_prefill_s`` (the wall ``prefill_s`` covers it). A request that fails, a failed step or
a request that ends otherwise than by its length stops the benchmark with an error.

Per batch size: prefill latency and throughput (requests/s = batch / latency), decode total latency,
per-step latency (decode time / decode steps) and decode throughput (tokens/s = decode tokens / decode
time), each over the runs as avg / min / max / p50 / p90 / p99.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from benchmark.metrics import percentile

if TYPE_CHECKING:  # grpc and the stubs are imported when a run starts, so `--help` stays fast
    from router.client import ShardClient

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


# ---------------------------------------------------------------------------------------------------------
# Configuration and results


@dataclass(frozen=True)
class SamplingParams:
    """The ``NextTokenChooserParameters`` every benchmark request carries (defaults: greedy)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    do_sample: bool = False
    seed: int = 0


@dataclass(frozen=True)
class ShardBenchConfig:
    uds_path: str = "/tmp/text-generation-server"
    num_shard: int = 1
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    sequence_length: int = 10
    decode_length: int = 8
    warmups: int = 1
    runs: int = 10
    params: SamplingParams = field(default_factory=SamplingParams)
    prompt_seed: int = 0
    output: str | None = None

    def __post_init__(self) -> None:
        if self.decode_length < 2:
            raise ValueError("--decode-length must be >= 2 (the prefill gives the first token)")
        if self.runs < 1:
            raise ValueError("--runs must be >= 1")

    @property
    def socket(self) -> str:
        """Rank 0's socket: it relays every call to the other ranks (shard/relay.py)."""
        return f"{self.uds_path}-0"

    @property
    def decode_steps(self) -> int:
        """Decode steps of a run whose prompts all run in one step."""
        return self.decode_length - 1


@dataclass(frozen=True)
class RunTiming:
    """One measured run of one batch size (seconds); ``shard_*`` are the shard's own step times
    (rank 0's ``total_ns``; 0 when the shard does not report them). ``decode_steps`` and
    ``decode_tokens`` are the step outputs and tokens after every request had its first token
    (``decode_tokens`` 0: ``batch_size x decode_steps``, every request in every step)."""

    batch_size: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    shard_prefill_s: float = 0.0
    shard_decode_s: float = 0.0
    decode_tokens: int = 0

    @property
    def tokens_decoded(self) -> int:
        return self.decode_tokens or self.batch_size * self.decode_steps


@dataclass(frozen=True)
class Stats:
    avg: float
    min: float
    max: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats:
        if not values:
            raise ValueError("no values")
        return cls(
            avg=sum(values) / len(values),
            min=min(values),
            max=max(values),
            p50=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
        )


@dataclass(frozen=True)
class BatchStats:
    """The figures of one batch size over its measured runs."""

    batch_size: int
    runs: int
    decode_steps: int
    prefill_latency_ms: Stats
    prefill_throughput_rps: Stats
    decode_latency_ms: Stats
    decode_token_latency_ms: Stats
    decode_throughput_tps: Stats


def summarize(timings: Sequence[RunTiming]) -> BatchStats:
    """Per-run figures, then their statistics over the runs (all runs of one batch size)."""
    if not timings:
        raise ValueError("no runs to summarize")
    batch = timings[0].batch_size
    if any(t.batch_size != batch for t in timings):
        raise ValueError("timings of several batch sizes")
    return BatchStats(
        batch_size=batch,
        runs=len(timings),
        decode_steps=timings[0].decode_steps,
        prefill_latency_ms=Stats.of([1000 * t.prefill_s for t in timings]),
        prefill_throughput_rps=Stats.of([batch / t.prefill_s for t in timings]),
        decode_latency_ms=Stats.of([1000 * t.decode_s for t in timings]),
        decode_token_latency_ms=Stats.of([1000 * t.decode_s / t.decode_steps for t in timings]),
        decode_throughput_tps=Stats.of([t.tokens_decoded / t.decode_s for t in timings]),
    )


@dataclass
class ShardBenchResult:
    config: ShardBenchConfig
    info: dict[str, Any]
    results: list[BatchStats]
    timings: list[RunTiming]
    floor: dict[str, Any] | None = None  # a `floor --output` file, to report fractions of its bounds

    def versus_floor(self) -> list[dict[str, Any]]:
        """Per batch size, the median decode step rate and tokens/s as fractions of the floor's bounds."""
        from benchmark.floor import versus_floor

        if self.floor is None:
            return []
        return [
            versus_floor(
                self.floor, r.batch_size, 1000 / r.decode_token_latency_ms.p50, r.decode_throughput_tps.p50
            )
            for r in self.results
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": "shard",
            "config": asdict(self.config),
            "info": self.info,
            "results": [asdict(r) for r in self.results],
            "versus_floor": self.versus_floor() or None,
            "runs": [asdict(t) for t in self.timings],
        }


# ---------------------------------------------------------------------------------------------------------
# The run


class ShardBenchmark:
    """Drives the sweep over one ``Generate`` stream (``open`` / ``close``); request ids never repeat within
    a benchmark, and a run ends only once every request it added has ended, so no step of one run is
    counted in another."""

    def __init__(self, client: ShardClient, config: ShardBenchConfig, vocab_size: int) -> None:
        if vocab_size < 1:
            raise ValueError(f"the shard reported vocab_size {vocab_size}; cannot draw prompt token ids")
        self.client = client
        self.config = config
        self.vocab_size = vocab_size
        self.rng = random.Random(config.prompt_seed)
        self.next_request_id = 1
        self.stream: Any = None

    def open(self) -> None:
        """Opens the shard's Generate stream (the shard takes one at a time: a router using it must stop)."""
        if self.stream is None:
            self.stream = self.client.generate()

    async def close(self) -> None:
        """Ends the stream: half-closes it and reads to its end (the shard then ends its requests too), or
        cancels it when that does not come within a few seconds."""
        stream, self.stream = self.stream, None
        if stream is None:
            return
        import grpc

        try:
            await asyncio.wait_for(self._drain(stream), timeout=5.0)
        except (TimeoutError, grpc.aio.AioRpcError):
            stream.cancel()

    @staticmethod
    async def _drain(stream: Any) -> None:
        import grpc

        await stream.done_writing()
        while await stream.read() is not grpc.aio.EOF:
            pass

    def _requests(self, size: int) -> list[Any]:
        from proto import pb

        p = self.config.params
        params = pb.NextTokenChooserParameters(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            typical_p=p.typical_p,
            repetition_penalty=p.repetition_penalty,
            do_sample=p.do_sample,
            seed=p.seed,
        )
        length = self.config.sequence_length
        requests = []
        for _ in range(size):
            # Distinct random prompts per row: the shard runs identical prompts only once.
            ids = [self.rng.randrange(self.vocab_size) for _ in range(length)]
            requests.append(
                pb.Request(
                    id=self.next_request_id,
                    input_ids=ids,
                    parameters=params,
                    max_new_tokens=self.config.decode_length,
                    ignore_eos=True,  # no end before the length: every request runs every step
                )
            )
            self.next_request_id += 1
        return requests

    async def run_once(self, size: int) -> RunTiming:
        """Adds ``size`` requests, then reads step outputs until each has its first token (the prefill),
        then until each has ended at its length (the decode)."""
        from proto import pb

        self.open()
        stream = self.stream
        requests = self._requests(size)
        tokens = {r.id: 0 for r in requests}  # tokens each request has had
        ended: set[int] = set()
        start = time.perf_counter()
        await stream.write(pb.GenerateRequest(add=requests))
        now = start
        started = shard_prefill_ns = 0
        while started < size:
            out = await self._next(stream)
            now = time.perf_counter()
            shard_prefill_ns += out.total_ns
            started += self._take(out, tokens, ended)
        prefill_end = now
        steps = decoded = shard_decode_ns = 0
        while len(ended) < size:
            out = await self._next(stream)
            now = time.perf_counter()
            shard_decode_ns += out.total_ns
            steps += 1
            decoded += len(out.generations.request_ids)
            self._take(out, tokens, ended)
        return RunTiming(
            batch_size=size,
            prefill_s=prefill_end - start,
            decode_s=now - prefill_end,
            decode_steps=steps,
            shard_prefill_s=shard_prefill_ns / 1e9,
            shard_decode_s=shard_decode_ns / 1e9,
            decode_tokens=decoded,
        )

    @staticmethod
    async def _next(stream: Any) -> Any:
        import grpc

        out = await stream.read()
        if out is grpc.aio.EOF:
            raise RuntimeError("the shard ended the Generate stream in the middle of a run")
        return out

    def _take(self, out: Any, tokens: dict[int, int], ended: set[int]) -> int:
        """Counts one step output's tokens and endings; returns how many requests got their first token.
        Anything but tokens of this run's running requests, and their ends at their length, is an error."""
        from proto import pb

        g = out.generations
        if out.failed or g.failures:
            failure = g.failures[0] if g.failures else None
            which = f"request {failure.request_id}: {failure.message}" if failure else "no request named"
            raise RuntimeError(f"the shard failed a step ({len(g.failures)} request(s); {which})")
        if len(g.finish_reasons) != len(g.request_ids):
            raise RuntimeError(
                f"a step output has {len(g.finish_reasons)} finish reasons for {len(g.request_ids)} rows"
            )
        length = self.config.decode_length
        first = 0
        # A shard that speculates gives a request several rows in one step, in order.
        for rid, reason in zip(g.request_ids, g.finish_reasons, strict=True):
            if rid not in tokens or rid in ended:
                raise RuntimeError(f"a step output has a token for request {rid}, which is not running")
            tokens[rid] += 1
            if tokens[rid] == 1:
                first += 1
            if reason == pb.FINISH_NONE:
                if tokens[rid] >= length:
                    raise RuntimeError(f"request {rid} did not end at its max_new_tokens ({length})")
                continue
            if reason != pb.FINISH_LENGTH or tokens[rid] != length:
                raise RuntimeError(
                    f"request {rid} ended ({pb.FinishReason.Name(reason)}) after {tokens[rid]} tokens, "
                    f"expected FINISH_LENGTH after {length} (ignore_eos)"
                )
            ended.add(rid)
        return first


ProgressFn = Callable[[str], None]


async def run_shard_benchmark(
    config: ShardBenchConfig, *, client: ShardClient | None = None, progress: ProgressFn | None = None
) -> ShardBenchResult:
    """Runs the sweep against ``client`` (or the shard at ``config.socket``)."""
    from router.client import ShardClient

    own = client is None
    if client is None:
        client = ShardClient(config.socket)
    say = progress or (lambda _text: None)
    try:
        await client.health(timeout=10.0)
        info = await client.info()
        bench = ShardBenchmark(client, config, info.vocab_size)
        info_dict = {
            "backend": info.backend,
            "dtype": info.dtype,
            "device_type": info.device_type,
            "world_size": info.world_size,
            "vocab_size": info.vocab_size,
            "requires_padding": info.requires_padding,
        }
        timings: list[RunTiming] = []
        results: list[BatchStats] = []
        try:
            for size in config.batch_sizes:
                for _ in range(config.warmups):
                    await bench.run_once(size)
                runs = [await bench.run_once(size) for _ in range(config.runs)]
                timings.extend(runs)
                stats = summarize(runs)
                results.append(stats)
                say(
                    f"batch {size}: prefill {stats.prefill_latency_ms.avg:.2f} ms, "
                    f"decode {stats.decode_token_latency_ms.avg:.2f} ms/step, "
                    f"{stats.decode_throughput_tps.avg:.1f} tokens/s"
                )
        finally:
            await bench.close()
        return ShardBenchResult(config=config, info=info_dict, results=results, timings=timings)
    finally:
        if own:
            await client.close()


# ---------------------------------------------------------------------------------------------------------
# Reporting

STAT_COLUMNS = ("avg", "min", "max", "p50", "p90", "p99")


def _table(title: str, unit: str, rows: list[tuple[str, int, Stats]]) -> list[str]:
    header = ["Step", "Batch", *(f"{c} ({unit})" for c in STAT_COLUMNS)]
    body = [[step, str(batch), *(f"{getattr(s, c):.2f}" for c in STAT_COLUMNS)] for step, batch, s in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    return [title, line(header), "  ".join("-" * w for w in widths), *(line(r) for r in body)]


def format_summary(result: ShardBenchResult) -> str:
    c, info = result.config, result.info
    head = (
        f"shard benchmark: {info['backend']} on {info['device_type']} ({info['dtype']}, "
        f"{info['world_size']} shard(s)); prompt {c.sequence_length} tokens, decode length {c.decode_length} "
        f"({c.decode_steps} steps), {c.warmups} warmup + {c.runs} runs per batch size"
    )
    latency: list[tuple[str, int, Stats]] = []
    throughput: list[tuple[str, int, Stats]] = []
    for r in result.results:
        latency += [
            ("Prefill", r.batch_size, r.prefill_latency_ms),
            ("Decode (token)", r.batch_size, r.decode_token_latency_ms),
            ("Decode (total)", r.batch_size, r.decode_latency_ms),
        ]
        throughput += [
            ("Prefill (req/s)", r.batch_size, r.prefill_throughput_rps),
            ("Decode (tokens/s)", r.batch_size, r.decode_throughput_tps),
        ]
    lines = [head, "", *_table("Latency", "ms", latency), "", *_table("Throughput", "/s", throughput)]
    if result.floor is not None:
        from benchmark.floor import format_versus

        lines += ["", format_versus(result.floor, result.versus_floor())]
    return "\n".join(lines)


def write_json(result: ShardBenchResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------
# Command line


def register(commands: Any) -> None:
    """Adds the ``shard`` subcommand to ``text-generation-benchmark``'s subparsers."""
    from benchmark.args import int_list, non_negative_int, positive_int

    p = commands.add_parser(
        "shard",
        help="prefill/decode latency straight on running shards over gRPC (no router)",
        description=(
            "Talks gRPC straight to running shards (no router) over their Generate stream: for each batch "
            "size, adds batch-size requests with random prompts (max_new_tokens = decode-length, ignore_eos) "
            "and reads the shard's steps until every request has its first token (the prefill), then until "
            "every one has ended at its length (the decode); warmups then measured runs. Reports prefill "
            "latency and requests/s, decode latency per step and in total, and decode tokens/s "
            "(avg/min/max/p50/p90/p99 over the runs)."
        ),
    )
    p.add_argument(
        "--uds-path",
        default=ShardBenchConfig.uds_path,
        help="shard socket prefix; connects to PREFIX-0 .. PREFIX-(N-1) (default: %(default)s)",
    )
    p.add_argument(
        "--num-shard", type=positive_int, default=1, help="shards in the server; rank 0 relays (default: 1)"
    )
    p.add_argument(
        "--batch-sizes",
        metavar="B1,B2,...",
        type=int_list,
        default=ShardBenchConfig.batch_sizes,
        help="comma-separated batch sizes (default: 1,2,4,8,16,32)",
    )
    p.add_argument("--sequence-length", type=positive_int, default=10, help="prompt tokens (default: 10)")
    p.add_argument(
        "--decode-length",
        type=positive_int,
        default=8,
        help="tokens per request, the prefill's included: decode-length - 1 decode steps (default: 8)",
    )
    p.add_argument("--warmups", type=non_negative_int, default=1, help="unmeasured runs (default: 1)")
    p.add_argument("--runs", type=positive_int, default=10, help="measured runs per batch size (default: 10)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=non_negative_int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--typical-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--output", metavar="PATH", default=None, help="write config, results and runs as JSON")
    p.add_argument(
        "--floor",
        metavar="FLOOR.json",
        default=None,
        help="a `floor --model-dir ... --output` file: report decode steps/s and tokens/s as fractions of it",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(handler=run_command)


def config_from_args(args: argparse.Namespace) -> ShardBenchConfig:
    return ShardBenchConfig(
        uds_path=args.uds_path,
        num_shard=args.num_shard,
        batch_sizes=args.batch_sizes,
        sequence_length=args.sequence_length,
        decode_length=args.decode_length,
        warmups=args.warmups,
        runs=args.runs,
        params=SamplingParams(
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            typical_p=args.typical_p,
            repetition_penalty=args.repetition_penalty,
            do_sample=args.do_sample,
            seed=args.seed,
        ),
        output=args.output,
    )


def run_command(args: argparse.Namespace, *, stdout: TextIO | None = None) -> int:
    out = stdout or sys.stdout
    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"text-generation-benchmark shard: error: {e}", file=sys.stderr)
        return EXIT_USAGE

    def progress(text: str) -> None:
        if not args.no_progress:
            print(text, file=sys.stderr, flush=True)

    import grpc

    from benchmark.floor import load_floor

    try:
        floor = load_floor(args.floor) if args.floor else None
    except (OSError, ValueError) as e:
        print(f"text-generation-benchmark shard: error: --floor: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = asyncio.run(run_shard_benchmark(config, progress=progress))
    except grpc.aio.AioRpcError as e:
        print(
            f"error: shard call failed: {e.code().name}: {e.details()} (are the shards at "
            f"{config.uds_path}-* up?)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except (RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    result.floor = floor
    print(format_summary(result), file=out)
    if config.output:
        path = write_json(result, config.output)
        print(f"results written to {path}", file=sys.stderr)
    return EXIT_OK
