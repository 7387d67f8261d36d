"""The shard's gRPC service and the router's client, over a real Unix socket, in one process."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import torch

from proto import pb, pb_grpc
from router.client import ShardClient
from shard.backends.hf import HFBackend
from shard.core import EngineCore
from shard.engine import Engine
from shard.server import ModelLoop, ShardService

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def served(tiny_model_dir: Path) -> AsyncIterator[tuple[ShardClient, EngineCore]]:
    socket = f"/tmp/tgi-unit-{uuid.uuid4().hex[:8]}-0"
    server = grpc.aio.server()
    core = EngineCore(Engine(HFBackend(tiny_model_dir, torch.device("cpu"))))
    model = ModelLoop(core, None, asyncio.get_running_loop())
    thread = threading.Thread(target=model.run, daemon=True)
    thread.start()
    pb_grpc.add_TextGenerationServiceServicer_to_server(ShardService(core, 1, model), server)
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    shard_client = ShardClient(socket)
    try:
        yield shard_client, core
    finally:
        await shard_client.close()
        await server.stop(None)
        model.stop()
        thread.join(10)
        Path(socket).unlink(missing_ok=True)


def request(rid: int, ids: list[int], **kwargs: object) -> pb.Request:
    kwargs.setdefault("max_new_tokens", 4)
    return pb.Request(id=rid, input_ids=ids, ignore_eos=True, **kwargs)  # type: ignore[arg-type]


async def collect(call: grpc.aio.StreamStreamCall, ids: set[int]) -> dict[int, list[tuple[int, int]]]:
    """Reads step outputs until every request in ``ids`` has ended: each one's (token, finish reason)."""
    out: dict[int, list[tuple[int, int]]] = {rid: [] for rid in ids}
    live = set(ids)
    while live:
        step = await asyncio.wait_for(call.read(), 30)
        g = step.generations
        for failure in g.failures:
            raise AssertionError(f"request {failure.request_id} failed: {failure.message}")
        for rid, token, reason in zip(g.request_ids, g.token_ids, g.finish_reasons, strict=True):
            if rid not in out:  # another request (an abort in flight reaches the shard between steps)
                continue
            out[rid].append((token, reason))
            if reason:
                live.discard(rid)
    return out


async def test_info_health_warmup(served: tuple[ShardClient, EngineCore]) -> None:
    client, core = served
    info = await client.info()
    assert info.requires_padding and info.dtype == "float32" and info.device_type == "cpu"
    assert info.backend == "transformers" and list(info.eos_token_ids) and info.vocab_size > 0
    await client.health(timeout=5)
    params = pb.NextTokenChooserParameters(
        temperature=0.9, top_k=10, top_p=0.9, typical_p=0.9, do_sample=True
    )
    batch = pb.Batch(id=1, requests=[request(1, [5, 6, 7], parameters=params, prefill_logprobs=True)])
    assert await client.warmup(batch, []) is None
    assert not core.has_work()


async def test_requests_stream_their_tokens_and_end_on_the_shard(
    served: tuple[ShardClient, EngineCore],
) -> None:
    client, core = served
    call = client.generate()
    await call.write(
        pb.GenerateRequest(add=[request(1, [5, 6, 7], top_n_tokens=2), request(2, [8, 9], max_new_tokens=2)])
    )
    out = await collect(call, {1, 2})
    assert [reason for _, reason in out[1]] == [0, 0, 0, pb.FINISH_LENGTH]
    assert [reason for _, reason in out[2]] == [0, pb.FINISH_LENGTH]
    assert not core.live
    call.cancel()


async def test_an_abort_ends_a_request_and_the_others_go_on(served: tuple[ShardClient, EngineCore]) -> None:
    client, core = served
    call = client.generate()
    await call.write(
        pb.GenerateRequest(add=[request(1, [5, 6], max_new_tokens=50), request(2, [7, 8], max_new_tokens=6)])
    )
    first = await asyncio.wait_for(call.read(), 30)
    assert set(first.generations.request_ids) == {1, 2}
    await call.write(pb.GenerateRequest(abort=[1]))
    out = await collect(call, {2})
    assert out[2][-1][1] == pb.FINISH_LENGTH
    assert 1 not in core.live
    call.cancel()


async def test_a_repeated_id_fails_alone_and_a_closed_stream_ends_its_requests(
    served: tuple[ShardClient, EngineCore],
) -> None:
    client, core = served
    call = client.generate()
    await call.write(pb.GenerateRequest(add=[request(1, [5, 6], max_new_tokens=500)]))
    await call.write(pb.GenerateRequest(add=[request(1, [5, 6])]))
    failures: list[pb.RequestFailure] = []
    while not failures:
        step = await asyncio.wait_for(call.read(), 30)
        failures = list(step.generations.failures)
    assert failures[0].request_id == 1 and "already running" in failures[0].message
    assert 1 in core.live  # the first one runs on
    call.cancel()
    for _ in range(100):
        if not core.live:
            break
        await asyncio.sleep(0.05)
    assert not core.live


async def test_one_stream_at_a_time(served: tuple[ShardClient, EngineCore]) -> None:
    client, _ = served
    first = client.generate()
    await first.write(pb.GenerateRequest(add=[request(1, [5, 6], max_new_tokens=2)]))
    await collect(first, {1})
    second = client.generate()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await asyncio.wait_for(second.read(), 30)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
    first.cancel()
