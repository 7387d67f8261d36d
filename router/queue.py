"""The waiting queue and TGI's admission rule for the next prefill batch."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from .errors import InferError
from .generation import GenerationState, StreamEvent
from .validation import ValidRequest


@dataclass(eq=False)
class Entry:
    """A request from the moment it is queued until its last event; ``events`` feeds its HTTP handler."""

    id: int
    request: ValidRequest
    state: GenerationState
    events: asyncio.Queue[StreamEvent | InferError] = field(default_factory=asyncio.Queue)
    queued_at: float = field(default_factory=time.monotonic)
    batched_at: float | None = None
    cancelled: bool = False
    done: bool = False

    def cost(self) -> tuple[int, int]:
        """(prompt tokens, most new tokens)."""
        return self.request.input_length, self.request.max_new_tokens


class Queue:
    """FIFO of waiting entries. ``next_batch`` takes as many as fit TGI's budgets."""

    def __init__(self, requires_padding: bool) -> None:
        self.requires_padding = requires_padding
        self.entries: deque[Entry] = deque()
        self.not_empty = asyncio.Event()

    def __len__(self) -> int:
        return len(self.entries)

    def append(self, entry: Entry) -> None:
        self.entries.append(entry)
        self.not_empty.set()

    def next_batch(self, min_size: int | None, prefill_budget: int, token_budget: int) -> list[Entry] | None:
        """Pops the longest prefix of the queue whose prefill and total tokens fit the budgets.

        Padded backends pay ``(n + 1) * longest prompt`` for a prefill of n requests (TGI's rule).
        Returns None (taking nothing) when fewer than ``min_size`` entries fit.
        """
        while self.entries and self.entries[0].cancelled:
            self.entries.popleft()
        taken: list[Entry] = []
        prefill = decode = longest = 0
        for entry in self.entries:
            if entry.cancelled:
                continue
            prompt, new = entry.cost()
            if self.requires_padding:
                longest = max(longest, prompt)
                next_prefill = (len(taken) + 1) * longest
            else:
                next_prefill = prefill + prompt
            next_decode = decode + new
            if next_prefill > prefill_budget or next_prefill + next_decode > token_budget:
                break
            taken.append(entry)
            prefill, decode = next_prefill, next_decode
        if not taken or (min_size is not None and len(taken) < min_size):
            if not self.entries:
                self.not_empty.clear()
            return None
        chosen = set(map(id, taken))
        self.entries = deque(e for e in self.entries if id(e) not in chosen and not e.cancelled)
        if not self.entries:
            self.not_empty.clear()
        return taken
