"""gRPC client of the shards: rank 0's socket only, since rank 0 relays model work to the other ranks
(shard/relay.py).

Decode steps go over one long-lived ``DecodeStream`` (a message on an open stream costs the client about
half of what a new unary call does); a failed step ends that stream and the next step opens a new one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import grpc

from proto import pb, pb_grpc

GRPC_OPTIONS = [
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
]


class ShardClient:
    """One channel to rank 0's socket; methods mirror the shard service."""

    def __init__(self, socket: str) -> None:
        self.socket = socket
        self._channel = grpc.aio.insecure_channel(f"unix://{socket}", options=GRPC_OPTIONS)
        self._stub = pb_grpc.TextGenerationServiceStub(self._channel)
        self._stream = DecodeStream(self._stub)

    async def close(self) -> None:
        self._stream.close()
        await self._channel.close()

    async def info(self) -> pb.InfoResponse:
        return await self._stub.Info(pb.InfoRequest())

    async def health(self, timeout: float | None = None) -> None:
        await self._stub.Health(pb.HealthRequest(), timeout=timeout)

    async def warmup(self, batch: pb.Batch) -> int | None:
        response = await self._stub.Warmup(pb.WarmupRequest(batch=batch))
        return response.max_supported_total_tokens or None

    async def prefill(self, batch: pb.Batch) -> pb.PrefillResponse:
        return await self._stub.Prefill(pb.PrefillRequest(batch=batch))

    async def decode(self, batches: list[pb.CachedBatch]) -> pb.DecodeResponse:
        return await self.start_decode(batches)

    def start_decode(self, batches: list[pb.CachedBatch]) -> Awaitable[pb.DecodeResponse]:
        """Starts a decode step now (the request goes out at the loop's next turn, without waiting for the
        caller to await it); returns what to await for its answer. One step at a time."""
        return self._stream.step(pb.DecodeRequest(batches=batches))

    async def clear_cache(self, batch_id: int | None = None) -> None:
        request = pb.ClearCacheRequest() if batch_id is None else pb.ClearCacheRequest(id=batch_id)
        await self._stub.ClearCache(request)

    async def wait_ready(self, timeout: float) -> None:
        """Waits until the shard answers Health (used at start-up)."""
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


class DecodeStream:
    """Decode steps over one ``DecodeStream`` call, opened on first use and again after a failure."""

    def __init__(self, stub: pb_grpc.TextGenerationServiceStub) -> None:
        self.stub = stub
        self._call: grpc.aio.StreamStreamCall | None = None

    def step(self, request: pb.DecodeRequest) -> asyncio.Task[pb.DecodeResponse]:
        """Sends ``request`` (from a task started now) and returns that task: the step's answer, or the
        ``grpc.aio.AioRpcError`` that ended the stream."""
        return asyncio.ensure_future(self._exchange(request))

    async def _exchange(self, request: pb.DecodeRequest) -> pb.DecodeResponse:
        call = self._call
        if call is None or call.done():
            call = self._call = self.stub.DecodeStream()
        try:
            await call.write(request)
            response = await call.read()
        except BaseException:  # a failed step, or a cancelled one: the stream's state is unknown
            self._drop(call)
            raise
        if response is grpc.aio.EOF:  # the shard ended the stream without a status error
            self._drop(call)
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(),
                details="the shard closed the decode stream",
            )
        return response

    def _drop(self, call: grpc.aio.StreamStreamCall) -> None:
        call.cancel()
        if self._call is call:
            self._call = None

    def close(self) -> None:
        if self._call is not None:
            self._drop(self._call)
