"""The batching loop against the fake shard, in one process: lengths, stop strings, joins, and that the
shard is always told to drop what finished (no KV left behind)."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import grpc
import pytest

from proto import pb_grpc
from router.client import ShardClient
from router.config import RouterConfig
from router.infer import Infer
from router.tokenizer import Tokenizer
from router.validation import parse_parameters
from tests.fake_shard import FakeShard

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def setup(tiny_model_dir: Path):
    socket_prefix = f"/tmp/tgi-batcher-{uuid.uuid4().hex[:8]}"
    tokenizer = Tokenizer(tiny_model_dir)
    # the fake shard's tokens must exist in the tiny vocabulary: use plain word pieces of it
    tokens = tuple(tokenizer.encode(" the capital of France is Paris"))
    shard = FakeShard(len(tokenizer.hf), tokens)
    server = grpc.aio.server()
    pb_grpc.add_TextGenerationServiceServicer_to_server(shard, server)
    server.add_insecure_port(f"unix://{socket_prefix}-0")
    await server.start()
    config = RouterConfig(
        tokenizer_name=str(tiny_model_dir),
        model_id="tiny",
        shard_uds_path=socket_prefix,
        max_waiting_tokens=2,
    )
    client = ShardClient(config.shard_socket())
    infer = Infer(config, client, tokenizer, await client.info())
    await infer.start()
    try:
        yield infer, shard, tokenizer
    finally:
        await infer.stop()
        await client.close()
        await server.stop(None)
        Path(f"{socket_prefix}-0").unlink(missing_ok=True)


async def generate(infer: Infer, inputs: str, **parameters: object):
    valid = await infer.validator.validate(inputs, parse_parameters(parameters), stream=False)
    async with infer.request(valid) as entry:
        return await infer.generate(entry)


async def settle(shard: FakeShard, timeout_s: float = 10.0) -> None:
    """Waits until the shard holds no batch (the router drops a finished one after its last step)."""
    deadline = time.monotonic() + timeout_s
    while shard.batches:
        assert time.monotonic() < deadline, f"batches left on the shard: {shard.batches}"
        await asyncio.sleep(0.01)


async def test_lengths_and_no_leftover_batches(setup) -> None:
    infer, shard, _ = setup
    lengths = [1, 2, 5, 9, 1, 17, 3, 30]
    results = await asyncio.gather(*(generate(infer, "Hello", max_new_tokens=n) for n in lengths))
    assert [r.generated_tokens for r in results] == lengths
    assert all(r.finish_reason == "length" for r in results)
    await settle(shard)
    assert shard.batches == {}  # every finished request's batch was dropped on the shard


async def test_stop_string_ends_a_request_and_its_batch(setup) -> None:
    infer, shard, _ = setup
    result = await generate(infer, "Hello", max_new_tokens=50, stop=["France"])
    assert result.finish_reason == "stop_sequence"
    assert result.generated_text.endswith("France") and result.generated_text.count("France") == 1
    await settle(shard)
    assert shard.batches == {}


async def test_requests_join_a_running_batch(setup) -> None:
    infer, shard, _ = setup
    shard.step_s = 0.001  # the long request lasts over 2 s, whatever the machine's speed
    long = asyncio.ensure_future(generate(infer, "Hello", max_new_tokens=2000))
    while not infer.batcher.running:
        await asyncio.sleep(0.001)
    short = await generate(infer, "Hi", max_new_tokens=3)
    assert short.generated_tokens == 3 and not long.done()
    assert (await long).generated_tokens == 2000
    assert shard.prefills == 2  # the second request was prefilled on its own and joined
    await settle(shard)
    assert shard.batches == {}


async def test_cancelled_request_leaves(setup) -> None:
    infer, shard, _ = setup
    valid = await infer.validator.validate("Hello", parse_parameters({"max_new_tokens": 1000}), stream=True)
    async with infer.request(valid) as entry:
        async for _ in infer.stream(entry):
            break  # the client goes away after one token
    deadline = time.monotonic() + 10
    while infer.batcher.running and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert infer.batcher.running == {}
    await settle(shard)
    assert shard.batches == {}


async def test_a_fault_of_the_loop_fails_its_requests_and_the_loop_goes_on(setup, monkeypatch) -> None:
    infer, _, _ = setup
    import router.batcher as batcher_module
    from router.errors import GenerationError

    real = batcher_module.request_to_pb

    def broken(entry):
        raise RuntimeError("a bug while building the request")

    monkeypatch.setattr(batcher_module, "request_to_pb", broken)
    with pytest.raises(GenerationError):
        await generate(infer, "Hello", max_new_tokens=5)
    monkeypatch.setattr(batcher_module, "request_to_pb", real)
    assert not infer.batcher.running
    result = await generate(infer, "Hello", max_new_tokens=5)  # the loop still serves
    assert result.generated_tokens == 5


@pytest.mark.parametrize("every_step", [False, True])
async def test_a_chunked_prefill_shard_takes_waiting_requests_at_every_step(setup, every_step: bool) -> None:
    """With TGI's rule a lone waiting request beside one running waits max_waiting_tokens steps (here:
    longer than the running request lives); a shard that runs prompts in chunks takes it at once."""
    import dataclasses

    infer, shard, _ = setup
    batcher = infer.batcher
    batcher.config = dataclasses.replace(batcher.config, max_waiting_tokens=10**6, waiting_served_ratio=100.0)
    batcher.join_every_step = every_step
    shard.step_s = 0.002  # the long request lasts over 0.8 s, whatever the machine's speed
    long = asyncio.ensure_future(generate(infer, "Hello", max_new_tokens=400))
    while not batcher.running:
        await asyncio.sleep(0.001)
    short = await generate(infer, "Hi", max_new_tokens=3)
    assert short.generated_tokens == 3
    assert long.done() is not every_step  # it joined the running batch, or waited for it to end
    assert (await long).generated_tokens == 400
    await settle(shard)
    assert shard.batches == {}


def test_the_router_follows_the_shards_chunked_prefill(tiny_model_dir: Path) -> None:
    from proto import pb
    from shard.chunked import ChunkedEngine
    from shard.engine import Engine

    assert ChunkedEngine.chunked_prefill and not Engine.chunked_prefill  # what the shard's Info reports
    tokenizer = Tokenizer(tiny_model_dir)
    config = RouterConfig(tokenizer_name=str(tiny_model_dir), model_id="tiny", shard_uds_path="/tmp/unused")
    for flag in (False, True):
        info = pb.InfoResponse(
            requires_padding=False, dtype="float32", device_type="cpu", world_size=1, backend="fake",
            vocab_size=len(tokenizer.hf), chunked_prefill=flag,
        )  # fmt: skip
        assert Infer(config, None, tokenizer, info).batcher.join_every_step is flag
