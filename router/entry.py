"""A request's life in the router: its entry, and the channel its events go through to its handler."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import InferError
from .generation import GenerationState, StreamEvent
from .tracing import RequestTrace
from .validation import ValidRequest


class EventChannel:
    """One producer (the receiving loop), one consumer (the request's handler): a FIFO of API-neutral items
    (``StreamEvent``s, or the ``InferError`` the request ended with; nothing follows the last event or an
    error), cheaper than an asyncio.Queue on the per-token path; the consumer takes everything that piled
    up at once. The producer formats nothing.

    By default every ``put`` wakes the consumer's task (``wait``). A consumer that drains the channel
    outside its task (a streaming handler's coalesced writer, ``sse.SSEWriter``) sets ``listener``: then a
    plain token event (not the last one) calls ``listener()`` instead, only when it makes the channel
    non-empty; the listener's owner later takes the items it handles from the front of ``items`` and calls
    ``wake`` for any it leaves. The last event and an error always wake the task at once (it takes every
    item before them too, so the order never changes)."""

    __slots__ = ("items", "listener", "waiter")

    def __init__(self) -> None:
        self.items: deque[StreamEvent | InferError] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.listener: Callable[[], None] | None = None

    def put(self, item: StreamEvent | InferError) -> None:
        items = self.items
        items.append(item)
        listener = self.listener
        if listener is not None and type(item) is StreamEvent and item.finished is None:
            if len(items) == 1:
                listener()
            return
        waiter = self.waiter  # wake(), inline: the per-token path
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def wake(self) -> None:
        """Wakes the consumer's task if it is waiting."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self.items

    async def wait(self) -> None:
        """Returns once at least one item is waiting (with a ``listener``, the task is woken only for the
        items the listener leaves to it)."""
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    def take_all(self) -> list[StreamEvent | InferError]:
        items = list(self.items)
        self.items.clear()
        return items


@dataclass(eq=False)
class Entry:
    """A request from the moment it is queued until its last event; ``events`` feeds its HTTP handler."""

    id: int
    request: ValidRequest
    state: GenerationState
    events: EventChannel = field(default_factory=EventChannel)
    queued_at: float = field(default_factory=time.monotonic)
    batched_at: float | None = None
    cancelled: bool = False
    done: bool = False
    # The client request it belongs to (the id of its first entry): OpenAI's n samples and best_of
    # candidates share one, and the shard's scheduler is fair between them.
    group: int = 0
    # Its spans when the router traces (router/tracing.py), else None.
    trace: RequestTrace | None = None

    def cost(self) -> tuple[int, int]:
        """(prompt tokens, most new tokens)."""
        return self.request.input_length, self.request.max_new_tokens
