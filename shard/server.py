"""The shard's gRPC service: protobuf <-> internal types, and the model thread's loop.

The router's one ``Generate`` stream brings requests and aborts; the model thread (``ModelLoop``) applies
them between steps and runs the engine core's steps (shard/core.py) while it has work, so the event loop
keeps answering ``Health`` and ``Info`` while a long step runs, and steps never overlap. With several
ranks, rank 0 relays each step's changes to the others (shard/relay.py), which run the same step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, cast

import grpc
import torch

from common.plugins import active
from proto import pb, pb_grpc

from .backends import load_backend
from .backends.base import BackendInfo
from .chunked import ChunkedEngine
from .config import ShardConfig
from .core import EngineCore, Limits, Output
from .dist import DistInfo, Parallel, init_parallel, select_device
from .engines import make_engine, runs_processors
from .faults import Faults
from .paged.lora import AdapterError, AdapterNotLoaded
from .processors import ProcessorContext, load_processors
from .relay import HEARTBEAT_S, LORA, STEP, WARMUP, PeerLostError, Relay
from .tracing import ShardTracer
from .types import RequestFailure, RequestSpec, SamplingParams, StepResult

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long a step waits at most for the event loop to have sent the previous step's output.
SEND_WAIT_S = 1.0

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]


def request_from_pb(r: pb.Request) -> RequestSpec:
    p = r.parameters
    return RequestSpec(
        id=r.id,
        input_ids=list(r.input_ids),
        params=SamplingParams(
            temperature=p.temperature or 1.0,
            top_k=p.top_k,
            top_p=p.top_p or 1.0,
            typical_p=p.typical_p or 1.0,
            do_sample=p.do_sample,
            seed=p.seed,
            repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty,
            presence_penalty=p.presence_penalty,
            min_p=p.min_p,
            logit_bias=tuple(sorted(p.logit_bias.items())),
            processors=tuple(sorted(p.processors.items())),
        ),
        max_new_tokens=r.max_new_tokens,
        prefill_logprobs=r.prefill_logprobs,
        top_n_tokens=r.top_n_tokens,
        min_new_tokens=r.min_new_tokens,
        stop_token_ids=tuple(r.stop_token_ids),
        fault=r.fault,
        cache_salt=r.cache_salt,
        group=r.group,
        ignore_eos=r.ignore_eos,
        adapter_id=r.adapter_id,
    )


def generations_to_pb(result: StepResult, finish_reasons: list[int] | None = None) -> pb.Generations:
    return pb.Generations(
        request_ids=result.request_ids,
        token_ids=result.token_ids,
        logprobs=result.logprobs,
        top_n=result.top_n,
        top_ids=result.top_ids,
        top_logprobs=result.top_logprobs,
        prefill=[
            pb.PrefillTokens(request_id=p.request_id, ids=p.ids, logprobs=p.logprobs) for p in result.prefill
        ],
        failures=[pb.RequestFailure(request_id=f.request_id, message=f.message) for f in result.failures],
        finish_reasons=cast("list[pb.FinishReason]", finish_reasons or []),
    )


def output_to_pb(out: Output, step: int) -> pb.StepOutput:
    """``step``: the output's number since the shard started (``StepOutput.step``)."""
    message = pb.StepOutput(
        step=step,
        generations=generations_to_pb(out.result, out.finish_reasons),
        total_ns=out.total_ns,
        forward_ns=out.forward_ns,
        joined=out.joined,
        max_tokens=out.max_tokens,
        waiting=out.waiting,
        running=out.running,
        prefill=out.prefill,
        failed=out.failed,
        running_adapters=out.running_adapters,
        waiting_adapters=out.waiting_adapters,
    )
    if out.cache is not None:
        message.cache.CopyFrom(pb.CacheStats(**out.cache))
    return message


def info_to_pb(info: BackendInfo, world_size: int, processors: list[str]) -> pb.InfoResponse:
    return pb.InfoResponse(
        requires_padding=info.requires_padding,
        dtype=info.dtype,
        device_type=info.device_type,
        eos_token_ids=info.eos_token_ids,
        max_position_embeddings=info.max_position_embeddings,
        world_size=world_size,
        backend=info.name,
        vocab_size=info.vocab_size,
        unsupported_parameters=list(info.unsupported_parameters),
        processors=processors,
        lora_adapters=list(info.lora_adapters),
        max_loras=info.max_loras,
    )


def apply_changes(core: EngineCore, plan: pb.StepPlan) -> list[RequestFailure]:
    """One step's changes, alike on every rank: the requests added (a repeated id is refused alone), then
    the aborts. The step itself follows when ``plan.step`` (rank 0 sets it once these are applied)."""
    refused = core.add([request_from_pb(r) for r in plan.add])
    core.abort(list(plan.abort))
    return refused


def update_lora(core: EngineCore, request: pb.LoraUpdateRequest) -> list[str]:
    """Loads or unloads a LoRA adapter (the paged engine's ``update_lora``); the adapters loaded after."""
    engine = core.engine
    if not isinstance(engine, ChunkedEngine):
        raise LoraUnsupportedError("LoRA adapters need the paged backend")
    return list(engine.update_lora(request.name, request.path, request.unload))


class LoraUnsupportedError(RuntimeError):
    """A runtime LoRA update on a backend that holds no adapters."""


def run_warmup(core: EngineCore, request: pb.WarmupRequest) -> int:
    core.use_eos(list(request.eos_token_ids))
    core.warmup([request_from_pb(r) for r in request.batch.requests])
    return core.engine.backend.max_supported_total_tokens() or 0


class ModelLoop:
    """The model thread's loop (rank 0): between steps it applies what the router sent (requests, aborts)
    and relays it to the other ranks; it runs the core's steps while there is work and hands each step's
    output to the event loop; idle, it pings the other ranks.

    Every torch operation of the process runs on this one thread (see ``serve``)."""

    def __init__(
        self,
        core: EngineCore,
        relay: Relay | None,
        loop: asyncio.AbstractEventLoop,
        tracer: ShardTracer | None = None,
    ) -> None:
        self.core = core
        self.relay = relay
        self.loop = loop
        # Rank 0's spans (--otlp-endpoint), else None; and the outputs sent so far (StepOutput.step).
        self.tracer = tracer
        self.steps = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: list[pb.Request] = []
        self._aborts: list[int] = []
        self._calls: deque[tuple[Callable[[], object], asyncio.Future]] = deque()
        # Set when the stream that added the live requests has closed: they all end.
        self._abort_all = False
        # Set once the event loop has sent the last step's output: the next step waits for it, so that
        # the event loop's work never runs beside the step's compute threads (on a CPU that has no core
        # to spare it would stall them; a step costs more than the wait).
        self._sent = threading.Event()
        self._sent.set()
        self.stopping = False
        # Where step outputs go (the open Generate stream; called on the event loop), and None between
        # streams: outputs then have nobody to go to.
        self.sink: Callable[[pb.StepOutput], None] | None = None

    # -- from the event loop -----------------------------------------------------------------------
    def submit(self, adds: list[pb.Request], aborts: list[int]) -> None:
        with self._lock:
            self._adds.extend(adds)
            self._aborts.extend(aborts)
        self._wake.set()

    def abort_all(self) -> None:
        """Ends every live request (its stream has closed) before the next step."""
        with self._lock:
            self._abort_all = True
        self._wake.set()

    def call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Runs ``fn`` on the model thread between two steps; its result (or error) as a future."""
        future: asyncio.Future[T] = self.loop.create_future()
        with self._lock:
            self._calls.append((fn, future))
        self._wake.set()
        return future

    def stop(self) -> None:
        self.stopping = True
        self._wake.set()

    # -- on the model thread -----------------------------------------------------------------------
    def run(self) -> None:
        relay, tracer = self.relay, self.tracer
        try:
            while not self.stopping:
                with self._lock:
                    adds, self._adds = self._adds, []
                    aborts, self._aborts = self._aborts, []
                    calls = list(self._calls)
                    self._calls.clear()
                    if self._abort_all:
                        self._abort_all = False
                        aborts = [*self.core.live, *aborts]
                    self._wake.clear()
                for fn, future in calls:
                    self._resolve(fn, future)
                if not adds and not aborts and not self.core.has_work():
                    if not calls and not self._wake.wait(HEARTBEAT_S) and relay is not None:
                        relay.ping()
                    continue
                plan = pb.StepPlan(add=adds, abort=aborts)
                started = time.time_ns() if tracer is not None else 0
                if tracer is not None:
                    tracer.added(adds, started)
                refused = apply_changes(self.core, plan)
                plan.step = self.core.has_work()
                if relay is not None:
                    relay.send(STEP, plan.SerializeToString())
                out = self.core.step() if plan.step else None
                if out is None and refused:  # only refusals: nothing ran
                    out = Output(StepResult([], [], []), [])
                if out is not None:
                    out.result.failures += refused
                    self.steps += 1
                if tracer is not None:
                    tracer.stepped(self.steps, aborts, out, started, time.time_ns())
                if out is None:
                    continue
                self._sent.wait(SEND_WAIT_S)
                self._sent.clear()
                self.loop.call_soon_threadsafe(self._emit, out, self.steps)
        except PeerLostError as e:
            if not (relay is not None and relay.stopping):
                _lost(e)
        except BaseException as e:
            log.critical("Unrecoverable device error in a step, the shard exits: %s", e, exc_info=True)
            self.loop.call_soon_threadsafe(self._emit_fatal, f"{type(e).__name__}: {e}")
            time.sleep(0.2)
            logging.shutdown()
            os._exit(1)

    def _resolve(self, fn: Callable[[], object], future: asyncio.Future) -> None:
        try:
            result = fn()
        except Exception as e:
            self.loop.call_soon_threadsafe(_settle, future, None, e)
        else:
            self.loop.call_soon_threadsafe(_settle, future, result, None)

    # -- back on the event loop --------------------------------------------------------------------
    def _emit(self, out: Output, step: int) -> None:
        try:
            if self.sink is not None:
                self.sink(output_to_pb(out, step))
        finally:
            self._sent.set()

    def _emit_fatal(self, message: str) -> None:
        ids = list(self.core.live)
        out = Output(
            StepResult([], [], [], failures=[RequestFailure(i, message) for i in ids]), [], failed=True
        )
        self._emit(out, self.steps + 1)


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class ShardService(pb_grpc.TextGenerationServiceServicer):
    """Protobuf in and out; the model work runs in ``ModelLoop`` (rank 0) or follows it (other ranks)."""

    def __init__(self, core: EngineCore, world_size: int, model: ModelLoop | None) -> None:
        self.core = core
        self.world_size = world_size
        self.model = model

    async def _leader(self, context: grpc.aio.ServicerContext) -> ModelLoop:
        if self.model is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this rank follows rank 0")
            raise AssertionError("unreachable")
        return self.model

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        engine = self.core.engine
        return info_to_pb(engine.backend.info, self.world_size, engine.processor_names())

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse()

    async def Warmup(self, request: pb.WarmupRequest, context: grpc.aio.ServicerContext) -> pb.WarmupResponse:
        model = await self._leader(context)

        def warmup() -> int:
            if model.relay is not None:
                model.relay.send(WARMUP, request.SerializeToString())
            return run_warmup(self.core, request)

        traced = model.tracer.warmup(context.invocation_metadata() or ()) if model.tracer else None
        try:
            with traced or contextlib.nullcontext():
                supported = await model.call(warmup)
        except (ValueError, RuntimeError) as e:
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        return pb.WarmupResponse(max_supported_total_tokens=supported)

    async def UpdateLora(
        self, request: pb.LoraUpdateRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoraUpdateResponse:
        """Rank 0 updates first; only an update that succeeded goes to the other ranks (they read the
        same directory, so they succeed alike)."""
        model = await self._leader(context)

        def update() -> list[str]:
            names = update_lora(self.core, request)
            if model.relay is not None:
                model.relay.send(LORA, request.SerializeToString())
            return names

        try:
            names = await model.call(update)
        except AdapterNotLoaded as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except AdapterError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except LoraUnsupportedError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        return pb.LoraUpdateResponse(lora_adapters=names)

    async def Generate(
        self, requests: AsyncIterator[pb.GenerateRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepOutput]:
        model = await self._leader(context)
        if model.sink is not None:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, "a Generate stream is open already")
        outputs: asyncio.Queue[pb.StepOutput | None] = asyncio.Queue()
        model.sink = outputs.put_nowait

        async def read() -> None:
            async for message in requests:
                model.submit(list(message.add), list(message.abort))
            outputs.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (out := await outputs.get()) is not None:
                yield out
        finally:
            reader.cancel()
            model.sink = None
            model.abort_all()  # the stream's requests end with it


async def serve(config: ShardConfig) -> None:
    """Loads the model, then answers on ``config.socket_path`` until SIGTERM/SIGINT."""
    dist = DistInfo(rank=config.rank, world_size=config.world_size, local_rank=DistInfo.from_env().local_rank)
    device = select_device(dist)
    parallel = init_parallel(dist, device)
    # Rank 0 relays the router's calls to the other ranks (the router talks to rank 0 only).
    relay = Relay(config.rank, config.world_size) if config.world_size > 1 else None
    # Every torch operation of this process runs on this one thread, loading included: a second thread
    # that runs parallel regions gets a second OpenMP team, and the two teams' threads then fight over
    # the cores (a decode step measured 1.7x slower when the model loaded on the main thread).
    model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
    loop = asyncio.get_running_loop()
    core = await loop.run_in_executor(model_thread, _load_core, config, device, parallel)
    if relay is not None:  # rank 0 answers only once every rank has loaded the model
        relay.wait_followers() if relay.leader else relay.ready()
    tracer = ShardTracer.from_config(config)
    model = ModelLoop(core, relay, loop, tracer) if relay is None or relay.leader else None
    service = ShardService(core, config.world_size, model)
    server = grpc.aio.server(options=GRPC_OPTIONS)
    pb_grpc.add_TextGenerationServiceServicer_to_server(service, server)
    path = config.socket_path
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server.add_insecure_port(f"unix://{path}")
    await server.start()
    log.info("Shard %d/%d serving on unix://%s", config.rank, config.world_size, path)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if model is not None:
        model_thread.submit(model.run)
    else:
        assert relay is not None
        model_thread.submit(_follow, core, relay, loop, stop)
    try:
        await stop.wait()
        log.info("Shard %d stopping", config.rank)
        if relay is not None:
            relay.stopping = True
        await server.stop(grace=1.0)
        if model is not None:
            model.stop()
            model_thread.shutdown(wait=True)
        if relay is not None and relay.leader:
            relay.stop()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        if tracer is not None:
            tracer.shutdown()  # exports what is pending
    if relay is not None:  # no torch.distributed teardown: a follower's thread may still wait in a receive
        logging.shutdown()
        os._exit(0)


def _load_core(config: ShardConfig, device: torch.device, parallel: Parallel) -> EngineCore:
    """Loads the backend and the logits processors and builds the engine core (on the model thread)."""
    started = time.perf_counter()
    if config.disable_custom_kernels:
        from .paged.kernels import disable

        disable("disabled by --disable-custom-kernels")
        log.info("Custom kernels off (--disable-custom-kernels): plain torch operations, no CUDA graphs")
    backend = load_backend(config, device, parallel)
    log.info("Model ready in %.1f s", time.perf_counter() - started)
    if config.fault_injection:
        log.warning("Fault injection is on: requests can make this shard fail (tests only)")
    processors = None
    if not runs_processors(backend):
        optional = [p.name for p in active("logits_processors", config.plugins) if not p.builtin]
        if optional:
            raise ValueError(
                f"--plugin {optional[0]}: the {backend.info.name} engine runs no logits processors"
            )
    else:
        context = ProcessorContext(
            model_path=config.model_path,
            vocab_size=backend.info.vocab_size,
            eos_token_ids=tuple(backend.info.eos_token_ids),
            device=device,
            options={"watermark_gamma": config.watermark_gamma, "watermark_delta": config.watermark_delta},
        )
        processors = load_processors(config.plugins, context)
    engine = make_engine(
        backend, Faults(config.fault_injection), processors, config.max_batch_prefill_tokens, config.speculate
    )
    limits = Limits(
        max_batch_prefill_tokens=config.max_batch_prefill_tokens,
        max_batch_total_tokens=config.max_batch_total_tokens or max(16000, config.max_batch_prefill_tokens),
        waiting_served_ratio=config.waiting_served_ratio,
        max_waiting_tokens=config.max_waiting_tokens,
    )
    return EngineCore(engine, limits, contain_failures=config.world_size == 1)


def _lost(error: PeerLostError) -> None:
    log.critical("Lost rank %d, the shard exits: %s", error.rank, error.cause)
    logging.shutdown()
    os._exit(1)


def follow_step(core: EngineCore, method: str, payload: bytes) -> None:
    """A follower runs one relayed message: the same changes and step as rank 0, its warm-up, or a LoRA
    update that succeeded on rank 0."""
    if method == STEP:
        plan = pb.StepPlan.FromString(payload)
        apply_changes(core, plan)
        if plan.step:
            core.step()
    elif method == WARMUP:
        run_warmup(core, pb.WarmupRequest.FromString(payload))
    elif method == LORA:
        update_lora(core, pb.LoraUpdateRequest.FromString(payload))


def _follow(core: EngineCore, relay: Relay, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """A follower's model thread: rank 0's steps, in its order, until it says stop (then exit 0)."""
    try:
        relay.follow(lambda method, payload: follow_step(core, method, payload))
    except PeerLostError as e:
        if not relay.stopping:
            _lost(e)
        return
    except BaseException:
        log.critical("A relayed step failed, the shard exits", exc_info=True)
        os._exit(1)
    loop.call_soon_threadsafe(stop.set)
