"""The router's end of the shard's ``Generate`` stream.

The shard schedules (shard/core.py, shard/scheduler.py): the router sends each request as soon as it is
admitted and an abort when it ends one itself (a stop string, a client gone); the shard answers every step
with its tokens and how each request ended (length, end-of-sequence, a stop token id). Here each token
becomes its request's next event (text, stop strings, the final answer). Writes are coalesced: the
requests and aborts of one turn of the event loop go in one message.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from proto import pb

from .client import ShardClient
from .entry import Entry
from .errors import GenerationError
from .metrics import Metrics
from .tokenizer import Tokenizer
from .tracing import RouterTracer

log = logging.getLogger(__name__)

# The top alternatives of a row that asked for none (shared, never mutated).
NO_TOP: list[tuple[int, float]] = []
# How long the router waits before it opens the stream again after it broke.
REOPEN_S = 0.2


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
        ignore_eos=r.ignore_eos_token,
        adapter_id=r.adapter_id,
    )


# The shard's finish reasons (proto FinishReason) as TGI names them.
FINISH_NAMES: dict[int, str] = {
    pb.FINISH_LENGTH: "length",
    pb.FINISH_EOS: "eos_token",
    pb.FINISH_STOP: "stop_sequence",
}


class EngineClient:
    """Sends requests and aborts to the shard and turns each step's output into events."""

    def __init__(
        self, client: ShardClient, metrics: Metrics, tokenizer: Tokenizer, tracer: RouterTracer | None = None
    ) -> None:
        self.client = client
        self.metrics = metrics
        self.tokenizer = tokenizer
        self.tracer = tracer
        self.running: dict[int, Entry] = {}
        # False after a failed step, until a real request has run again (``Infer.healthy``).
        self.generation_health = True
        self._adds: list[pb.Request] = []
        self._aborts: list[int] = []
        self._outbox: asyncio.Queue[pb.GenerateRequest] = asyncio.Queue()
        self._flush_pending = False
        # Liveness probes: request id -> the future its end resolves (True: it ran).
        self._probes: dict[int, asyncio.Future[bool]] = {}
        self._gauged_size = -1

    # -- requests out -----------------------------------------------------------------------------
    def add(self, entry: Entry) -> None:
        self.running[entry.id] = entry
        message = request_to_pb(entry)
        if entry.trace is not None:
            message.trace_context.update(entry.trace.carrier)
        self._adds.append(message)
        self._schedule_flush()

    def abort(self, entry: Entry) -> None:
        """Ends ``entry`` on the shard (the router ended it, or its client went away)."""
        if self.running.pop(entry.id, None) is not None:
            self._aborts.append(entry.id)
            self._schedule_flush()

    def probe(self, request: pb.Request) -> asyncio.Future[bool]:
        """Runs a raw request (a liveness check); its future says whether it ran to its end."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._probes[request.id] = future
        self._adds.append(request)
        self._schedule_flush()
        return future

    def _schedule_flush(self) -> None:
        if not self._flush_pending:
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if self._adds or self._aborts:
            self._outbox.put_nowait(pb.GenerateRequest(add=self._adds, abort=self._aborts))
            self._adds, self._aborts = [], []

    # -- the stream -------------------------------------------------------------------------------
    async def run(self) -> None:
        """Runs forever (until cancelled): opens the stream, writes what is sent, delivers what comes. A
        broken stream (or a fault of this loop itself) fails the requests it carried; then it opens again."""
        while True:
            call = self.client.generate()
            writer = asyncio.create_task(self._write(call))
            try:
                while True:
                    out = await call.read()
                    if out is grpc.aio.EOF:
                        raise GenerationError("the shard closed the generation stream")
                    self._on_step(out)
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as e:
                if isinstance(e, grpc.aio.AioRpcError):
                    log.error("The generation stream failed: %s", e.details())
                else:
                    log.exception("Generation stream fault: failing its requests")
                self.generation_health = False
                writer.cancel()  # so that it takes nothing more from the outbox for the broken stream
                self._fail_all(GenerationError("the shard's generation stream broke"))
                call.cancel()
                await asyncio.sleep(REOPEN_S)
            finally:
                writer.cancel()

    async def _write(self, call: grpc.aio.StreamStreamCall) -> None:
        # What was queued before a broken stream failed its requests was dropped then (``_fail_all``);
        # what was queued since (while the stream opened again) belongs to live requests.
        while True:
            await call.write(await self._outbox.get())

    def _on_step(self, out: pb.StepOutput) -> None:
        m = self.metrics
        method = "prefill" if out.prefill else "decode"
        m.batch_inference_count.labels(method).inc()
        if out.failed:
            m.batch_inference_failure.labels(method).inc()
            self.generation_health = False
        else:
            m.batch_inference_success.labels(method).inc()
        if out.HasField("cache"):
            m.observe_cache(out.cache)
        m.batch_inference_duration.labels(method).observe(out.total_ns / 1e9)
        m.batch_forward_duration.labels(method).observe(out.forward_ns / 1e9)
        if out.joined:
            m.batch_next_size.observe(out.joined)
        m.batch_current_max_tokens.set(out.max_tokens)
        m.queue_size.set(out.waiting)
        m.observe_gateway(out)
        if out.running != self._gauged_size:
            self._gauged_size = out.running
            m.batch_current_size.set(out.running)
        tracer = self.tracer
        if tracer is None:
            self._deliver(out.generations)
            return
        rows = tracer.step_rows(self.running, out)
        started = time.time_ns()
        self._deliver(out.generations)
        tracer.stepped(rows, out, started, time.time_ns())

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
            elif failure.request_id in self._probes:
                self._settle_probe(failure.request_id, False)
        running = self.running
        logprobs = list(g.logprobs)
        reasons = list(g.finish_reasons)
        simple = not g.prefill and not g.top_n
        # Rows for _deliver_rows, in rounds: a request has several rows in a speculative step, and once
        # one of them goes there, its later rows follow it, each a round later (a round decodes one row
        # of each request, in order).
        rounds: list[list[tuple[int, Entry, int, int]]] = [[]]
        round_of: dict[int, int] = {}
        now = 0.0
        for row, (rid, token_id) in enumerate(zip(g.request_ids, g.token_ids, strict=True)):
            entry = running.get(rid)
            if entry is None or entry.cancelled:
                if self._probes and rid in self._probes and reasons[row]:
                    self._settle_probe(rid, True)
                continue
            if entry.batched_at is None:
                now = now or time.monotonic()
                entry.batched_at = now
                self.metrics.request_queue_duration.observe(now - entry.queued_at)
            reason = reasons[row]
            later = round_of.get(rid)
            if later is None:
                event = entry.state.plain(token_id, logprobs[row]) if simple and not reason else None
                if event is not None:
                    entry.events.put(event)
                    continue
                later = -1
            round_of[rid] = later = later + 1
            if later == len(rounds):
                rounds.append([])
            rounds[later].append((row, entry, token_id, reason))
        for others in rounds:
            others = [item for item in others if not item[1].done]  # a stop string ended it a round ago
            if others:
                self._deliver_rows(g, others, logprobs)

    def _deliver_rows(
        self, g: pb.Generations, rows: list[tuple[int, Entry, int, int]], logprobs: list[float]
    ) -> None:
        """``_deliver`` for the rows that need more than ``plain``: detokenization in context, the last
        token, stop strings, prompt log-probabilities, top tokens."""
        items = []
        windows: list[list[int]] = []
        for row, entry, token_id, reason in rows:
            text = entry.state.begin(token_id)  # None (no text), the text, or windows to decode
            if type(text) is tuple:
                windows.extend(text)
            items.append((row, entry, token_id, text, FINISH_NAMES.get(reason)))
        texts = self.tokenizer.decode_batch(windows) if windows else []
        prefill = {p.request_id: p for p in g.prefill}
        width = g.top_n
        top_ids, top_logprobs = (list(g.top_ids), list(g.top_logprobs)) if width else ((), ())
        position = 0
        for row, entry, token_id, text, ended in items:
            if prefill and entry.id in prefill:
                entry.state.set_prefill(list(prefill[entry.id].ids), list(prefill[entry.id].logprobs))
            top = NO_TOP
            if width and entry.request.top_n_tokens:
                span = slice(row * width, (row + 1) * width)
                top = list(zip(top_ids[span], top_logprobs[span], strict=True))
            if isinstance(text, tuple):
                pair = (texts[position], texts[position + 1])
                event = entry.state.push(token_id, logprobs[row], top, pair, ended=ended)
                position += 2
            else:
                event = entry.state.push(token_id, logprobs[row], top, text=text, ended=ended)
            entry.events.put(event)
            if event.finished is not None:
                if ended is None:  # a stop string: the shard does not know it has ended
                    self.abort(entry)
                self._leave(entry, None)

    def _leave(self, entry: Entry, failure: str | None) -> None:
        entry.done = True
        self.running.pop(entry.id, None)
        if failure:
            self.metrics.request_failure.labels(failure).inc()

    def _fail_all(self, error: GenerationError) -> None:
        # What is queued for the shard belongs to the requests failed here: the next stream sends none of it.
        self._adds, self._aborts = [], []
        while not self._outbox.empty():
            self._outbox.get_nowait()
        for entry in list(self.running.values()):
            if entry.trace is not None:
                entry.trace.fail(str(error))
            entry.events.put(error)
            self._leave(entry, "generation")
        for rid in list(self._probes):
            self._settle_probe(rid, False)

    def _settle_probe(self, rid: int, ran: bool) -> None:
        future = self._probes.pop(rid)
        if not future.done():
            future.set_result(ran)
