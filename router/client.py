"""gRPC client of the shards. The router passes rank 0's socket only: rank 0 relays model work to the
other ranks (shard/relay.py). Given several sockets, every call goes to each and the first answer is used."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from proto import pb, pb_grpc

T = TypeVar("T")

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]


class ShardClient:
    """One channel per shard socket; methods mirror the shard service."""

    def __init__(self, sockets: list[str]) -> None:
        self.sockets = sockets
        self._channels = [grpc.aio.insecure_channel(f"unix://{s}", options=GRPC_OPTIONS) for s in sockets]
        self._stubs = [pb_grpc.TextGenerationServiceStub(c) for c in self._channels]

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels))

    async def _all(self, call: Callable[[pb_grpc.TextGenerationServiceStub], Awaitable[T]]) -> T:
        if len(self._stubs) == 1:  # the router's case: no gather (a task per call) on the per-step path
            return await call(self._stubs[0])
        results = await asyncio.gather(*(call(stub) for stub in self._stubs))
        return results[0]

    async def info(self) -> pb.InfoResponse:
        return await self._all(lambda s: s.Info(pb.InfoRequest()))

    async def health(self, timeout: float | None = None) -> None:
        await self._all(lambda s: s.Health(pb.HealthRequest(), timeout=timeout))

    async def warmup(self, batch: pb.Batch) -> int | None:
        response = await self._all(lambda s: s.Warmup(pb.WarmupRequest(batch=batch)))
        return response.max_supported_total_tokens or None

    async def prefill(self, batch: pb.Batch) -> pb.PrefillResponse:
        return await self._all(lambda s: s.Prefill(pb.PrefillRequest(batch=batch)))

    async def decode(self, batches: list[pb.CachedBatch]) -> pb.DecodeResponse:
        return await self.start_decode(batches)

    def start_decode(self, batches: list[pb.CachedBatch]) -> Awaitable[pb.DecodeResponse]:
        """Starts a Decode call now (gRPC's task for it sends the request at the loop's next turn, without
        waiting for the caller to await it); returns what to await for its answer."""
        request = pb.DecodeRequest(batches=batches)
        calls = [stub.Decode(request) for stub in self._stubs]
        if len(calls) == 1:
            return calls[0]
        return _first(asyncio.gather(*calls))

    async def clear_cache(self, batch_id: int | None = None) -> None:
        request = pb.ClearCacheRequest() if batch_id is None else pb.ClearCacheRequest(id=batch_id)
        await self._all(lambda s: s.ClearCache(request))

    async def wait_ready(self, timeout: float) -> None:
        """Waits until every shard answers Health (used at start-up)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await self.health(timeout=2.0)
                return
            except grpc.aio.AioRpcError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)


async def _first(results: Awaitable[list[T]]) -> T:
    return (await results)[0]
