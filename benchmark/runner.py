"""The load runner: one closed-loop concurrency level, one open-loop (Poisson) rate level, and the warmup
before a sweep."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Coroutine, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeVar

from benchmark.clients import RequestError, StreamingClient
from benchmark.records import RequestRecord
from benchmark.workload import RequestSpec

# Called after each finished request with (record, finished so far, level total).
OnRecord = Callable[[RequestRecord, int, int], None]
T = TypeVar("T")


@dataclass
class LevelResult:
    """The records of one level and its wall time (first send to last answer, or to the level timeout).

    ``concurrency`` is None for an open-loop level, ``request_rate`` None for a closed-loop one."""

    concurrency: int | None
    num_requests: int
    wall_s: float
    timed_out: bool
    records: list[RequestRecord]
    request_rate: float | None = None


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on uvloop's event loop where it is installed: the load generator shares the machine
    with the server it measures, and uvloop roughly halves its cost per streamed token."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


class WarmupError(RuntimeError):
    """A warmup request failed (or the client could not get ready): the endpoint cannot be measured."""


def as_specs(requests: Sequence[RequestSpec | str]) -> list[RequestSpec]:
    """Request specs from specs or bare prompts (the client's default length)."""
    return [r if isinstance(r, RequestSpec) else RequestSpec(prompt=r) for r in requests]


async def _consume(client: StreamingClient, spec: RequestSpec, record: RequestRecord, sent: float) -> None:
    # ``model`` only when the request names one: a client need not take it otherwise.
    stream = (
        client.stream(spec.prompt, spec.max_new_tokens)
        if spec.model is None
        else client.stream(spec.prompt, spec.max_new_tokens, model=spec.model)
    )
    async with aclosing(stream) as events:
        async for event in events:
            now = time.perf_counter() - sent
            record.add_tokens(event.num_tokens, now)
            if event.final:
                record.e2e_s = now
                record.finish_reason = event.finish_reason
                record.prompt_tokens = event.prompt_tokens
                if event.count_from_server and event.server_output_tokens is not None:
                    record.use_server_count(event.server_output_tokens)
                else:
                    record.server_output_tokens = event.server_output_tokens
                record.ok = True


async def measure_request(
    client: StreamingClient, request: RequestSpec | str, record: RequestRecord, timeout_s: float
) -> RequestRecord:
    """Sends one request and fills ``record`` (mutated in place, so a caller sees partial progress).

    Never raises for a failed request: the failure is recorded as ``error_kind`` (RequestError kinds, plus
    ``timeout`` past ``timeout_s`` and ``internal`` for an unexpected exception). Cancellation propagates.
    """
    (spec,) = as_specs([request])
    record.max_new_tokens = spec.max_new_tokens
    record.input_tokens = spec.input_tokens
    record.model = spec.model
    sent = time.perf_counter()
    try:
        await asyncio.wait_for(_consume(client, spec, record, sent), timeout_s)
    except asyncio.TimeoutError:
        record.fail("timeout", f"no complete answer within {timeout_s:g} s", at_s=time.perf_counter() - sent)
    except RequestError as e:
        record.fail(e.kind, e.message, status=e.status, at_s=time.perf_counter() - sent)
    except Exception as e:  # a benchmark keeps its other measurements when one request breaks the client
        record.fail("internal", f"{type(e).__name__}: {e}", at_s=time.perf_counter() - sent)
    return record


class _Level:
    """Bookkeeping shared by both kinds of level: finished and in-flight records, the level timeout."""

    def __init__(self, num_requests: int, level_timeout_s: float, on_record: OnRecord | None) -> None:
        self.num_requests = num_requests
        self.level_timeout_s = level_timeout_s
        self.on_record = on_record
        self.records: list[RequestRecord] = []
        self.in_flight: dict[int, RequestRecord] = {}
        self.start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.start

    async def run(self, client: StreamingClient, spec: RequestSpec, record: RequestRecord, timeout_s: float):
        self.in_flight[record.index] = record
        await measure_request(client, spec, record, timeout_s)
        del self.in_flight[record.index]
        self.finished(record)

    def finished(self, record: RequestRecord) -> None:
        self.records.append(record)
        if self.on_record is not None:
            self.on_record(record, len(self.records), self.num_requests)

    async def wait(
        self, tasks: list[asyncio.Task], spawned: Sequence[asyncio.Task] = ()
    ) -> tuple[float, bool]:
        """Waits for ``tasks`` up to the level timeout; past it cancels them and the tasks they ``spawned``,
        and records the requests in flight as ``level_timeout`` failures. Returns (wall time, timed out)."""
        done, pending = await asyncio.wait(tasks, timeout=self.level_timeout_s)
        wall_s = self.now()
        if pending:
            left = [*pending, *(task for task in spawned if not task.done())]
            for task in left:
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)
        for record in sorted(self.in_flight.values(), key=lambda r: r.index):
            record.fail(
                "level_timeout",
                f"cancelled at the level timeout ({self.level_timeout_s:g} s)",
                at_s=wall_s - record.start_s,
            )
            self.finished(record)
        for task in done:
            task.result()  # a bug in the runner itself must not pass silently
        self.records.sort(key=lambda r: r.index)
        return wall_s, bool(pending)


async def run_level(
    client: StreamingClient,
    requests: Sequence[RequestSpec | str],
    *,
    concurrency: int,
    num_requests: int,
    request_timeout_s: float,
    level_timeout_s: float,
    on_record: OnRecord | None = None,
) -> LevelResult:
    """Runs one closed-loop level: ``concurrency`` workers, each sending its next request as soon as its
    previous one ends, until ``num_requests`` requests are done or ``level_timeout_s`` has passed.

    Request ``i`` is ``requests[i % len(requests)]`` (a RequestSpec, or a bare prompt). At the level timeout
    the requests still in flight are cancelled and recorded as ``level_timeout`` failures, and no further
    request is sent.
    """
    if concurrency < 1 or num_requests < 1 or not requests:
        raise ValueError("run_level needs concurrency >= 1, num_requests >= 1 and at least one request")
    specs = as_specs(requests)
    level = _Level(num_requests, level_timeout_s, on_record)
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < num_requests:
            index = next_index
            next_index += 1
            record = RequestRecord(index=index, concurrency=concurrency, start_s=level.now())
            await level.run(client, specs[index % len(specs)], record, request_timeout_s)

    tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, num_requests))]
    wall_s, timed_out = await level.wait(tasks)
    return LevelResult(
        concurrency=concurrency,
        num_requests=num_requests,
        wall_s=wall_s,
        timed_out=timed_out,
        records=level.records,
    )


async def run_rate_level(
    client: StreamingClient,
    requests: Sequence[RequestSpec | str],
    *,
    request_rate: float,
    arrivals_s: Sequence[float],
    request_timeout_s: float,
    level_timeout_s: float,
    on_record: OnRecord | None = None,
) -> LevelResult:
    """Runs one open-loop level: request ``i`` is sent at ``arrivals_s[i]`` seconds from the level's start
    (a Poisson schedule of ``request_rate``, see workload.poisson_arrivals) whether or not earlier ones have
    finished, so the server sees the load a population of independent users makes.

    Request ``i`` is ``requests[i % len(requests)]``; ``scheduled_s`` records the planned send time next to
    the actual ``start_s``. At the level timeout the requests in flight are cancelled and recorded as
    ``level_timeout`` failures, and the ones not yet sent are never sent.
    """
    num_requests = len(arrivals_s)
    if num_requests < 1 or not requests or any(b < a for a, b in itertools.pairwise(arrivals_s)):
        raise ValueError("run_rate_level needs a non-empty, sorted arrival schedule and at least one request")
    specs = as_specs(requests)
    level = _Level(num_requests, level_timeout_s, on_record)
    sent: list[asyncio.Task] = []

    async def dispatcher() -> None:
        for index, at_s in enumerate(arrivals_s):
            # A timer may fire early (uvloop's tick is a millisecond): sleep again until the request is due.
            while (delay := at_s - level.now()) > 0:
                await asyncio.sleep(delay)
            record = RequestRecord(
                index=index,
                concurrency=None,
                request_rate=request_rate,
                scheduled_s=at_s,
                start_s=level.now(),
            )
            sent.append(
                asyncio.create_task(level.run(client, specs[index % len(specs)], record, request_timeout_s))
            )
        results = await asyncio.gather(*sent, return_exceptions=True)  # every request ends first
        for result in results:
            if isinstance(result, BaseException):
                raise result

    wall_s, timed_out = await level.wait([asyncio.create_task(dispatcher())], sent)
    return LevelResult(
        concurrency=None,
        num_requests=num_requests,
        wall_s=wall_s,
        timed_out=timed_out,
        records=level.records,
        request_rate=request_rate,
    )


async def warmup(
    client: StreamingClient, requests: str | Sequence[RequestSpec | str], count: int, timeout_s: float
) -> list[RequestRecord]:
    """Sends ``count`` requests one after another (not measured), request ``i`` being
    ``requests[i % len(requests)]`` (or the one prompt given); raises WarmupError at the first failure."""
    specs = as_specs([requests] if isinstance(requests, str) else requests)
    records = []
    for index in range(count):
        record = await measure_request(
            client, specs[index % len(specs)], RequestRecord(index=index, concurrency=1), timeout_s
        )
        if not record.ok:
            raise WarmupError(
                f"warmup request {index + 1}/{count} failed: {record.error_kind}: {record.error_message}"
            )
        records.append(record)
    return records
