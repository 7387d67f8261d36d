"""The Responses API's store: bounded by count, least recently used out, deletes, continuations."""

from __future__ import annotations

import pytest

from router.responses_store import DEFAULT_CAPACITY, DEFAULT_MAX_CHARS, ResponseStore, StoredResponse


def stored(response_id: str, output: list[dict] | None = None) -> StoredResponse:
    item = {"type": "message", "role": "user", "content": response_id}
    return StoredResponse({"id": response_id, "output": output or []}, (item,))


def test_a_bounded_lru() -> None:
    store = ResponseStore(capacity=3)
    for name in ("a", "b", "c"):
        store.put(stored(name))
    assert store.get("a") is not None  # a is now the most recently used
    store.put(stored("d"))
    assert store.get("b") is None and len(store) == 3
    assert [store.get(n) is not None for n in ("a", "c", "d")] == [True, True, True]
    store.put(stored("a"))  # replacing keeps one entry
    assert len(store) == 3


def test_delete_and_unknown_ids() -> None:
    store = ResponseStore()
    store.put(stored("a"))
    assert store.delete("a") and not store.delete("a")
    assert store.get("a") is None and store.get("never") is None


def test_default_capacity_and_refused_capacity() -> None:
    assert ResponseStore().capacity == DEFAULT_CAPACITY == 1000
    assert ResponseStore().max_chars == DEFAULT_MAX_CHARS == 256 * 2**20
    with pytest.raises(ValueError):
        ResponseStore(capacity=0)


def test_bounded_by_size_too() -> None:
    one = stored("a").size()
    store = ResponseStore(capacity=100, max_chars=2 * one + 1)
    for name in ("a", "b", "c"):
        assert store.put(stored(name))
    assert store.get("a") is None and len(store) == 2 and store.chars == 2 * one
    assert store.delete("b") and store.chars == one
    big = StoredResponse(
        {"id": "big", "output": []}, ({"type": "message", "role": "user", "content": "x" * 3 * one},)
    )
    assert not store.put(big) and store.get("big") is None and store.get("c") is not None
