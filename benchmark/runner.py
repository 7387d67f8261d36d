"""The load runner: one closed-loop concurrency level, and the warmup before a sweep."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from benchmark.clients import RequestError, StreamingClient
from benchmark.records import RequestRecord

# Called after each finished request with (record, finished so far, level total).
OnRecord = Callable[[RequestRecord, int, int], None]


@dataclass
class LevelResult:
    """The records of one level and its wall time (first send to last answer, or to the level timeout)."""

    concurrency: int
    num_requests: int
    wall_s: float
    timed_out: bool
    records: list[RequestRecord]


class WarmupError(RuntimeError):
    """A warmup request failed: the endpoint is not ready to be measured."""


async def _consume(client: StreamingClient, prompt: str, record: RequestRecord, sent: float) -> None:
    async with aclosing(client.stream(prompt)) as events:
        async for event in events:
            now = time.perf_counter() - sent
            record.add_tokens(event.num_tokens, now)
            if event.final:
                record.e2e_s = now
                record.finish_reason = event.finish_reason
                record.server_output_tokens = event.server_output_tokens
                record.ok = True


async def measure_request(
    client: StreamingClient, prompt: str, record: RequestRecord, timeout_s: float
) -> RequestRecord:
    """Sends one request and fills ``record`` (mutated in place, so a caller sees partial progress).

    Never raises for a failed request: the failure is recorded as ``error_kind`` (RequestError kinds, plus
    ``timeout`` past ``timeout_s`` and ``internal`` for an unexpected exception). Cancellation propagates.
    """
    sent = time.perf_counter()
    try:
        await asyncio.wait_for(_consume(client, prompt, record, sent), timeout_s)
    except asyncio.TimeoutError:
        record.fail("timeout", f"no complete answer within {timeout_s:g} s", at_s=time.perf_counter() - sent)
    except RequestError as e:
        record.fail(e.kind, e.message, status=e.status, at_s=time.perf_counter() - sent)
    except Exception as e:  # a benchmark keeps its other measurements when one request breaks the client
        record.fail("internal", f"{type(e).__name__}: {e}", at_s=time.perf_counter() - sent)
    return record


async def run_level(
    client: StreamingClient,
    prompts: Sequence[str],
    *,
    concurrency: int,
    num_requests: int,
    request_timeout_s: float,
    level_timeout_s: float,
    on_record: OnRecord | None = None,
) -> LevelResult:
    """Runs one closed-loop level: ``concurrency`` workers, each sending its next request as soon as its
    previous one ends, until ``num_requests`` requests are done or ``level_timeout_s`` has passed.

    Request ``i`` uses ``prompts[i % len(prompts)]``. At the level timeout the requests still in flight are
    cancelled and recorded as ``level_timeout`` failures, and no further request is sent.
    """
    if concurrency < 1 or num_requests < 1 or not prompts:
        raise ValueError("run_level needs concurrency >= 1, num_requests >= 1 and at least one prompt")
    records: list[RequestRecord] = []
    in_flight: dict[int, RequestRecord] = {}
    next_index = 0
    start = time.perf_counter()

    async def worker() -> None:
        nonlocal next_index
        while next_index < num_requests:
            index = next_index
            next_index += 1
            record = RequestRecord(index=index, concurrency=concurrency, start_s=time.perf_counter() - start)
            in_flight[index] = record
            await measure_request(client, prompts[index % len(prompts)], record, request_timeout_s)
            del in_flight[index]
            records.append(record)
            if on_record is not None:
                on_record(record, len(records), num_requests)

    tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, num_requests))]
    done, pending = await asyncio.wait(tasks, timeout=level_timeout_s)
    wall_s = time.perf_counter() - start
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for record in sorted(in_flight.values(), key=lambda r: r.index):
        record.fail(
            "level_timeout",
            f"cancelled at the level timeout ({level_timeout_s:g} s)",
            at_s=wall_s - record.start_s,
        )
        records.append(record)
        if on_record is not None:
            on_record(record, len(records), num_requests)
    for task in done:
        task.result()  # a bug in the runner itself must not pass silently
    records.sort(key=lambda r: r.index)
    return LevelResult(
        concurrency=concurrency,
        num_requests=num_requests,
        wall_s=wall_s,
        timed_out=bool(pending),
        records=records,
    )


async def warmup(client: StreamingClient, prompt: str, count: int, timeout_s: float) -> list[RequestRecord]:
    """Sends ``count`` requests one after another (not measured); raises WarmupError at the first failure."""
    records = []
    for index in range(count):
        record = await measure_request(client, prompt, RequestRecord(index=index, concurrency=1), timeout_s)
        if not record.ok:
            raise WarmupError(
                f"warmup request {index + 1}/{count} failed: {record.error_kind}: {record.error_message}"
            )
        records.append(record)
    return records
