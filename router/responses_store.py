"""The Responses API's store: responses kept in memory for ``GET`` / ``DELETE /v1/responses/{id}`` and for
``previous_response_id``.

Bounded by count: at most ``DEFAULT_CAPACITY`` responses (no flag), least recently used first out (a
``get`` counts as a use). Nothing survives a restart; a response created with ``store: false`` is never
put here. Each entry keeps the response object as it was returned and the whole input it answered
(the input items of its own request after those of the responses it continued, instructions apart), so
that a continuation does not depend on older responses still being stored. Entries share the item objects
of the responses they continue: a long conversation costs one reference per item per turn, not a copy.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

DEFAULT_CAPACITY = 1000


@dataclass(frozen=True)
class StoredResponse:
    """A response object as returned, and the input items it answered (Responses' JSON item shapes)."""

    response: dict[str, Any]
    input_items: tuple[dict[str, Any], ...]


class ResponseStore:
    """An LRU of ``StoredResponse`` by response id, holding at most ``capacity`` entries."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("a response store holds at least one response")
        self.capacity = capacity
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, stored: StoredResponse) -> None:
        """Keeps ``stored`` under its response's id, dropping the least recently used entry when full."""
        key = stored.response["id"]
        self._entries[key] = stored
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        """The entry (now the most recently used), or None when unknown, deleted or dropped."""
        stored = self._entries.get(response_id)
        if stored is not None:
            self._entries.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        """Removes the entry; whether there was one."""
        return self._entries.pop(response_id, None) is not None
