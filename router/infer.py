"""The router's core facade: admission, submission to the queue, health and warm-up.

HTTP handlers (TGI or OpenAI shapes) use only this: ``admit()``, ``validator``, ``submit()`` and the
entry's events. The shard schedules; ``engine_client`` carries requests to it and tokens back;
validation lives in ``validation``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Iterator

import grpc

from proto import pb

from .client import ShardClient
from .config import RouterConfig
from .engine_client import EngineClient
from .entry import Entry
from .errors import GenerationError, InferError, OverloadedError, UnhealthyError, ValidationError
from .generation import Finished, GenerationState, StreamEvent
from .metrics import Metrics
from .tokenizer import Tokenizer
from .tracing import RouterTracer
from .validation import Validator, ValidRequest

log = logging.getLogger(__name__)

# How long /health waits for its one-token request after a failed step.
LIVENESS_TIMEOUT_S = 30.0


class Admission:
    """The ``max_concurrent_requests`` slots one request holds: one per sequence it runs."""

    def __init__(self, infer: Infer) -> None:
        self.infer = infer
        self.held = 0

    def need(self, sequences: int, field: str = "n") -> None:
        """Grows the slots held to ``sequences``: a 429 at once when the free slots cannot hold them, a 422
        naming ``field`` when the server could never hold them."""
        limit = self.infer.config.max_concurrent_requests
        if sequences > limit:
            raise ValidationError(
                f"`{field}` asks for {sequences} sequences, more than the {limit} this server runs at once "
                "(--max-concurrent-requests)",
                field,
            )
        extra = sequences - self.held
        if extra <= 0:
            return
        free = limit - self.infer.in_flight
        if extra > free:
            self.infer.metrics.request_failure.labels("overloaded").inc()
            if self.held == 0:
                raise OverloadedError()
            raise OverloadedError(
                f"Model is overloaded: the request runs {sequences} sequences, and {self.held + free} of the "
                f"{limit} slots (--max-concurrent-requests) are free"
            )
        self.infer.in_flight += extra
        self.held += extra


class Infer:
    def __init__(
        self,
        config: RouterConfig,
        client: ShardClient,
        tokenizer: Tokenizer,
        info: pb.InfoResponse,
        tracer: RouterTracer | None = None,
    ) -> None:
        self.config = config
        self.tracer = tracer
        self.client = client
        self.tokenizer = tokenizer
        self.info = info
        self.eos_ids = frozenset(info.eos_token_ids) or frozenset(
            [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        )
        self.metrics = Metrics(
            config.max_input_length,
            config.max_total_tokens,
            config.model_names[0],
            info.max_loras or len(info.lora_adapters),
        )
        self.validator = Validator(
            config, tokenizer, info.unsupported_parameters, info.backend, info.processors, info.lora_adapters
        )
        self.max_batch_total_tokens = config.max_batch_total_tokens or max(
            16000, config.max_total_tokens, config.max_batch_prefill_tokens
        )
        self.engine = EngineClient(client, self.metrics, tokenizer, tracer)
        self.ready = False
        # Set on SIGTERM: new requests get 503 while the admitted ones finish (see ``drain``).
        self.draining = False
        self.in_flight = 0
        self._ids = itertools.count()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Warms the shards up, learns the KV memory they hold, and opens the generation stream."""
        with self.tracer.warmup() if self.tracer is not None else contextlib.nullcontext(None) as metadata:
            supported = await self.client.warmup(self._warmup_batch(), sorted(self.eos_ids), metadata)
        if supported:
            self.max_batch_total_tokens = supported
        log.info("Warmed up; max batch total tokens: %d", self.max_batch_total_tokens)
        self.metrics.token_budget = self.max_batch_total_tokens
        self._task = asyncio.create_task(self.engine.run(), name="generation-stream")
        self._task.add_done_callback(self._on_stream_exit)
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.validator.close()

    def _on_stream_exit(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("The generation stream's task crashed", exc_info=task.exception())
            self.ready = False

    def _warmup_batch(self) -> pb.Batch:
        """A small batch with every sampling feature on (TGI's warm-up), run once before serving."""
        ids = self.tokenizer.encode("_test " * 8)[: self.config.max_input_length] or [0]
        params = pb.NextTokenChooserParameters(
            temperature=0.9,
            top_k=10,
            top_p=0.9,
            typical_p=0.9,
            do_sample=True,
            seed=0,
            repetition_penalty=1.2,
        )
        requests = [
            pb.Request(
                id=i,
                input_ids=ids,
                parameters=params,
                max_new_tokens=2,
                prefill_logprobs=True,
                top_n_tokens=2,
            )
            for i in range(2)
        ]
        return pb.Batch(id=0, requests=requests, max_tokens=len(requests) * (len(ids) + 2))

    @contextlib.contextmanager
    def admit(self) -> Iterator[Admission]:
        """Holds one of ``max_concurrent_requests`` slots, or raises an immediate 429 (503 while draining).
        A request of several sequences (n, best_of) then takes one slot per sequence: ``Admission.need``."""
        if self.draining:
            raise UnhealthyError("the server is shutting down")
        admission = Admission(self)
        admission.need(1)
        try:
            yield admission
        finally:
            self.in_flight -= admission.held

    async def drain(self, timeout: float) -> bool:
        """Stops admitting requests and waits up to ``timeout`` seconds for the admitted ones to finish.

        Returns whether they all did."""
        self.draining = True
        deadline = time.monotonic() + timeout
        if self.in_flight:
            log.info("Draining: %d requests in flight (up to %.0f s)", self.in_flight, timeout)
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.in_flight:
            log.warning("Graceful termination timeout: %d requests cut off", self.in_flight)
        return self.in_flight == 0

    def new_group(self) -> int:
        """An id for a client request of several sequences (OpenAI's n, best_of): see ``submit``."""
        return next(self._ids)

    def set_adapters(self, names: list[str]) -> None:
        """The LoRA adapters the shards hold after a runtime update: requests, /v1/models and the
        gateway's max_lora follow them."""
        self.validator.adapters = tuple(names)
        self.metrics.max_lora = self.info.max_loras or len(names)

    def submit(self, request: ValidRequest, group: int = 0) -> Entry:
        """Queues one sequence; ``group`` (from ``new_group``) names the client request it belongs to,
        0 for a request of one sequence."""
        if not self.ready:
            raise UnhealthyError("the server is not ready")
        entry = Entry(next(self._ids), request, GenerationState(request, self.tokenizer, self.eos_ids))
        entry.group = group or entry.id
        if self.tracer is not None:
            entry.trace = self.tracer.sequence(
                entry.id, entry.group, request.input_length, request.max_new_tokens
            )
        self.metrics.request_input_length.observe(request.input_length)
        self.metrics.request_max_new_tokens.observe(request.max_new_tokens)
        if request.adapter_id:
            self.metrics.lora_requests.labels(request.adapter_id).inc()
        self.engine.add(entry)
        return entry

    @contextlib.asynccontextmanager
    async def request(self, request: ValidRequest, group: int = 0) -> AsyncIterator[Entry]:
        """Queues a request for the block's duration; leaving early (a disconnect) cancels it, so it
        leaves the running batch at the next step."""
        entry = self.submit(request, group)
        try:
            yield entry
        finally:
            if not entry.done:
                entry.cancelled = True
                self.engine.abort(entry)
                self.metrics.request_failure.labels("dropped").inc()
            if entry.trace is not None:
                entry.trace.close(entry.cancelled)

    async def stream_batches(self, entry: Entry) -> AsyncIterator[list[StreamEvent]]:
        """The entry's events, in lists of whatever piled up since the consumer last looked (one write
        for several tokens when a client falls behind), up to and including its last; raises the error
        it ended with, if any."""
        while True:
            await entry.events.wait()
            batch: list[StreamEvent] = []
            for event in entry.events.take_all():
                if isinstance(event, InferError):
                    if batch:
                        yield batch
                    raise event
                batch.append(event)
                if event.finished is not None:
                    self._observe(entry, event.finished)
                    yield batch
                    return
            yield batch

    async def stream(self, entry: Entry) -> AsyncIterator[StreamEvent]:
        """The entry's events one by one (see ``stream_batches``)."""
        async for batch in self.stream_batches(entry):
            for event in batch:
                yield event

    async def generate(self, entry: Entry) -> Finished:
        async for event in self.stream(entry):
            if event.finished is not None:
                return event.finished
        raise GenerationError("generation ended without a final token")

    def _observe(self, entry: Entry, finished: Finished) -> None:
        if entry.trace is not None:
            entry.trace.end_finished(finished.finish_reason, finished.generated_tokens)
        now = time.monotonic()
        m = self.metrics
        m.request_success.inc()
        m.request_duration.observe(now - entry.queued_at)
        if entry.batched_at is not None:
            inference = now - entry.batched_at
            m.request_inference_duration.observe(inference)
            m.request_mean_time_per_token_duration.observe(inference / max(finished.generated_tokens, 1))
        m.request_generated_tokens.observe(finished.generated_tokens)

    async def healthy(self) -> bool:
        """Shards answer Health; after a failed generation, a real one-token request must run too."""
        if not self.ready or self.draining:
            return False
        try:
            await self.client.health(timeout=1.0)
        except grpc.aio.AioRpcError as e:
            log.warning("Health check failed: %s", e.details())
            return False
        if self.engine.generation_health:
            return True
        ids = self.tokenizer.encode("liveness")[:1] or [0]
        probe = self.engine.probe(pb.Request(id=next(self._ids), input_ids=ids, max_new_tokens=1))
        try:
            ran = await asyncio.wait_for(probe, LIVENESS_TIMEOUT_S)
        except TimeoutError:
            log.warning("Health check failed: the liveness request did not end in %.0f s", LIVENESS_TIMEOUT_S)
            return False
        if ran:
            self.engine.generation_health = True
        return ran
