"""A request's life in the router: its entry, and the channel its events go through to its handler."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import InferError
from .generation import GenerationState, StreamEvent
from .validation import ValidRequest


class EventChannel:
    """One producer (the receiving loop), one consumer (the request's handler): cheaper than an
    asyncio.Queue on the per-token path, and the consumer can take everything that piled up at once.

    ``direct``, when the handler sets it, is offered each item first while nothing is queued: it returns
    True when it has taken the item itself (a streaming handler writes plain tokens to its connection
    straight from the receiving loop, see ``sse.DirectSSE``), False to let it be queued as usual."""

    __slots__ = ("direct", "items", "waiter")

    def __init__(self) -> None:
        self.items: deque[StreamEvent | InferError] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.direct: Callable[[StreamEvent | InferError], bool] | None = None

    def put(self, item: StreamEvent | InferError) -> None:
        direct = self.direct
        if direct is not None and not self.items and direct(item):
            return
        self.items.append(item)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def empty(self) -> bool:
        return not self.items

    async def wait(self) -> None:
        """Returns once at least one item is waiting."""
        while not self.items:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    async def get(self) -> StreamEvent | InferError:
        await self.wait()
        return self.items.popleft()

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

    def cost(self) -> tuple[int, int]:
        """(prompt tokens, most new tokens)."""
        return self.request.input_length, self.request.max_new_tokens
