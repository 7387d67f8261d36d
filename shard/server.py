"""The shard's gRPC service: protobuf <-> internal types, and nothing else.

Model work runs on one worker thread, so the event loop keeps answering ``Health`` and ``Info`` while a
long prefill runs, and steps never overlap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import torch

from common.plugins import active
from proto import pb, pb_grpc

from .backends import load_backend
from .backends.base import BackendInfo
from .batch import UnknownRequestError
from .config import ShardConfig
from .dist import DistInfo, Parallel, init_parallel, select_device
from .engine import Cached, Engine, UnknownBatchError
from .engines import make_engine
from .faults import Faults, is_fatal
from .processors import ProcessorContext, load_processors
from .relay import HEARTBEAT_S, PeerLostError, Relay
from .types import RequestSpec, SamplingParams, StepResult

log = logging.getLogger(__name__)
T = TypeVar("T")

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
    )


def generations_to_pb(result: StepResult) -> pb.Generations:
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
    )


def info_to_pb(
    info: BackendInfo, world_size: int, processors: list[str], chunked_prefill: bool = False
) -> pb.InfoResponse:
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
        chunked_prefill=chunked_prefill,
    )


def _warmup(engine: Engine, request: pb.WarmupRequest) -> int:
    batch = request.batch
    engine.prefill(batch.id, [request_from_pb(r) for r in batch.requests], batch.max_tokens)
    engine.decode([(batch.id, [r.id for r in batch.requests])])
    engine.clear(batch.id)
    return engine.backend.max_supported_total_tokens() or 0


def _prefill(engine: Engine, request: pb.PrefillRequest) -> StepResult:
    batch = request.batch
    return engine.prefill(batch.id, [request_from_pb(r) for r in batch.requests], batch.max_tokens)


def _decode(engine: Engine, request: pb.DecodeRequest) -> tuple[StepResult, Cached | None]:
    return engine.decode([(b.id, list(b.request_ids)) for b in request.batches])


def _clear(engine: Engine, request: pb.ClearCacheRequest) -> None:
    engine.clear(request.id if request.HasField("id") else None)


# The RPCs that run model work: every rank runs each of them, in the same order (shard/relay.py).
MODEL_WORK: dict[str, tuple[type, Callable[[Engine, object], object]]] = {
    "Warmup": (pb.WarmupRequest, _warmup),
    "Prefill": (pb.PrefillRequest, _prefill),
    "Decode": (pb.DecodeRequest, _decode),
    "ClearCache": (pb.ClearCacheRequest, _clear),
}


def follow_step(engine: Engine, method: str, payload: bytes) -> None:
    """A follower runs one relayed call; rank 0 answered the router's own mistakes and went on."""
    request_type, work = MODEL_WORK[method]
    try:
        work(engine, request_type.FromString(payload))
    except (UnknownBatchError, UnknownRequestError, ValueError) as e:
        log.debug("%s refused, as on rank 0: %s", method, e)


class ShardService(pb_grpc.TextGenerationServiceServicer):
    def __init__(
        self,
        engine: Engine,
        world_size: int,
        relay: Relay | None = None,
        model_thread: ThreadPoolExecutor | None = None,
    ) -> None:
        """``model_thread``: the one thread that runs every torch operation of this process (see
        ``serve``); a new one when not given."""
        self.engine = engine
        self.world_size = world_size
        self.relay = relay
        self._worker = model_thread or ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def _run(self, context: grpc.aio.ServicerContext, method: str, request: object) -> T:
        """Runs model work on the worker thread (relayed first to the other ranks); maps failures to
        gRPC status codes."""
        relay = self.relay
        if relay is not None and not relay.leader:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"rank {relay.rank} follows rank 0")
        work = MODEL_WORK[method][1]

        def job() -> T:
            if relay is not None:
                relay.send(method, request.SerializeToString())
            return work(self.engine, request)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._worker, job)
        except (UnknownBatchError, UnknownRequestError) as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except PeerLostError as e:
            log.critical("Lost rank %d, the shard exits: %s", e.rank, e.cause)
            asyncio.get_running_loop().call_later(0.2, os._exit, 1)
            await context.abort(grpc.StatusCode.INTERNAL, str(e))
        except Exception as e:
            # With several ranks, a rank that failed mid-step may have skipped a collective the others
            # wait in: the group cannot be trusted any more, so every failure is fatal there.
            if is_fatal(e) or self.world_size > 1:
                # The device cannot be trusted after this: fail the step, then exit so that the launcher
                # takes the server down (a restart is the only recovery).
                log.critical("Unrecoverable device error, the shard exits: %s", e)
                asyncio.get_running_loop().call_later(0.2, os._exit, 1)
            else:
                log.exception("Step failed")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}")
        raise AssertionError("unreachable")

    def _cache_stats(self) -> pb.CacheStats | None:
        stats = self.engine.stats()
        return None if stats is None else pb.CacheStats(**stats)

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        processors = getattr(self.engine, "processors", None)
        names = processors.names if processors is not None else []
        chunked = getattr(self.engine, "chunked_prefill", False)
        return info_to_pb(self.engine.backend.info, self.world_size, names, chunked)

    async def Health(self, request: pb.HealthRequest, context: grpc.aio.ServicerContext) -> pb.HealthResponse:
        return pb.HealthResponse()

    async def Warmup(self, request: pb.WarmupRequest, context: grpc.aio.ServicerContext) -> pb.WarmupResponse:
        return pb.WarmupResponse(max_supported_total_tokens=await self._run(context, "Warmup", request))

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> pb.PrefillResponse:
        start = time.perf_counter_ns()
        batch = request.batch
        result = await self._run(context, "Prefill", request)
        total = time.perf_counter_ns() - start
        kept = self.engine.cached(batch.id)
        cached = pb.CachedBatch(
            id=batch.id, request_ids=kept.request_ids if kept else [], max_tokens=batch.max_tokens
        )
        return pb.PrefillResponse(
            generations=generations_to_pb(result), batch=cached, total_ns=total, cache=self._cache_stats()
        )

    async def Decode(self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext) -> pb.DecodeResponse:
        start = time.perf_counter_ns()
        result, batch = await self._run(context, "Decode", request)
        total = time.perf_counter_ns() - start
        response = pb.DecodeResponse(
            generations=generations_to_pb(result), total_ns=total, cache=self._cache_stats()
        )
        if batch is not None:
            response.batch.CopyFrom(
                pb.CachedBatch(id=batch.id, request_ids=batch.request_ids, max_tokens=batch.max_tokens)
            )
        return response

    async def DecodeStream(
        self, requests: AsyncIterator[pb.DecodeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DecodeResponse]:
        async for request in requests:
            yield await self.Decode(request, context)

    async def ClearCache(
        self, request: pb.ClearCacheRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClearCacheResponse:
        await self._run(context, "ClearCache", request)
        return pb.ClearCacheResponse()


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
    engine = await loop.run_in_executor(model_thread, _load_engine, config, device, parallel)
    if relay is not None:  # rank 0 answers only once every rank has loaded the model
        relay.wait_followers() if relay.leader else relay.ready()
    service = ShardService(engine, config.world_size, relay, model_thread)
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
    heartbeat = None
    if relay is not None and relay.leader:
        heartbeat = asyncio.create_task(_heartbeat(service, relay))
    elif relay is not None:
        model_thread.submit(_follow, engine, relay, loop, stop)
    try:
        await stop.wait()
        log.info("Shard %d stopping", config.rank)
        if relay is not None:
            relay.stopping = True
        if heartbeat is not None:
            heartbeat.cancel()
        await server.stop(grace=1.0)
        if relay is not None and relay.leader:
            await loop.run_in_executor(service._worker, relay.stop)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if relay is not None:  # no torch.distributed teardown: a follower's thread may still wait in a receive
        logging.shutdown()
        os._exit(0)


def _load_engine(config: ShardConfig, device: torch.device, parallel: Parallel) -> Engine:
    """Loads the backend and the logits processors and builds the engine (on the model thread)."""
    started = time.perf_counter()
    backend = load_backend(config, device, parallel)
    log.info("Model ready in %.1f s", time.perf_counter() - started)
    if config.fault_injection:
        log.warning("Fault injection is on: requests can make this shard fail (tests only)")
    processors = None
    if getattr(backend, "make_engine", None) is not None:  # a backend with its own engine runs none
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
    return make_engine(backend, Faults(config.fault_injection), processors)


def _lost(error: PeerLostError) -> None:
    log.critical("Lost rank %d, the shard exits: %s", error.rank, error.cause)
    logging.shutdown()
    os._exit(1)


async def _heartbeat(service: ShardService, relay: Relay) -> None:
    """Rank 0 pings the followers between steps: a rank that died or hangs takes the server down."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(HEARTBEAT_S)
        try:
            await loop.run_in_executor(service._worker, relay.ping)
        except PeerLostError as e:
            if not relay.stopping:
                _lost(e)


def _follow(engine: Engine, relay: Relay, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """A follower's model thread: rank 0's calls, in its order, until it says stop (then exit 0)."""
    try:
        relay.follow(lambda method, payload: follow_step(engine, method, payload))
    except PeerLostError as e:
        if not relay.stopping:
            _lost(e)
        return
    except BaseException:
        log.critical("A relayed step failed, the shard exits", exc_info=True)
        os._exit(1)
    loop.call_soon_threadsafe(stop.set)
