"""router/entry.py: a request's entry and the channel of its events (a listener, or the consumer's task)."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from common.params import SamplingParams
from router.entry import Entry, EventChannel
from router.errors import GenerationError
from router.generation import Finished, GenerationState, StreamEvent, Token
from router.tokenizer import Tokenizer
from router.validation import ValidRequest

pytestmark = pytest.mark.timeout(60)

_ids = itertools.count()


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_model_dir)


@pytest.fixture
def make(tokenizer: Tokenizer):
    def make_entry(prompt: int, new: int = 10, cancelled: bool = False) -> Entry:
        request = ValidRequest(
            inputs="x" * prompt,
            input_ids=list(range(3, 3 + prompt)),
            parameters=SamplingParams(),
            max_new_tokens=new,
            stop=[],
            details=False,
            decoder_input_details=False,
            top_n_tokens=0,
            return_full_text=False,
            seed=None,
        )
        state = GenerationState(request, tokenizer, frozenset({tokenizer.eos_token_id}))
        entry = Entry(id=next(_ids), request=request, state=state)
        entry.cancelled = cancelled
        return entry

    return make_entry


def test_entry_cost_and_defaults(make) -> None:
    entry = make(7, 13)
    assert entry.cost() == (7, 13)
    assert entry.request.input_length == 7
    assert not entry.cancelled and not entry.done
    assert entry.batched_at is None
    assert isinstance(entry.events, EventChannel) and entry.events.empty()
    assert entry != make(7, 13)  # identity, not value, equality


async def waiting(channel: EventChannel) -> asyncio.Task[None]:
    """A consumer task that waits on ``channel`` (started: it waits before the caller puts anything)."""
    task = asyncio.create_task(channel.wait())
    await asyncio.sleep(0)
    return task


async def test_a_listener_hears_of_plain_tokens_and_the_task_of_the_rest() -> None:
    """Without a listener every item wakes the consumer's task. With one, a plain token event only calls
    the listener, once per empty -> non-empty; the last event and an error wake the task at once."""
    plain = StreamEvent(Token(5, "hi", -0.5, False), "hi")
    final = StreamEvent(plain.token, "hi", finished=Finished("hi", "length", 1, None, [], [], []))
    channel = EventChannel()
    waiter = await waiting(channel)
    channel.put(plain)
    await asyncio.sleep(0)
    assert waiter.done() and channel.take_all() == [plain]

    heard: list[int] = []
    channel.listener = lambda: heard.append(len(channel.items))
    waiter = await waiting(channel)
    channel.put(plain)
    channel.put(plain)
    await asyncio.sleep(0)
    assert heard == [1] and not waiter.done()
    channel.items.clear()  # the listener's owner took them
    channel.put(plain)
    assert heard == [1, 1]
    for last in (final, GenerationError("boom")):
        channel.put(last)
        await asyncio.sleep(0)
        assert waiter.done() and heard == [1, 1]
        assert channel.take_all()[-1] is last
        waiter = await waiting(channel)
    channel.wake()
    await asyncio.sleep(0)
    assert not waiter.done()  # wake() only wakes a task that has something to take
    channel.put(final)
    await waiter
