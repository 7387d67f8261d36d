"""router/queue.py: FIFO order, TGI's prefill and token budgets, min_size, cancellation, not_empty."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from pathlib import Path

import pytest

from common.params import SamplingParams
from router.generation import GenerationState
from router.queue import Entry, EventChannel, Queue
from router.tokenizer import Tokenizer
from router.validation import ValidRequest

pytestmark = pytest.mark.timeout(60)

BIG = 10**9
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


def fill(queue: Queue, entries: list[Entry]) -> list[Entry]:
    for e in entries:
        queue.append(e)
    return entries


def test_entry_cost_and_defaults(make) -> None:
    entry = make(7, 13)
    assert entry.cost() == (7, 13)
    assert entry.request.input_length == 7
    assert not entry.cancelled and not entry.done
    assert entry.batched_at is None
    assert isinstance(entry.events, EventChannel) and entry.events.empty()
    assert entry != make(7, 13)  # identity, not value, equality


@pytest.mark.parametrize("padding", [False, True])
def test_fifo_order(make, padding: bool) -> None:
    queue = Queue(requires_padding=padding)
    entries = fill(queue, [make(n) for n in (5, 3, 8, 1, 4)])
    assert len(queue) == 5
    assert queue.next_batch(None, BIG, BIG) == entries
    assert len(queue) == 0
    assert queue.next_batch(None, BIG, BIG) is None


def test_fifo_across_calls(make) -> None:
    queue = Queue(requires_padding=False)
    entries = fill(queue, [make(4) for _ in range(6)])
    assert queue.next_batch(None, 8, BIG) == entries[:2]
    assert queue.next_batch(None, 8, BIG) == entries[2:4]
    later = fill(queue, [make(4)])
    assert queue.next_batch(None, 12, BIG) == entries[4:] + later


def test_empty_queue(make) -> None:
    queue = Queue(requires_padding=False)
    assert queue.next_batch(None, BIG, BIG) is None
    assert queue.next_batch(1, BIG, BIG) is None
    assert not queue.not_empty.is_set()


# --------------------------------------------------------------------------------------------- budgets


def test_prefill_budget_unpadded_is_the_sum_of_prompts(make) -> None:
    queue = Queue(requires_padding=False)
    entries = fill(queue, [make(3, 1), make(4, 1), make(5, 1)])
    assert queue.next_batch(None, 7, BIG) == entries[:2]  # 3 + 4 = 7 fits exactly
    assert queue.next_batch(None, 4, BIG) is None  # 5 > 4: nothing taken
    assert len(queue) == 1
    assert queue.next_batch(None, 5, BIG) == entries[2:]


def test_prefill_budget_padded_is_n_plus_one_times_longest(make) -> None:
    queue = Queue(requires_padding=True)
    # Costs: 1*2 = 2, 2*5 = 10, 3*5 = 15, 4*5 = 20.
    entries = fill(queue, [make(2, 1), make(5, 1), make(3, 1), make(1, 1)])
    assert queue.next_batch(None, 14, BIG) == entries[:2]
    queue = Queue(requires_padding=True)
    fill(queue, entries)
    assert queue.next_batch(None, 15, BIG) == entries[:3]
    queue = Queue(requires_padding=True)
    fill(queue, entries)
    assert queue.next_batch(None, 20, BIG) == entries
    queue = Queue(requires_padding=True)
    fill(queue, entries)
    assert queue.next_batch(None, 9, BIG) == entries[:1]  # 2*5 = 10 > 9 (the sum, 7, would fit)


def test_padded_longest_prompt_can_come_first(make) -> None:
    queue = Queue(requires_padding=True)
    entries = fill(queue, [make(6, 1), make(1, 1), make(1, 1)])
    # 1*6, 2*6, 3*6: short prompts after a long one still pay the long one's length.
    assert queue.next_batch(None, 17, BIG) == entries[:2]


def test_token_budget_unpadded(make) -> None:
    queue = Queue(requires_padding=False)
    entries = fill(queue, [make(3, 10), make(4, 20), make(5, 30)])
    # Totals: 13, 37, 72.
    assert queue.next_batch(None, BIG, 36) == entries[:1]
    queue = Queue(requires_padding=False)
    fill(queue, entries)
    assert queue.next_batch(None, BIG, 37) == entries[:2]
    queue = Queue(requires_padding=False)
    fill(queue, entries)
    assert queue.next_batch(None, BIG, 72) == entries
    queue = Queue(requires_padding=False)
    fill(queue, entries)
    assert queue.next_batch(None, BIG, 12) is None
    assert len(queue) == 3


def test_token_budget_padded(make) -> None:
    """Padded: prefill (n+1)*longest plus the sum of max_new_tokens."""
    queue = Queue(requires_padding=True)
    entries = fill(queue, [make(2, 10), make(5, 20)])
    # First: 2 + 10 = 12. Both: 2*5 + 30 = 40.
    assert queue.next_batch(None, BIG, 39) == entries[:1]
    queue = Queue(requires_padding=True)
    fill(queue, entries)
    assert queue.next_batch(None, BIG, 40) == entries


def test_both_budgets_apply(make) -> None:
    queue = Queue(requires_padding=False)
    entries = fill(queue, [make(5, 50), make(5, 1), make(5, 1)])
    assert queue.next_batch(None, 10, 60) == entries[:1]  # prefill would fit 2, tokens only 1
    assert queue.next_batch(None, 5, 60) == entries[1:2]  # tokens would fit 2, prefill only 1
    assert queue.next_batch(None, 10, 12) == entries[2:]


def test_batch_stops_at_first_entry_over_budget(make) -> None:
    """FIFO: a small request behind a big one waits; the batch is a prefix of the queue."""
    queue = Queue(requires_padding=False)
    entries = fill(queue, [make(3, 1), make(100, 1), make(2, 1)])
    assert queue.next_batch(None, 10, BIG) == entries[:1]
    assert list(queue.entries) == entries[1:]
    assert queue.next_batch(None, 10, BIG) is None  # the big one blocks the head
    assert list(queue.entries) == entries[1:]


# --------------------------------------------------------------------------------------------- min_size


def test_min_size_not_reached_returns_none_and_takes_nothing(make) -> None:
    queue = Queue(requires_padding=False)
    entries = fill(queue, [make(2) for _ in range(3)])
    assert queue.next_batch(4, BIG, BIG) is None
    assert list(queue.entries) == entries
    assert queue.not_empty.is_set()
    # Budget lets only 2 fit: min_size 3 fails, 2 succeeds.
    assert queue.next_batch(3, 4, BIG) is None
    assert list(queue.entries) == entries
    assert queue.next_batch(2, 4, BIG) == entries[:2]
    assert queue.next_batch(1, BIG, BIG) == entries[2:]


def test_min_size_reached_exactly(make) -> None:
    queue = Queue(requires_padding=True)
    entries = fill(queue, [make(2) for _ in range(3)])
    assert queue.next_batch(3, BIG, BIG) == entries


def test_min_size_zero_behaves_like_none(make) -> None:
    queue = Queue(requires_padding=False)
    entries = fill(queue, [make(2)])
    assert queue.next_batch(0, BIG, BIG) == entries


# --------------------------------------------------------------------------------------------- cancellation


def test_cancelled_entries_are_skipped_and_dropped(make) -> None:
    queue = Queue(requires_padding=False)
    entries = fill(queue, [make(3), make(3), make(3), make(3), make(3)])
    entries[0].cancelled = True
    entries[2].cancelled = True
    batch = queue.next_batch(None, 6, BIG)  # room for exactly two live entries
    assert batch == [entries[1], entries[3]]
    assert list(queue.entries) == [entries[4]]  # the cancelled ones are gone too
    assert queue.next_batch(None, BIG, BIG) == [entries[4]]


def test_cancelled_entries_cost_nothing(make) -> None:
    queue = Queue(requires_padding=True)
    entries = fill(queue, [make(2), make(50, 100, cancelled=True), make(2)])
    # Without the cancelled one: 2*2 = 4 prefill tokens.
    assert queue.next_batch(None, 4, BIG) == [entries[0], entries[2]]


def test_cancelled_head_dropped_even_when_min_size_fails(make) -> None:
    queue = Queue(requires_padding=False)
    entries = fill(queue, [make(2, cancelled=True), make(2)])
    assert queue.next_batch(5, BIG, BIG) is None
    assert list(queue.entries) == entries[1:]


def test_only_cancelled_entries_empty_the_queue(make) -> None:
    """All waiting requests were cancelled: nothing to batch, the queue is empty, and so is not_empty.

    The batcher waits on ``not_empty`` before each ``next_batch``; left set, its loop would spin.
    """
    queue = Queue(requires_padding=False)
    fill(queue, [make(2, cancelled=True), make(3, cancelled=True)])
    assert queue.not_empty.is_set()
    assert queue.next_batch(None, BIG, BIG) is None
    assert len(queue) == 0
    assert not queue.not_empty.is_set()


def test_entry_cancelled_while_queued(make) -> None:
    queue = Queue(requires_padding=False)
    entries = fill(queue, [make(2), make(2), make(2)])
    entries[1].cancelled = True  # the client went away after the entry was queued
    assert queue.next_batch(None, BIG, BIG) == [entries[0], entries[2]]
    assert len(queue) == 0


# --------------------------------------------------------------------------------------------- not_empty


def test_not_empty_set_and_cleared(make) -> None:
    queue = Queue(requires_padding=False)
    assert not queue.not_empty.is_set()
    fill(queue, [make(4), make(4)])
    assert queue.not_empty.is_set()
    assert queue.next_batch(None, 4, BIG) is not None
    assert queue.not_empty.is_set()  # one left
    assert queue.next_batch(None, 4, BIG) is not None
    assert not queue.not_empty.is_set()
    queue.append(make(1))
    assert queue.not_empty.is_set()


def test_not_empty_stays_set_when_nothing_fits(make) -> None:
    queue = Queue(requires_padding=False)
    fill(queue, [make(10)])
    assert queue.next_batch(None, 5, BIG) is None
    assert queue.not_empty.is_set()
    assert len(queue) == 1


async def test_waiter_wakes_on_append(make) -> None:
    queue = Queue(requires_padding=False)
    entry = make(3)

    async def consumer() -> list[Entry] | None:
        await queue.not_empty.wait()
        return queue.next_batch(None, BIG, BIG)

    task = asyncio.create_task(consumer())
    await asyncio.sleep(0.01)
    assert not task.done()
    queue.append(entry)
    assert await asyncio.wait_for(task, 5) == [entry]
    assert not queue.not_empty.is_set()


async def test_batcher_style_loop_does_not_spin_on_cancelled_entries(make) -> None:
    """The batcher's loop: wait for not_empty, take a batch, continue when there is none."""
    queue = Queue(requires_padding=False)
    fill(queue, [make(2, cancelled=True)])
    spins = 0

    async def loop() -> None:
        nonlocal spins
        while spins < 1000:
            await queue.not_empty.wait()
            if queue.next_batch(None, BIG, BIG) is None:
                spins += 1
                continue
            return

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.05)
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert spins <= 1, f"next_batch returned None {spins} times in a row with not_empty still set"


def test_direct_consumer_takes_items_while_nothing_is_queued() -> None:
    """A handler's ``direct`` writer takes items until it declines one; from then on items queue behind it
    (order kept) until the queue is empty again."""
    channel = EventChannel()
    taken: list[object] = []
    accept = True

    def direct(item: object) -> bool:
        if accept:
            taken.append(item)
        return accept

    channel.direct = direct
    channel.put("a")  # type: ignore[arg-type]
    accept = False
    channel.put("b")  # type: ignore[arg-type]
    accept = True
    channel.put("c")  # type: ignore[arg-type]  # "b" is still queued: "c" must not overtake it
    assert taken == ["a"] and channel.take_all() == ["b", "c"]
    channel.put("d")  # type: ignore[arg-type]
    channel.direct = None
    channel.put("e")  # type: ignore[arg-type]
    assert taken == ["a", "d"] and channel.take_all() == ["e"]
