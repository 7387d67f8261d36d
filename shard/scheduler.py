"""The one place that decides what runs in each step of the paged engine, and who holds KV memory.

Every request on the shard is a ``Work``: its tokens catch up with their K/V in the cache (there is no
prefill phase and no decode phase: a waiting prompt runs in chunks, a running sequence feeds one token a
step, a preempted one recomputes what it had). Each step ``Scheduler.schedule`` decides, under a token
budget and the free blocks of the pool:

1. **Growth.** Every running sequence feeds one token; those whose last block is full need a new one. When
   the pool cannot give them all one, the running sequence of the lowest priority is *preempted*: its
   blocks go back (full ones stay findable in the prefix cache) and it waits to recompute its tokens.
   Nobody's step ever fails for lack of memory.
2. **Chunks.** Waiting work runs its next tokens in priority order while the budget lasts. A prompt
   that needs blocks the pool has not got may preempt running sequences of *lower* priority; otherwise it
   waits (head of line: later work does not pass it, so a long prompt is never starved by short ones).
3. **Progress.** When nothing could run and nothing runs, the work held by waiting prompts other than
   the first is given back; a first prompt that still cannot fit is more than the whole pool, and fails.

Priority is fair between client requests, not between sequences: ``key = (rank, group, id)`` where
``rank`` is the sequence's place among its request's sequences (OpenAI ``n``, ``best_of``), so the first
sequence of every request comes before the second of any, and requests of equal rank go in arrival order.

With sliding windows (``Pool.window``: every layer reads at most that many keys back), each step begins by
giving back the blocks every layer's window has passed (``Pool.slide``, for every holder, before anything
is counted): a long sequence holds about a window of blocks, and a sequence longer than the whole pool
still fits as long as one window does (its prompt runs in chunks the free blocks hold).

The scheduler knows blocks as counts only; the engine's ``Pool`` opens sequences (prefix-cache hits) and
gives blocks back. It holds no tensors and runs no model: its tests need none.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class Work(Protocol):
    """What the scheduler reads of one request on the shard (the engine keeps it current)."""

    # Priority: lower first (see the module docstring).
    key: tuple[int, int, int]
    # Requests whose prompts are equal (the n samples of one prompt): one runs it, the others wait for
    # its full blocks to be in the prefix cache instead of computing the same tokens side by side.
    share: int
    # Whether it is decoding (else it waits, or runs a prompt in chunks).
    running: bool

    @property
    def opened(self) -> bool:
        """Whether it holds a sequence in the pool (a waiting request opens one when first scheduled)."""
        ...

    @property
    def num_tokens(self) -> int:
        """Tokens whose K/V it holds once this step has run: a running sequence's tokens plus the one it
        feeds now; a waiting one's prompt (or, after a preemption, all it had fed)."""
        ...

    @property
    def num_computed(self) -> int:
        """Tokens whose K/V are in the cache."""
        ...

    @property
    def num_blocks(self) -> int:
        """Its block table's length: the blocks it holds and, with a window, the leading ones it gave back
        (their positions stay; so the blocks it needs for ``n`` tokens are ``ceil(n / block_size) -
        num_blocks``)."""
        ...


W = TypeVar("W", bound=Work)
W_contra = TypeVar("W_contra", bound=Work, contravariant=True)


class Pool(Protocol[W_contra]):
    """The KV block pool, as the scheduler sees it."""

    block_size: int
    # The most keys any layer reads up to a query, itself included (None: every earlier one).
    window: int | None

    def num_free(self) -> int:
        """Blocks that can be handed out now (free, or cached and held by nobody)."""
        ...

    def open(self, work: W_contra) -> None:
        """Gives a waiting request its sequence, sharing its longest cached prefix (which it then holds)."""
        ...

    def release(self, work: W_contra) -> None:
        """Gives back every block of ``work``; it keeps its tokens and recomputes them when it runs again."""
        ...

    def slide(self, work: W_contra) -> None:
        """Gives back the blocks of ``work`` that every layer's window has passed (only with a window)."""
        ...


@dataclass
class Plan(Generic[W]):
    """What one step runs: ``chunks`` (work and its number of next tokens) beside every running sequence
    that was not preempted. ``preempted``: running work sent back to waiting (its blocks are back in the
    pool already). ``failed``: work that can never fit the pool, removed (its blocks are back too)."""

    chunks: list[tuple[W, int]] = field(default_factory=list)
    preempted: list[W] = field(default_factory=list)
    failed: list[W] = field(default_factory=list)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Scheduler(Generic[W]):
    """Waiting and running work, and the step plan. The engine adds work, applies each plan (moving
    preempted rows out of its batch, reserving the blocks the plan counted) and reports the prompts that
    completed (``start``) and the requests that left (``remove``)."""

    def __init__(
        self,
        pool: Pool[W],
        num_blocks: int,
        max_adapters: int | None = None,
        adapter_of: Callable[[W], str] | None = None,
    ) -> None:
        """``max_adapters`` (--max-loras): the most distinct LoRA adapters (``adapter_of``; "" = none) the
        work holding the step may use; waiting work of another adapter waits until one of them is free."""
        self.pool = pool
        self.num_blocks = num_blocks
        self.max_adapters = max_adapters
        self.adapter_of = adapter_of
        # Waiting work in priority order; running work by identity.
        self.waiting: list[W] = []
        self.running: dict[int, W] = {}
        # Sequences of each group so far (their ranks); forgotten when the group's last sequence leaves.
        self._ranks: Counter[int] = Counter()
        self._members: Counter[int] = Counter()
        self.num_preemptions = 0

    # -- membership -------------------------------------------------------------------------------
    def rank(self, group: int) -> int:
        """The next sequence of ``group``'s place among its sequences (0 for the first): its ``key[0]``."""
        rank = self._ranks[group]
        self._ranks[group] += 1
        self._members[group] += 1
        return rank

    def add(self, work: W) -> None:
        """Queues waiting work (new, or preempted) in priority order."""
        work.running = False
        bisect.insort(self.waiting, work, key=lambda w: w.key)

    def start(self, work: W) -> None:
        """``work`` ran its last prompt token this step: it decodes from the next step on."""
        self.waiting.remove(work)
        work.running = True
        self.running[id(work)] = work

    def remove(self, work: W) -> None:
        """``work`` leaves (finished, cancelled or failed); the engine gives its blocks back."""
        if work.running:
            self.running.pop(id(work), None)
        else:
            self.waiting.remove(work)
        group = work.key[1]
        self._members[group] -= 1
        if self._members[group] <= 0:
            del self._members[group]
            self._ranks.pop(group, None)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # -- the step ---------------------------------------------------------------------------------
    def schedule(self, budget: int | None) -> Plan[W]:
        """The next step's plan. ``budget``: prompt tokens the step may run beside its decodes (None: no
        limit)."""
        plan: Plan[W] = Plan()
        bs = self.pool.block_size
        if self.pool.window is not None:
            for work in self._holders():
                self.pool.slide(work)
        growing = self._growth(plan)
        # Shares whose prompt is being computed: their other members wait for its blocks.
        computing = {w.share for w in self.waiting if w.opened and w.num_computed < w.num_tokens}
        adapters = self._adapters_in_use()
        # The first work waiting for an adapter's place: later work may not keep the places busy past it.
        blocked: tuple[int, int, int] | None = None
        for work in list(self.waiting):
            if budget is not None and budget <= 0:
                break
            if not self._adapter_fits(work, adapters, blocked):
                blocked = blocked or work.key
                continue  # its adapter waits for a place (see _adapter_fits)
            if self._never_fits(work):
                self._fail(work, plan)
                continue
            if not work.opened:
                if work.share in computing:
                    continue
                self.pool.open(work)
                if self.pool.num_free() < growing + self._planned_blocks(plan):
                    # Its cached prefix took blocks that were free: the running sequences need them.
                    self.pool.release(work)
                    break
                if work.num_computed < work.num_tokens:
                    computing.add(work.share)
            remaining = work.num_tokens - work.num_computed
            take = remaining if budget is None else min(remaining, budget)
            need = ceil_div(work.num_computed + take, bs) - work.num_blocks
            free = self.pool.num_free() - growing - self._planned_blocks(plan)
            if need > free:
                free += self._preempt_below(work, need - free, plan)
            if need > free:
                # Only what its own blocks and the free ones hold; nothing at all: it waits, and so does
                # everything after it.
                take = min(take, (work.num_blocks + max(free, 0)) * bs - work.num_computed)
                if take > 0:
                    plan.chunks.append((work, take))
                break
            plan.chunks.append((work, take))
            if self.adapter_of is not None and self.adapter_of(work):
                adapter = self.adapter_of(work)
                adapters[adapter] = min(adapters.get(adapter, work.key), work.key)
            if budget is not None:
                budget -= take
        if not plan.chunks and not self.running and self.waiting:
            self._unblock(plan)
        return plan

    def _adapters_in_use(self) -> dict[str, tuple[int, int, int]]:
        """The adapters of the work holding the step's places (running, and prompts part-way through),
        each with the key of its oldest holder."""
        oldest: dict[str, tuple[int, int, int]] = {}
        if self.adapter_of is None or self.max_adapters is None:
            return oldest
        for w in [*self.running.values(), *(w for w in self.waiting if w.opened)]:
            adapter = self.adapter_of(w)
            if adapter and (adapter not in oldest or w.key < oldest[adapter]):
                oldest[adapter] = w.key
        return oldest

    def _adapter_fits(
        self, work: W, adapters: dict[str, tuple[int, int, int]], blocked: tuple[int, int, int] | None
    ) -> bool:
        """Whether ``work`` may run now under ``max_adapters``: a place is free, or its adapter holds one
        and no earlier work waits for a place (``blocked``: the first such work's key), or the adapter's
        oldest holder came before that work. So later requests join an adapter in use only while work
        older than the waiting one holds it: once that has left, the adapter's holders drain, and the
        places go to the waiting work in priority (arrival) order. No request starves because its adapter
        is not on the device. Work holding blocks (``opened``) always goes on: it holds its place."""
        if self.adapter_of is None or self.max_adapters is None:
            return True
        adapter = self.adapter_of(work)
        if not adapter or work.opened:
            return True
        if adapter in adapters:
            return blocked is None or adapters[adapter] < blocked
        return len(adapters) < self.max_adapters

    def _never_fits(self, work: W) -> bool:
        """Whether ``work`` needs more blocks than the whole pool at its smallest: all its tokens' blocks, or
        with a window those of one window and the token it runs (it runs a token at a time if need be)."""
        bs = self.pool.block_size
        least = ceil_div(work.num_tokens, bs)
        window = self.pool.window
        if window is not None:
            least = min(least, ceil_div(window - 1, bs) + 1)
        return least > self.num_blocks

    def _planned_blocks(self, plan: Plan[W]) -> int:
        bs = self.pool.block_size
        return sum(max(ceil_div(w.num_computed + t, bs) - w.num_blocks, 0) for w, t in plan.chunks)

    def _holders(self) -> list[W]:
        """Work holding blocks: running sequences, and waiting prompts part-way through."""
        return [*self.running.values(), *(w for w in self.waiting if w.opened and w.num_blocks)]

    def _growth(self, plan: Plan[W]) -> int:
        """Preempts work, lowest priority first, until every running sequence that needs a new block this
        step can have one; returns how many blocks they need."""
        bs = self.pool.block_size
        growing = [w for w in self.running.values() if w.num_tokens > w.num_blocks * bs]
        while len(growing) > self.pool.num_free():
            holders = self._holders()
            victim = max(holders, key=lambda w: w.key)
            if len(holders) == 1:  # alone, it needs more blocks than the pool has
                self._fail(victim, plan)
            else:
                self._preempt(victim, plan)
            growing = [w for w in growing if w is not victim]
        return len(growing)

    def _preempt_below(self, work: W, blocks: int, plan: Plan[W]) -> int:
        """Preempts work of lower priority than ``work``, lowest first, until ``blocks`` more blocks are
        free or none is left; returns the blocks freed."""
        before = self.pool.num_free()
        while self.pool.num_free() - before < blocks:
            lower = [w for w in self._holders() if w.key > work.key]
            if not lower:
                break
            self._preempt(max(lower, key=lambda w: w.key), plan)
        return self.pool.num_free() - before

    def _fail(self, work: W, plan: Plan[W]) -> None:
        """``work`` can never fit the pool: it leaves, its blocks back."""
        self.remove(work)
        if work.opened:
            self.pool.release(work)
        plan.failed.append(work)

    def _preempt(self, work: W, plan: Plan[W]) -> None:
        """Gives back ``work``'s blocks; a running sequence goes back to waiting, to recompute its tokens."""
        self.pool.release(work)
        self.num_preemptions += 1
        if work.running:
            self.running.pop(id(work))
            self.add(work)
            plan.preempted.append(work)

    def _unblock(self, plan: Plan[W]) -> None:
        """Nothing runs and the first waiting work cannot: the others give their blocks back; if it
        still cannot run, it is larger than the pool and fails."""
        head = self.waiting[0]
        for work in self.waiting[1:]:
            if work.opened and work.num_blocks:
                self.pool.release(work)
        if self._never_fits(head):
            self._fail(head, plan)
            return
        if not head.opened:
            self.pool.open(head)
        free = self.pool.num_free()
        take = min(
            head.num_tokens - head.num_computed,
            (head.num_blocks + free) * self.pool.block_size - head.num_computed,
        )
        if take > 0:
            plan.chunks.append((head, take))
