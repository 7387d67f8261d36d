"""The shard's gRPC service and the router's client, over a real Unix socket, in one process."""

from __future__ import annotations

import uuid
from pathlib import Path

import grpc
import pytest
import torch

from proto import pb, pb_grpc
from router.client import ShardClient
from shard.backends.hf import HFBackend
from shard.engine import Engine
from shard.server import ShardService

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def client(tiny_model_dir: Path):
    socket = f"/tmp/tgi-unit-{uuid.uuid4().hex[:8]}-0"
    server = grpc.aio.server()
    backend = HFBackend(tiny_model_dir, torch.device("cpu"))
    pb_grpc.add_TextGenerationServiceServicer_to_server(ShardService(Engine(backend), 1), server)
    server.add_insecure_port(f"unix://{socket}")
    await server.start()
    shard_client = ShardClient(socket)
    try:
        yield shard_client
    finally:
        await shard_client.close()
        await server.stop(None)
        Path(socket).unlink(missing_ok=True)


def request(rid: int, ids: list[int], **kwargs: object) -> pb.Request:
    return pb.Request(id=rid, input_ids=ids, max_new_tokens=8, **kwargs)


async def test_info_health_warmup(client: ShardClient) -> None:
    info = await client.info()
    assert info.requires_padding and info.dtype == "float32" and info.device_type == "cpu"
    assert info.backend == "transformers" and list(info.eos_token_ids) and info.vocab_size > 0
    await client.health(timeout=5)
    params = pb.NextTokenChooserParameters(
        temperature=0.9, top_k=10, top_p=0.9, typical_p=0.9, do_sample=True
    )
    batch = pb.Batch(id=1, requests=[request(1, [5, 6, 7], parameters=params, prefill_logprobs=True)])
    assert await client.warmup(batch) is None


async def test_prefill_decode_filter_clear(client: ShardClient) -> None:
    batch = pb.Batch(
        id=3, requests=[request(1, [5, 6, 7], top_n_tokens=2), request(2, [8, 9], prefill_logprobs=True)]
    )
    response = await client.prefill(batch)
    g = response.generations
    assert list(g.request_ids) == [1, 2] and len(g.token_ids) == 2 and g.top_n == 2
    assert len(g.top_ids) == 4
    assert [p.request_id for p in g.prefill] == [2] and list(g.prefill[0].ids) == [8, 9]
    assert list(response.batch.request_ids) == [1, 2]

    decoded = await client.decode([pb.CachedBatch(id=3, request_ids=[2])])
    assert list(decoded.generations.request_ids) == [2]
    assert list(decoded.batch.request_ids) == [2]

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.decode([pb.CachedBatch(id=99, request_ids=[1])])
    assert error.value.code() == grpc.StatusCode.NOT_FOUND

    await client.clear_cache(3)
    with pytest.raises(grpc.aio.AioRpcError):
        await client.decode([pb.CachedBatch(id=3, request_ids=[2])])


async def test_decode_steps_share_one_stream_until_one_fails(client: ShardClient) -> None:
    response = await client.prefill(pb.Batch(id=7, requests=[request(1, [5, 6, 7])]))
    stream = client._stream
    first = await client.decode([response.batch])
    call = stream._call
    assert call is not None and list(first.generations.request_ids) == [1]
    second = await client.decode([first.batch])
    assert stream._call is call and list(second.generations.request_ids) == [1]

    with pytest.raises(grpc.aio.AioRpcError) as error:  # the failed step ends the stream ...
        await client.decode([pb.CachedBatch(id=99, request_ids=[1])])
    assert error.value.code() == grpc.StatusCode.NOT_FOUND and stream._call is None
    third = await client.decode([second.batch])  # ... and the next step opens a new one
    assert stream._call not in (None, call) and list(third.generations.request_ids) == [1]
    assert len(first.generations.token_ids) == len(third.generations.token_ids) == 1


async def test_empty_prefill_is_invalid(client: ShardClient) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await client.prefill(pb.Batch(id=5))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
