"""The router's end of the Generate stream (router/engine_client.py), through ``Infer``, against the fake
shard (a real gRPC server on a Unix socket) in this process: tokens, endings, aborts, failures, a broken
stream, and the liveness probe."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from pathlib import Path

import grpc
import pytest

from proto import pb, pb_grpc
from router.client import ShardClient
from router.config import RouterConfig
from router.errors import GenerationError
from router.infer import Infer
from router.tokenizer import Tokenizer
from router.tracing import RouterTracer
from router.validation import parse_parameters
from tests.fake_shard import PROMPT_LOGPROB, TOKEN_LOGPROB, FakeShard

pytestmark = pytest.mark.timeout(60)


async def start(tiny_model_dir: Path, tracer: RouterTracer | None = None, **shard_options: object):
    """The fake shard on a fresh socket and a started ``Infer`` in front of it (faults honoured), tracing
    with ``tracer`` when given."""
    socket_prefix = f"/tmp/tgi-engine-{uuid.uuid4().hex[:8]}"
    tokenizer = Tokenizer(tiny_model_dir)
    # the fake shard's tokens must exist in the tiny vocabulary: use plain word pieces of it
    tokens = tuple(tokenizer.encode(" the capital of France is Paris"))
    shard = FakeShard(len(tokenizer.hf), tokens, **shard_options)
    server = grpc.aio.server()
    pb_grpc.add_TextGenerationServiceServicer_to_server(shard, server)
    server.add_insecure_port(f"unix://{socket_prefix}-0")
    await server.start()
    config = RouterConfig(
        tokenizer_name=str(tiny_model_dir),
        model_id="tiny",
        shard_uds_path=socket_prefix,
        fault_injection=True,
    )
    client = ShardClient(config.shard_socket())
    infer = Infer(config, client, tokenizer, await client.info(), tracer)
    await infer.start()

    async def close() -> None:
        await infer.stop()
        await client.close()
        await server.stop(None)
        Path(f"{socket_prefix}-0").unlink(missing_ok=True)

    return infer, shard, close


@pytest.fixture
async def setup(tiny_model_dir: Path):
    infer, shard, close = await start(tiny_model_dir)
    try:
        yield infer, shard
    finally:
        await close()


async def validate(infer: Infer, inputs: str, stream: bool = False, **parameters: object):
    return await infer.validator.validate(inputs, parse_parameters(parameters), stream=stream)


async def generate(infer: Infer, inputs: str, **parameters: object):
    async with infer.request(await validate(infer, inputs, **parameters)) as entry:
        return await infer.generate(entry)


async def until(condition, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


async def settle(infer: Infer, shard: FakeShard) -> None:
    """Waits until neither side holds a request."""
    await until(lambda: not shard.live and not infer.engine.running, "no live request")


def cycle(shard: FakeShard, n: int) -> list[int]:
    return [shard.tokens[i % len(shard.tokens)] for i in range(n)]


async def test_tokens_stream_in_order_and_requests_end_by_length(setup) -> None:
    infer, shard = setup
    lengths = [1, 2, 5, 9, 1, 17, 3, 30]
    results = await asyncio.gather(*(generate(infer, "Hello", max_new_tokens=n) for n in lengths))
    assert [r.generated_tokens for r in results] == lengths
    assert all(r.finish_reason == "length" for r in results)
    for result, n in zip(results, lengths, strict=True):
        assert [t.id for t in result.tokens] == cycle(shard, n)
        assert all(t.logprob == TOKEN_LOGPROB for t in result.tokens)
    await settle(infer, shard)
    assert shard.aborted == []  # the shard ended every one itself: nothing to abort
    assert len(shard.added) == len(lengths) and shard.streams == 1


async def test_a_stream_gets_every_token_as_an_event_then_the_last(setup) -> None:
    infer, shard = setup
    async with infer.request(await validate(infer, "Hello", stream=True, max_new_tokens=12)) as entry:
        events = [event async for event in infer.stream(entry)]
    assert [e.token.id for e in events] == cycle(shard, 12)
    assert [e.finished is None for e in events] == [True] * 11 + [False]
    assert "".join(e.delta for e in events) == events[-1].finished.generated_text
    assert events[-1].finished.finish_reason == "length"


async def test_a_stop_string_ends_the_request_and_aborts_it_on_the_shard(setup) -> None:
    infer, shard = setup
    shard.step_s = 0.01  # the shard would run it 10 s: it is the abort that ends it there
    async with infer.request(await validate(infer, "Hello", max_new_tokens=1000, stop=["France"])) as entry:
        result = await infer.generate(entry)
    assert result.finish_reason == "stop_sequence"
    assert result.generated_text.endswith("France") and result.generated_text.count("France") == 1
    await settle(infer, shard)
    assert shard.aborted == [entry.id] and shard.tokens_generated < 200


@pytest.mark.parametrize("stream", [False, True])
async def test_several_tokens_of_a_request_in_one_step_arrive_in_order(setup, stream: bool) -> None:
    """A speculating shard sends a request several rows per step: each is its own token, in order, with
    its text, top tokens and the end where it comes, as if they had come one step each."""
    infer, shard = setup
    shard.tokens_per_step = 3
    # Characters of several tokens each: their text is decoded in context, a step's rows one by one.
    shard.tokens = tuple(infer.tokenizer.encode(" naïve café ☕ 東京 is"))
    lengths = [1, 4, 7, 12]
    params = {"max_new_tokens": 0, "top_n_tokens": 2, "details": True, "stop": ["never said"]}
    entries = []
    for n in lengths:
        params["max_new_tokens"] = n
        entries.append(await validate(infer, "Hello", stream=stream, **params))

    async def run(validated):
        async with infer.request(validated) as entry:
            if not stream:
                return await infer.generate(entry)
            return [event async for event in infer.stream(entry)]

    results = await asyncio.gather(*(run(v) for v in entries))
    for result, n in zip(results, lengths, strict=True):
        if stream:
            assert [e.token.id for e in result] == cycle(shard, n)
            assert [e.top_tokens[0].id for e in result] == cycle(shard, n)
            assert "".join(e.delta for e in result) == result[-1].finished.generated_text
            assert [e.finished is None for e in result] == [True] * (n - 1) + [False]
        else:
            assert [t.id for t in result.tokens] == cycle(shard, n)
            assert result.finish_reason == "length"
            assert result.generated_text == infer.tokenizer.decode(cycle(shard, n))
    assert shard.steps < sum(lengths)


async def test_a_cancelled_entry_is_aborted(setup) -> None:
    infer, shard = setup
    shard.step_s = 0.01
    async with infer.request(await validate(infer, "Hello", stream=True, max_new_tokens=1000)) as entry:
        async for _ in infer.stream(entry):
            break  # the client goes away after one token
    assert entry.cancelled and entry.id not in infer.engine.running
    await settle(infer, shard)
    assert shard.aborted == [entry.id] and shard.tokens_generated < 200


async def test_the_shards_end_of_sequence_and_stop_token_ids_end_requests(tiny_model_dir: Path) -> None:
    tokenizer = Tokenizer(tiny_model_dir)
    eos = tokenizer.encode(" the capital of France is Paris")[2]
    infer, shard, close = await start(tiny_model_dir, eos_token_ids=(eos,))
    try:
        result = await generate(infer, "Hello", max_new_tokens=50)
        assert result.finish_reason == "eos_token" and result.generated_tokens == 3
        assert result.tokens[-1].id == eos
        result = await generate(infer, "Hello", max_new_tokens=50, ignore_eos_token=True)
        assert result.finish_reason == "length" and result.generated_tokens == 50
        await settle(infer, shard)
        assert shard.aborted == []
    finally:
        await close()


async def test_prompt_logprobs_and_top_tokens_reach_their_request(setup) -> None:
    infer, shard = setup
    valid = await validate(infer, "Hello world", decoder_input_details=True, top_n_tokens=2, max_new_tokens=4)
    plain = asyncio.ensure_future(generate(infer, "Hi", max_new_tokens=4))  # shares the steps
    async with infer.request(valid) as entry:
        result = await infer.generate(entry)
    assert [t.id for t in result.prefill] == valid.input_ids
    assert result.prefill[0].logprob is None
    assert all(t.logprob == PROMPT_LOGPROB for t in result.prefill[1:])
    assert [[t.id for t in top] for top in result.top_tokens] == [cycle(shard, i + 2)[i:] for i in range(4)]
    assert (await plain).top_tokens == [] and (await plain).generated_tokens == 4


async def test_a_request_that_fails_alone_gets_its_error_and_the_others_go_on(setup) -> None:
    infer, shard = setup
    shard.step_s = 0.002
    others = [asyncio.ensure_future(generate(infer, "Hello", max_new_tokens=20)) for _ in range(3)]
    with pytest.raises(GenerationError, match="non-finite logits"):
        await generate(infer, "Hello", max_new_tokens=20, fault="nan")
    assert [r.generated_tokens for r in await asyncio.gather(*others)] == [20, 20, 20]
    assert infer.engine.generation_health  # one request's failure says nothing of the shard
    assert infer.metrics.request_failure.labels("generation")._value.get() == 1
    await settle(infer, shard)


async def fails_with_a_running_request(infer: Infer, shard: FakeShard, fault: str, message: str) -> None:
    """A request with ``fault`` fails with ``message``, and so does a long one that was running (it was in
    the step too)."""
    shard.step_s = 0.002
    running = asyncio.ensure_future(generate(infer, "Hello", max_new_tokens=1000))
    await until(lambda: shard.tokens_generated > 0, "a first token")
    with pytest.raises(GenerationError, match=message):
        await generate(infer, "Hello", max_new_tokens=5, fault=fault)
    with pytest.raises(GenerationError, match=message):
        await running


async def test_a_failed_step_fails_its_requests_and_a_probe_restores_health(setup) -> None:
    infer, shard = setup
    await fails_with_a_running_request(infer, shard, "step", "the step failed")
    assert not infer.engine.generation_health
    steps = shard.steps
    assert await infer.healthy()  # a one-token request ran
    assert infer.engine.generation_health and shard.steps > steps
    assert (await generate(infer, "Hello", max_new_tokens=3)).generated_tokens == 3


async def test_the_probe_resolves_true_after_a_real_run_and_false_when_its_step_fails(setup) -> None:
    infer, shard = setup
    ran = infer.engine.probe(pb.Request(id=10_001, input_ids=[1, 2], max_new_tokens=1))
    assert await asyncio.wait_for(ran, 10) is True
    assert shard.added[-1] == 10_001 and shard.tokens_generated == 1
    failed = infer.engine.probe(pb.Request(id=10_002, input_ids=[1, 2], max_new_tokens=1, fault="step"))
    assert await asyncio.wait_for(failed, 10) is False
    assert infer.engine._probes == {}


async def test_a_broken_stream_fails_its_requests_and_the_next_stream_serves(setup) -> None:
    infer, shard = setup
    await fails_with_a_running_request(infer, shard, "fatal", "stream broke")
    assert infer.engine.running == {} and not infer.engine.generation_health
    # Requests that come while the router waits to open the stream again are sent on the new one.
    result = await asyncio.wait_for(generate(infer, "Hello", max_new_tokens=4), 10)
    assert result.generated_tokens == 4 and shard.streams == 2
    assert await infer.healthy()


async def test_a_fault_of_the_loop_itself_fails_its_requests_and_the_loop_goes_on(setup, monkeypatch) -> None:
    infer, shard = setup
    engine = infer.engine
    real = engine._deliver

    def broken(generations: pb.Generations) -> None:
        monkeypatch.setattr(engine, "_deliver", real)  # once
        raise RuntimeError("a bug while delivering")

    monkeypatch.setattr(engine, "_deliver", broken)
    with pytest.raises(GenerationError):
        await generate(infer, "Hello", max_new_tokens=5)
    assert engine.running == {}
    result = await asyncio.wait_for(generate(infer, "Hello", max_new_tokens=5), 10)
    assert result.generated_tokens == 5 and shard.streams == 2


async def test_steps_update_the_queue_metrics(setup) -> None:
    infer, shard = setup
    await asyncio.gather(*(generate(infer, "Hello", max_new_tokens=8) for _ in range(4)))
    m = infer.metrics
    steps = (
        m.batch_inference_count.labels("prefill")._value.get()
        + m.batch_inference_count.labels("decode")._value.get()
    )
    assert steps == shard.steps and m.batch_inference_success.labels("decode")._value.get() > 0
    assert not math.isnan(m.batch_current_size._value.get())
