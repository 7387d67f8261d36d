"""router/entry.py: a request's entry and the channel of its events (direct consumers keep the order)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from common.params import SamplingParams
from router.entry import Entry, EventChannel
from router.generation import GenerationState
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
