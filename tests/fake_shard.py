"""A fake shard: a real gRPC server that answers every step at once with fixed tokens.

It lets the router (and the benchmark tool through it) be measured alone, without a model:

    python -m tests.fake_shard --uds-path /tmp/fake-shard --vocab-size 49152 --stats stats.json

listens on ``/tmp/fake-shard-0`` (the router's ``--shard-uds-path /tmp/fake-shard``). Every request
generates ``token`` ids cycling through a fixed list of ordinary word tokens and never ends by itself (no
EOS), so a request ends by its length or its stop strings, as the router decides. On SIGTERM/SIGINT it
writes, with ``--stats``, per batch size, the time from the end of one Decode answer to the next Decode call:
the router's own time per decode step (the shard's own handling of a call, timed apart, is left out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from proto import pb, pb_grpc

DEFAULT_TOKENS = (260, 314, 1015, 2020, 2743, 355, 1207, 1893)


class FakeShard(pb_grpc.TextGenerationServiceServicer):
    def __init__(self, vocab_size: int, tokens: tuple[int, ...] = DEFAULT_TOKENS) -> None:
        self.vocab_size = vocab_size
        self.tokens = tokens
        # Each Decode takes at least this long (a stand-in for the model's step; 0: answer at once).
        self.step_s = 0.0
        self.batches: dict[int, list[int]] = {}
        self.steps: dict[int, int] = defaultdict(int)
        self.decode_intervals: dict[int, list[float]] = defaultdict(list)
        self.decode_handling: dict[int, list[float]] = defaultdict(list)
        # When the last Decode answer was ready (None after a prefill: that gap is not the router's own).
        self._answered_at: float | None = None
        self.prefills = 0

    def _generations(self, request_ids: list[int]) -> pb.Generations:
        ids = []
        for rid in request_ids:
            ids.append(self.tokens[self.steps[rid] % len(self.tokens)])
            self.steps[rid] += 1
        return pb.Generations(request_ids=request_ids, token_ids=ids, logprobs=[-0.5] * len(ids))

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return pb.InfoResponse(
            requires_padding=False, dtype="float32", device_type="cpu", world_size=1, backend="fake",
            vocab_size=self.vocab_size,
        )  # fmt: skip

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse()

    async def Warmup(self, request: pb.WarmupRequest, context: grpc.aio.ServicerContext) -> pb.WarmupResponse:
        return pb.WarmupResponse()

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        self.prefills += 1
        ids = [r.id for r in request.batch.requests]
        self.batches[request.batch.id] = ids
        generations = self._generations(ids)
        self._answered_at = None  # a prefill between decodes is not router overhead
        return pb.PrefillResponse(
            generations=generations, batch=pb.CachedBatch(id=request.batch.id, request_ids=ids)
        )

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        now = time.perf_counter()
        ids: list[int] = []
        for batch in request.batches:
            if batch.id not in self.batches:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"no cached batch {batch.id}")
            kept = set(batch.request_ids)
            for rid in self.batches.pop(batch.id):
                if rid not in kept:
                    self.steps.pop(rid, None)
            ids.extend(batch.request_ids)
        if self._answered_at is not None:
            self.decode_intervals[len(ids)].append(now - self._answered_at)
        if self.step_s > 0:
            await asyncio.sleep(self.step_s)
        response = pb.DecodeResponse(generations=self._generations(ids))
        if ids:
            batch_id = request.batches[0].id
            self.batches[batch_id] = ids
            response.batch.CopyFrom(pb.CachedBatch(id=batch_id, request_ids=ids))
        self._answered_at = time.perf_counter()
        self.decode_handling[len(ids)].append(self._answered_at - now)
        return response

    async def DecodeStream(
        self, requests: AsyncIterator[pb.DecodeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DecodeResponse]:
        async for request in requests:
            yield await self.Decode(request, context)

    async def ClearCache(
        self, request: pb.ClearCacheRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClearCacheResponse:
        if request.HasField("id"):
            for rid in self.batches.pop(request.id, []):
                self.steps.pop(rid, None)
        else:
            self.batches.clear()
            self.steps.clear()
        return pb.ClearCacheResponse()

    def stats(self) -> dict[str, object]:
        """Per batch size, in milliseconds (count, mean, median, p90, p99): the intervals from one Decode
        answer to the next call (``decode_interval_ms``, the router's time) and this shard's own handling
        of a Decode call (``decode_handling_ms``)."""
        return {
            "prefills": self.prefills,
            "decode_interval_ms": _summaries(self.decode_intervals),
            "decode_handling_ms": _summaries(self.decode_handling),
        }


def _summaries(by_size: dict[int, list[float]]) -> dict[str, dict[str, float]]:
    return {
        str(size): {
            "count": len(values),
            "mean": 1000 * statistics.fmean(values),
            "median": 1000 * statistics.median(values),
            "p90": 1000 * _percentile(values, 90),
            "p99": 1000 * _percentile(values, 99),
        }
        for size, values in sorted(by_size.items())
        if values
    }


def _percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def serve(
    uds_path: str, vocab_size: int, stats_path: Path | None, tokens: tuple[int, ...] = DEFAULT_TOKENS
) -> None:
    socket = f"{uds_path}-0"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket)
    shard = FakeShard(vocab_size, tokens)
    server = grpc.aio.server()
    pb_grpc.add_TextGenerationServiceServicer_to_server(shard, server)
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket)
    if stats_path is not None:
        stats_path.write_text(json.dumps(shard.stats(), indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uds-path", default="/tmp/fake-shard")
    parser.add_argument("--vocab-size", type=int, default=49152)
    parser.add_argument("--stats", type=Path, default=None, help="write decode-interval stats here on exit")
    parser.add_argument(
        "--tokens",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        default=DEFAULT_TOKENS,
        help="comma-separated token ids every request cycles through (default: ordinary words of "
        "SmolLM2's vocabulary)",
    )
    args = parser.parse_args()
    asyncio.run(serve(args.uds_path, args.vocab_size, args.stats, args.tokens))


if __name__ == "__main__":
    main()
