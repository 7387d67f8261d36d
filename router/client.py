"""gRPC client of the shards: rank 0's socket only, since rank 0 relays model work to the other ranks
(shard/relay.py). Besides the unary calls (Info, Health, Warmup) it opens the shard's one ``Generate``
stream, over which the router sends requests and aborts and receives every step's output."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

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

    async def close(self) -> None:
        await self._channel.close()

    async def info(self) -> pb.InfoResponse:
        return await self._stub.Info(pb.InfoRequest())

    async def health(self, timeout: float | None = None) -> None:
        await self._stub.Health(pb.HealthRequest(), timeout=timeout)

    async def warmup(
        self, batch: pb.Batch, eos_token_ids: list[int], metadata: Sequence[tuple[str, str]] | None = None
    ) -> int | None:
        """``metadata``: the W3C trace context of the router's warm-up span, when it traces."""
        request = pb.WarmupRequest(batch=batch, eos_token_ids=eos_token_ids)
        response = await self._stub.Warmup(request, metadata=metadata)
        return response.max_supported_total_tokens or None

    async def update_lora(self, name: str, path: str, unload: bool) -> list[str]:
        """Loads (``path``) or unloads a LoRA adapter on every rank; the adapters loaded after."""
        response = await self._stub.UpdateLora(pb.LoraUpdateRequest(name=name, path=path, unload=unload))
        return list(response.lora_adapters)

    def generate(self) -> grpc.aio.StreamStreamCall:
        """Opens the Generate stream: ``write`` GenerateRequests, ``read`` StepOutputs."""
        return self._stub.Generate()

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
