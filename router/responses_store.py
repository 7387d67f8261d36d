"""The Responses API's store: responses kept in memory for ``GET`` / ``DELETE /v1/responses/{id}`` and for
``previous_response_id``.

Bounded by count and by size, without flags: at most ``DEFAULT_CAPACITY`` responses and
``DEFAULT_MAX_CHARS`` characters of JSON (their input items and response objects, as ``json.dumps``
writes them), least recently used first out (a ``get`` counts as a use). A response larger than the whole
size budget is not kept. Nothing survives a restart; a response created with ``store: false`` is never put
here. Each entry keeps the response object as it was returned and the whole input it answered (the input
items of its own request after those of the responses it continued, instructions apart), so that a
continuation does not depend on older responses still being stored. Entries share the item objects of the
responses they continue, so the size budget, which counts each entry's items in full, errs on the safe side.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_CAPACITY = 1000
DEFAULT_MAX_CHARS = 256 * 2**20


@dataclass(frozen=True)
class StoredResponse:
    """A response object as returned, and the input items it answered (Responses' JSON item shapes)."""

    response: dict[str, Any]
    input_items: tuple[dict[str, Any], ...]

    def size(self) -> int:
        """Characters of JSON it holds."""
        return len(json.dumps(self.response, ensure_ascii=False)) + len(
            json.dumps(self.input_items, ensure_ascii=False)
        )


class ResponseStore:
    """An LRU of ``StoredResponse`` by response id: at most ``capacity`` entries and ``max_chars`` characters."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY, max_chars: int = DEFAULT_MAX_CHARS) -> None:
        if capacity < 1 or max_chars < 1:
            raise ValueError("a response store holds at least one response")
        self.capacity = capacity
        self.max_chars = max_chars
        self.chars = 0
        self._entries: OrderedDict[str, tuple[StoredResponse, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, stored: StoredResponse, size: int | None = None) -> bool:
        """Keeps ``stored`` (of ``size`` characters: ``stored.size()``, computed here when None) under its
        response's id, dropping the least recently used entries while over a bound. Returns whether it is
        kept (False: it alone is over the size budget)."""
        key = stored.response["id"]
        self.delete(key)
        if size is None:
            size = stored.size()
        if size > self.max_chars:
            return False
        self._entries[key] = (stored, size)
        self.chars += size
        while len(self._entries) > self.capacity or self.chars > self.max_chars:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.chars -= dropped
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        """The entry (now the most recently used), or None when unknown, deleted or dropped."""
        entry = self._entries.get(response_id)
        if entry is None:
            return None
        self._entries.move_to_end(response_id)
        return entry[0]

    def delete(self, response_id: str) -> bool:
        """Removes the entry; whether there was one."""
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self.chars -= entry[1]
        return True
