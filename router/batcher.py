"""The continuous-batching loop (TGI's ``batching_task``).

One task owns the running batch. It prefills what the queue admits, then decodes step after step; between
steps, waiting requests join when the queue holds ``waiting_served_ratio`` times the running count or
after ``max_waiting_tokens`` steps, if they fit the token budget. A shard that runs new prompts in chunks
inside its decode steps (the paged backend) schedules itself: it takes every waiting request at every
step, and its scheduler (shard/scheduler.py) decides when each runs. Finished and disconnected requests leave
at the next step: the Decode call lists only the request ids still wanted.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time

import grpc

from proto import pb

from .client import ShardClient
from .config import RouterConfig
from .errors import GenerationError
from .metrics import Metrics
from .queue import Entry, Queue
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

# The top alternatives of a row that asked for none (shared, never mutated).
NO_TOP: list[tuple[int, float]] = []


def request_to_pb(entry: Entry) -> pb.Request:
    r = entry.request
    p = r.parameters
    return pb.Request(
        id=entry.id,
        input_ids=r.input_ids,
        parameters=pb.NextTokenChooserParameters(
            temperature=p.temperature,
            top_k=p.top_k,
            top_p=p.top_p,
            typical_p=p.typical_p,
            do_sample=p.do_sample,
            seed=p.seed,
            repetition_penalty=p.repetition_penalty,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            min_p=p.min_p,
            logit_bias=dict(p.logit_bias),
            processors=dict(p.processors),
        ),
        max_new_tokens=r.max_new_tokens,
        prefill_logprobs=r.decoder_input_details,
        top_n_tokens=r.top_n_tokens,
        min_new_tokens=r.min_new_tokens,
        stop_token_ids=r.stop_token_ids,
        fault=r.fault,
        cache_salt=r.cache_salt,
        group=entry.group,
    )


class Batcher:
    def __init__(
        self,
        config: RouterConfig,
        client: ShardClient,
        queue: Queue,
        metrics: Metrics,
        max_batch_total_tokens: int,
        tokenizer: Tokenizer,
        join_every_step: bool = False,
    ) -> None:
        """``join_every_step``: the shard runs new prompts in chunks beside the running batch (proto
        InfoResponse.chunked_prefill), so waiting requests join at every step that has room for them."""
        self.config = config
        self.join_every_step = join_every_step
        self.tokenizer = tokenizer
        self.client = client
        self.queue = queue
        self.metrics = metrics
        self.max_batch_total_tokens = max_batch_total_tokens
        self.running: dict[int, Entry] = {}
        self.generation_health = True
        self._batch_ids = itertools.count()
        self._gauged_size = 0
        # When the last decode response arrived: the time until the next decode request is the router's.
        self._response_at: float | None = None

    def next_batch_id(self) -> int:
        return next(self._batch_ids)

    async def run(self) -> None:
        """Runs forever (until cancelled). A fault of the loop itself (a bug, not a shard error) fails the
        requests it was serving with 424, clears the shards and goes on: it never stops serving."""
        while True:
            await self.queue.not_empty.wait()
            try:
                await self._serve_batch()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("Batching loop fault: failing the running requests")
                self.generation_health = False
                self._fail(list(self.running), GenerationError("the batch failed (internal error)"))
                try:
                    await self.client.clear_cache(None)
                except grpc.aio.AioRpcError:
                    log.warning("ClearCache failed")
                self._gauged_size = 0
                self.metrics.batch_current_size.set(0)
                self.metrics.batch_current_max_tokens.set(0)

    async def _serve_batch(self) -> None:
        """Prefills what the queue admits and decodes until the running batch is empty."""
        c = self.config
        entries = self.queue.next_batch(None, *self._budgets(self.max_batch_total_tokens))
        if entries is None:
            return
        cached = await self._prefill(entries)
        waiting_steps = 1
        pending: pb.Generations | None = None
        while cached:
            waiting = len(self.queue)
            if waiting:
                running = sum(len(b.request_ids) for b in cached)
                wait_exceeded = waiting_steps >= c.max_waiting_tokens
                join_now = self.join_every_step or wait_exceeded
                min_size = None if join_now else int(running * c.waiting_served_ratio)
                joining = None
                if min_size is None or waiting >= min_size:  # else none could join: skip the O(n) count
                    budget = self.max_batch_total_tokens - self._held_tokens()
                    joining = self.queue.next_batch(min_size, *self._budgets(budget))
                if joining:
                    reason = (
                        "every_step" if self.join_every_step
                        else "wait_exceeded" if wait_exceeded else "backpressure"
                    )  # fmt: skip
                    self.metrics.batch_concat.labels(reason).inc()
                    cached = cached + await self._prefill(joining)
                    waiting_steps = 1
            cached, pending = await self._decode(cached, pending)
            waiting_steps += 1
        if pending is not None:
            self._deliver(pending)
        self._gauged_size = 0
        self.metrics.batch_current_size.set(0)
        self.metrics.batch_current_max_tokens.set(0)

    def _budgets(self, total: int) -> tuple[float, float]:
        """The prefill and total token budgets of the next requests to hand to the shard. A shard with
        chunked prefill schedules itself (shard/scheduler.py: its KV blocks, its step budget, preemption)
        and takes every waiting request at once; for the others the router keeps TGI's budgets."""
        if self.join_every_step:
            return math.inf, math.inf
        return self.config.max_batch_prefill_tokens, total

    def _held_tokens(self) -> int:
        """Token budget the running requests hold (padded backends: every row as long as the longest)."""
        entries = [e for e in self.running.values() if not e.done]
        if not entries:
            return 0
        if self.queue.requires_padding:
            longest = max(e.request.input_length + e.state.generated_tokens for e in entries)
            remaining = sum(e.request.max_new_tokens - e.state.generated_tokens for e in entries)
            return len(entries) * longest + remaining
        return sum(e.request.input_length + e.request.max_new_tokens for e in entries)

    async def _prefill(self, entries: list[Entry]) -> list[pb.CachedBatch]:
        """Prefills new requests and delivers their first tokens; returns their cached batch (which may
        already hold no live request: the next step then frees it on the shard)."""
        self._response_at = None  # a prefill between two decodes is not the router's own time
        now = time.monotonic()
        for entry in entries:
            entry.batched_at = now
            self.running[entry.id] = entry
            self.metrics.request_queue_duration.observe(now - entry.queued_at)
        self.metrics.queue_size.set(len(self.queue))
        self.metrics.batch_next_size.observe(len(entries))
        batch = pb.Batch(
            id=self.next_batch_id(),
            requests=[request_to_pb(e) for e in entries],
            max_tokens=sum(e.request.input_length + e.request.max_new_tokens for e in entries),
        )
        response = await self._step(
            "prefill", self.client.prefill(batch), [batch.id], [e.id for e in entries]
        )
        if response is None:
            return []
        self._deliver(response.generations)
        return self._live([response.batch])[0]

    async def _decode(
        self, batches: list[pb.CachedBatch], pending: pb.Generations | None
    ) -> tuple[list[pb.CachedBatch], pb.Generations | None]:
        """One decode step, pipelined with the router's own work.

        The next request goes out as soon as a response is in: the requests it names are the ones that
        this response did not end by length or EOS (a cheap check on token ids). Once it has been sent,
        the response's tokens are turned into text and events while the shard computes the step after.
        A request that a stop string ends is found during that delivery and leaves one step later (the
        shard computes one token for it that nobody sees). Returns the next batches and the generations
        still to deliver."""
        wanted, ids = self._live(batches)
        if not ids:
            if pending is not None:
                self._deliver(pending)
            for batch in wanted:  # free what the shard still holds for finished requests
                await self._clear(batch.id)
            return [], None
        if len(ids) != self._gauged_size:  # gauges move only when requests join or leave
            self._gauged_size = len(ids)
            self.metrics.batch_current_size.set(len(ids))
            self.metrics.batch_current_max_tokens.set(self._held_tokens())
        call = asyncio.ensure_future(
            self._step("decode", self.client.start_decode(wanted), [b.id for b in wanted], ids)
        )
        if self._response_at is not None:
            self.metrics.batch_router_duration.observe(time.perf_counter() - self._response_at)
        if pending is not None:
            await asyncio.sleep(0)  # gRPC's own task sends the call: let it run before delivering
            self._deliver(pending)
        response = await call
        if response is None:
            self._response_at = None
            return [], None
        self._response_at = time.perf_counter()
        g = response.generations
        if not response.HasField("batch"):
            return [], g
        return [pb.CachedBatch(id=response.batch.id, request_ids=self._survivors(response.batch, g))], g

    def _alive(self, rid: int) -> Entry | None:
        """The running entry of ``rid``; None when it is gone, or cancelled (it leaves now)."""
        entry = self.running.get(rid)
        if entry is not None and entry.cancelled:
            self._leave(entry, None)
            return None
        return entry

    def _survivors(self, batch: pb.CachedBatch, g: pb.Generations) -> list[int]:
        """The batch's requests that go on after this step's token, or without one: the cached batch may
        hold requests still running their prompt in chunks. A disconnected one leaves here."""
        tokens = dict(zip(g.request_ids, g.token_ids, strict=True))
        survivors = []
        for rid in batch.request_ids:
            entry = self._alive(rid)
            if entry is None:
                continue
            token_id = tokens.get(rid)
            if token_id is None or not entry.state.will_finish(token_id):
                survivors.append(rid)
        return survivors

    async def _clear(self, batch_id: int) -> None:
        try:
            await self.client.clear_cache(batch_id)
        except grpc.aio.AioRpcError:
            log.warning("ClearCache(%d) failed", batch_id)

    async def _step(self, method: str, call, batch_ids: list[int], request_ids: list[int]):
        """Runs one shard call with metrics; on failure, fails its requests (424) and clears its batches."""
        self.metrics.batch_inference_count.labels(method).inc()
        started = time.monotonic()
        try:
            response = await call
        except grpc.aio.AioRpcError as e:
            log.error("%s failed: %s", method, e.details())
            self.metrics.batch_inference_failure.labels(method).inc()
            self.generation_health = False
            self._fail(request_ids, GenerationError(e.details() or str(e.code())))
            for batch_id in batch_ids:
                await self._clear(batch_id)
            return None
        self.metrics.batch_inference_success.labels(method).inc()
        if response.HasField("cache"):
            self.metrics.observe_cache(response.cache)
        self.metrics.batch_inference_duration.labels(method).observe(time.monotonic() - started)
        if response.total_ns:
            self.metrics.batch_forward_duration.labels(method).observe(response.total_ns / 1e9)
        self.generation_health = True
        return response

    def _live(self, batches: list[pb.CachedBatch]) -> tuple[list[pb.CachedBatch], list[int]]:
        """The batches cut down to requests still wanted (finished and disconnected ones leave), and all
        their request ids. A batch left empty stays in the list, so that the shard is told to drop it."""
        out = []
        ids: list[int] = []
        for batch in batches:
            keep = [rid for rid in batch.request_ids if self._alive(rid) is not None]
            ids += keep
            out.append(pb.CachedBatch(id=batch.id, request_ids=keep, max_tokens=batch.max_tokens))
        return out, ids

    def _deliver(self, g: pb.Generations) -> None:
        """Turns one step's token ids into each request's next event.

        This loop is the router's own time per step. Plain tokens (``GenerationState.plain``: text known
        without decoding, nothing ends) take one pass over plain lists. The other rows go to
        ``_deliver_rows``: their detokenization windows are decoded in one batch call (in Rust, in
        parallel) rather than two calls per row."""
        for failure in g.failures:  # requests that failed alone; they are in no column below
            entry = self.running.get(failure.request_id)
            if entry is not None:
                entry.events.put(GenerationError(failure.message))
                self._leave(entry, "generation")
        running = self.running
        logprobs = list(g.logprobs)
        simple = not g.prefill and not g.top_n
        others = []
        for row, (rid, token_id) in enumerate(zip(g.request_ids, g.token_ids, strict=True)):
            entry = running.get(rid)
            if entry is None or entry.cancelled:
                continue
            event = entry.state.plain(token_id, logprobs[row]) if simple else None
            if event is None:
                others.append((row, entry, token_id))
            else:
                entry.events.put(event)
        if others:
            self._deliver_rows(g, others, logprobs)

    def _deliver_rows(
        self, g: pb.Generations, rows: list[tuple[int, Entry, int]], logprobs: list[float]
    ) -> None:
        """``_deliver`` for the rows that need more than ``plain``: detokenization in context, the last
        token, stop strings, prompt log-probabilities, top tokens."""
        items = []
        windows: list[list[int]] = []
        for row, entry, token_id in rows:
            text = entry.state.begin(token_id)  # None (no text), the text, or windows to decode
            if type(text) is tuple:
                windows.extend(text)
            items.append((row, entry, token_id, text))
        texts = self.tokenizer.decode_batch(windows) if windows else []
        prefill = {p.request_id: p for p in g.prefill}
        width = g.top_n
        top_ids, top_logprobs = (list(g.top_ids), list(g.top_logprobs)) if width else ((), ())
        position = 0
        for row, entry, token_id, text in items:
            if prefill and entry.id in prefill:
                entry.state.set_prefill(list(prefill[entry.id].ids), list(prefill[entry.id].logprobs))
            top = NO_TOP
            if width and entry.request.top_n_tokens:
                span = slice(row * width, (row + 1) * width)
                top = list(zip(top_ids[span], top_logprobs[span], strict=True))
            if type(text) is tuple:
                event = entry.state.push(token_id, logprobs[row], top, (texts[position], texts[position + 1]))
                position += 2
            else:
                event = entry.state.push(token_id, logprobs[row], top, text=text)
            entry.events.put(event)
            if event.finished is not None:
                self._leave(entry, None)

    def _leave(self, entry: Entry, failure: str | None) -> None:
        entry.done = True
        self.running.pop(entry.id, None)
        if failure:
            self.metrics.request_failure.labels(failure).inc()

    def _fail(self, request_ids: list[int], error: GenerationError) -> None:
        for rid in request_ids:
            entry = self.running.get(rid)
            if entry is not None:
                entry.events.put(error)
                self._leave(entry, "generation")
