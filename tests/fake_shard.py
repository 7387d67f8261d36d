"""A fake shard: a real gRPC server of the shard service that steps without a model.

It lets the router (and the benchmark tool through it) be measured and tested alone:

    python -m tests.fake_shard --uds-path /tmp/fake-shard --vocab-size 49152 --stats stats.json

listens on ``/tmp/fake-shard-0`` (the router's ``--shard-uds-path /tmp/fake-shard``). It keeps the requests
the router adds on its ``Generate`` stream (and drops the ones it aborts) and, while any is live, runs
steps: each gives every live request its next token, cycling through a fixed list of ordinary word tokens
(log-probability -0.5), and ends it as the real shard's core does (``shard/core.py``): by its length
(``max_new_tokens``), or, once ``min_new_tokens`` are out, by an end-of-sequence id (none unless given) or
one of its ``stop_token_ids``. Steps follow each other every ``step_s`` seconds (``--step-ms``; a model's
step), or with 0 as fast as this shard builds them. Either way the next waits while gRPC's flow control
holds a write back, but nothing else tells the shard how far the router is behind (as with the real
shard): the stream buffers megabytes of steps before flow control holds anything.

A request's ``fault`` field is honoured as the real shard's ``--fault-injection`` hooks (shard/faults.py):

- ``nan``: the request fails alone (``generations.failures``) at its second step; the others go on;
- ``step``: the step that runs it fails whole (``failed``; every request in it is in the failures);
- ``fatal``: the stream ends with an INTERNAL status (the real shard exits; this one keeps serving, so a
  new stream works) and every request of the stream is dropped;
- ``sleep``: every step that runs it takes ``SLEEP_S`` longer.

With ``--stats``, on SIGTERM/SIGINT it writes what the router benchmark reads: the steps and the tokens
generated, the steps per batch size, the requests added and aborted, and per batch size the time from the
start of one step to the start of the next of the same size (``step_period_ms``: the pace kept, ``step_s``
or more when the event loop or the stream held it back) and this shard's own time to build a step
(``step_build_ms``).
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
from dataclasses import dataclass
from pathlib import Path

import grpc

from proto import pb, pb_grpc

DEFAULT_TOKENS = (260, 314, 1015, 2020, 2743, 355, 1207, 1893)
# Extra seconds of every step that runs a request with fault "sleep" (shard/faults.py's SLEEP_S).
SLEEP_S = 0.25
# Prompt log-probability the fake shard gives every prompt token after the first (the first has none).
PROMPT_LOGPROB = -1.0
TOKEN_LOGPROB = -0.5


@dataclass(slots=True)
class Live:
    """One live request: what it asked for, and how many tokens it has had."""

    request: pb.Request
    stop_ids: frozenset[int]
    generated: int = 0


class FakeShard(pb_grpc.TextGenerationServiceServicer):
    """The shard service without a model. One Generate stream at a time, as the real shard."""

    def __init__(
        self, vocab_size: int, tokens: tuple[int, ...] = DEFAULT_TOKENS, eos_token_ids: tuple[int, ...] = ()
    ) -> None:
        self.vocab_size = vocab_size
        self.tokens = tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        # Each step takes at least this long (a stand-in for the model's step; 0: as fast as it is taken).
        self.step_s = 0.0
        # Tokens each request gets per step (more than 1: as a shard that speculates), up to its end.
        self.tokens_per_step = 1
        # The open stream's live requests, by id, in the order they came.
        self.live: dict[int, Live] = {}
        # What the router sent: every id added and every id aborted (live or not), over all streams.
        self.added: list[int] = []
        self.aborted: list[int] = []
        self.streams = 0
        self.warmups = 0
        self.steps = 0
        self.tokens_generated = 0
        self.steps_by_batch: dict[int, int] = defaultdict(int)
        # Seconds, per batch size: start of a step to the start of the next of the same size; building one.
        self.step_periods: dict[int, list[float]] = defaultdict(list)
        self.step_builds: dict[int, list[float]] = defaultdict(list)
        self._open = False

    # -- unary calls ------------------------------------------------------------------------------
    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        return pb.InfoResponse(
            requires_padding=False, dtype="float32", device_type="cpu", world_size=1, backend="fake",
            vocab_size=self.vocab_size, eos_token_ids=sorted(self.eos_token_ids),
        )  # fmt: skip

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse()

    async def Warmup(self, request: pb.WarmupRequest, context: grpc.aio.ServicerContext) -> pb.WarmupResponse:
        self.warmups += 1
        return pb.WarmupResponse(max_supported_total_tokens=0)

    # -- the stream -------------------------------------------------------------------------------
    def add(self, requests: list[pb.Request]) -> list[pb.RequestFailure]:
        """Makes requests live; a repeated live id is refused alone (as the real shard's core does)."""
        refused = []
        for r in requests:
            self.added.append(r.id)
            if r.id in self.live:
                refused.append(
                    pb.RequestFailure(request_id=r.id, message=f"request id {r.id} is already running")
                )
                continue
            self.live[r.id] = Live(r, frozenset(r.stop_token_ids))
        return refused

    def abort(self, request_ids: list[int]) -> None:
        self.aborted.extend(request_ids)
        for rid in request_ids:
            self.live.pop(rid, None)

    async def Generate(
        self, requests: AsyncIterator[pb.GenerateRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepOutput]:
        if self._open:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "a Generate stream is open already")
        self._open = True
        self.streams += 1
        wake = asyncio.Event()
        refused: list[pb.RequestFailure] = []
        ended = False

        async def read() -> None:
            nonlocal ended
            try:
                async for message in requests:
                    refused.extend(self.add(list(message.add)))
                    self.abort(list(message.abort))
                    wake.set()
            finally:
                ended = True
                wake.set()

        reader = asyncio.create_task(read())
        last_start: float | None = None
        last_size = 0
        # When the last step was due to be written: steps keep to a schedule, so that the event loop's
        # coarse timers (a sleep is rounded up to the millisecond) do not slow the pace below step_s.
        due: float | None = None
        try:
            while not ended:  # as the real shard, a stream the router closes ends its requests
                if not self.live and not refused:
                    wake.clear()
                    await wake.wait()
                    last_start = due = None  # an idle gap is nobody's step time
                    continue
                started = time.perf_counter()
                faults = {live.request.fault for live in self.live.values()}
                if "fatal" in faults:
                    self.live.clear()
                    await context.abort(
                        grpc.StatusCode.INTERNAL, "injected fault: unrecoverable device error"
                    )
                out = self._step(refused)
                refused = []
                built = time.perf_counter()
                out.total_ns = int((built - started) * 1e9)
                size = len(out.generations.request_ids)
                if size:
                    if last_start is not None and size == last_size:
                        self.step_periods[size].append(started - last_start)
                    self.step_builds[size].append(built - started)
                last_start, last_size = started, size
                length = self.step_s + (SLEEP_S if "sleep" in faults else 0.0)
                # Late by more than a few steps (the stream held a write back): the schedule starts again.
                due = started + length if due is None else max(due + length, started - max(2 * length, 0.005))
                # Also lets the reader apply what came meanwhile, should the write below not wait.
                await asyncio.sleep(max(due - time.perf_counter(), 0.0))
                yield out
        finally:
            reader.cancel()
            self.live.clear()  # the stream's requests end with it
            self._open = False

    def _step(self, refused: list[pb.RequestFailure]) -> pb.StepOutput:
        """One step over every live request; ``refused``: the failures of the adds since the last."""
        rows = list(self.live.values())
        self.steps += 1
        self.steps_by_batch[len(rows)] += 1
        if any(live.request.fault == "step" for live in rows):
            failures = [
                pb.RequestFailure(request_id=live.request.id, message="InjectedStepError: injected fault: the step failed")
                for live in rows
            ]  # fmt: skip
            self.live.clear()
            generations = pb.Generations(failures=refused + failures)
            return pb.StepOutput(step=self.steps, generations=generations, failed=True)
        tokens, ntokens = self.tokens, len(self.tokens)
        ids: list[int] = []
        token_ids: list[int] = []
        reasons: list[int] = []
        failures = list(refused)
        prefill: list[pb.PrefillTokens] = []
        first_only = True
        top_n = max((live.request.top_n_tokens for live in rows), default=0)
        top_ids: list[int] = []
        for live in rows:
            r = live.request
            if r.fault == "nan" and live.generated == 1:
                failures.append(pb.RequestFailure(request_id=r.id, message="non-finite logits"))
                del self.live[r.id]
                continue
            for _ in range(self.tokens_per_step):
                token = tokens[live.generated % ntokens]
                if live.generated == 0:
                    if r.prefill_logprobs:
                        prompt = list(r.input_ids)
                        logprobs = [float("nan")] + [PROMPT_LOGPROB] * (len(prompt) - 1) if prompt else []
                        prefill.append(pb.PrefillTokens(request_id=r.id, ids=prompt, logprobs=logprobs))
                else:
                    first_only = False
                if top_n:
                    top_ids.extend(tokens[(live.generated + k) % ntokens] for k in range(top_n))
                live.generated += 1
                reason = self._finish(live, token)
                ids.append(r.id)
                token_ids.append(token)
                reasons.append(reason)
                if reason:
                    del self.live[r.id]
                    break
        self.tokens_generated += len(ids)
        generations = pb.Generations(
            request_ids=ids,
            token_ids=token_ids,
            logprobs=[TOKEN_LOGPROB] * len(ids),
            finish_reasons=reasons,
            prefill=prefill,
            failures=failures,
        )
        if top_n:
            generations.top_n = top_n
            generations.top_ids.extend(top_ids)
            generations.top_logprobs.extend([TOKEN_LOGPROB - k for k in range(top_n)] * len(ids))
        return pb.StepOutput(
            step=self.steps, generations=generations, running=len(self.live), prefill=bool(ids) and first_only
        )

    def _finish(self, live: Live, token: int) -> int:
        """The finish reason ``token`` brings (shard/core.py's ``Ending.push``)."""
        r = live.request
        if live.generated >= r.max_new_tokens:
            return pb.FINISH_LENGTH
        if live.generated < r.min_new_tokens:
            return pb.FINISH_NONE
        if token in self.eos_token_ids and not r.ignore_eos:
            return pb.FINISH_EOS
        if token in live.stop_ids:
            return pb.FINISH_STOP
        return pb.FINISH_NONE

    # -- statistics -------------------------------------------------------------------------------
    def stats(self) -> dict[str, object]:
        """The steps run, per batch size, and in milliseconds per batch size (count, mean, median, p90, p99):
        the period from one step's start to the next's at the same size (``step_period_ms``) and this
        shard's own time to build a step (``step_build_ms``)."""
        return {
            "streams": self.streams,
            "requests": len(self.added),
            "aborts": len(self.aborted),
            "steps": self.steps,
            "tokens": self.tokens_generated,
            "steps_by_batch": {str(size): n for size, n in sorted(self.steps_by_batch.items())},
            "step_period_ms": _summaries(self.step_periods),
            "step_build_ms": _summaries(self.step_builds),
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
    uds_path: str,
    vocab_size: int,
    stats_path: Path | None,
    tokens: tuple[int, ...] = DEFAULT_TOKENS,
    step_s: float = 0.0,
) -> None:
    socket = f"{uds_path}-0"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket)
    shard = FakeShard(vocab_size, tokens)
    shard.step_s = step_s
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
    parser.add_argument("--stats", type=Path, default=None, help="write step statistics here on exit")
    parser.add_argument(
        "--tokens",
        type=lambda text: tuple(int(part) for part in text.split(",")),
        default=DEFAULT_TOKENS,
        help="comma-separated token ids every request cycles through (default: ordinary words of "
        "SmolLM2's vocabulary)",
    )
    parser.add_argument(
        "--step-ms",
        type=float,
        default=0.0,
        help="each step takes at least this long (a model's step; default 0: as fast as the stream takes them)",
    )
    args = parser.parse_args()
    asyncio.run(serve(args.uds_path, args.vocab_size, args.stats, args.tokens, args.step_ms / 1000))


if __name__ == "__main__":
    main()
