"""The scheduler alone: block counts, priorities, preemption and progress, without a model or a cache."""

from __future__ import annotations

from dataclasses import dataclass

from shard.scheduler import Plan, Scheduler

BS = 4


@dataclass(eq=False)
class FakeWork:
    """A request as the engine would keep it: tokens to hold, tokens computed, blocks held."""

    name: str
    key: tuple[int, int, int]
    tokens: int
    share: int = 0
    running: bool = False
    is_open: bool = False
    computed: int = 0
    blocks: int = 0
    # Blocks of its prompt another request has left in the prefix cache (found when it opens).
    cached: int = 0
    # Leading blocks of its table given back as a sliding window passed them (counted in ``blocks``).
    dropped: int = 0

    def __post_init__(self) -> None:
        self.share = self.share or id(self)

    @property
    def opened(self) -> bool:
        return self.is_open

    @property
    def num_tokens(self) -> int:
        return self.tokens + 1 if self.running else self.tokens

    @property
    def num_computed(self) -> int:
        return self.computed

    @property
    def num_blocks(self) -> int:
        return self.blocks


class FakePool:
    """Counts blocks; a prefix hit holds blocks that were free (cached, held by nobody). With a ``window``
    (tokens), ``slide`` gives back the blocks wholly before the window of a work's next token."""

    block_size = BS

    def __init__(self, blocks: int, window: int | None = None) -> None:
        self.free = blocks
        self.window = window

    def num_free(self) -> int:
        return self.free

    def open(self, work: FakeWork) -> None:
        work.is_open = True
        hit = min(work.cached, self.free)
        work.blocks = work.computed = 0
        work.blocks += hit
        work.computed = hit * BS
        self.free -= hit

    def release(self, work: FakeWork) -> None:
        self.free += work.blocks - work.dropped
        work.blocks = work.computed = work.dropped = 0
        work.is_open = False

    def slide(self, work: FakeWork) -> None:
        assert self.window is not None, "the scheduler slides only with a window"
        first = max(work.computed - self.window + 1, 0) // BS
        if first > work.dropped:
            self.free += first - work.dropped
            work.dropped = first


def run(scheduler: Scheduler[FakeWork], plan: Plan[FakeWork]) -> None:
    """Applies a plan as the engine does: chunks and growth take their blocks; complete prompts start."""
    pool = scheduler.pool
    assert isinstance(pool, FakePool)
    for work in scheduler.running.values():
        if work.num_tokens > work.blocks * BS:
            work.blocks += 1
            pool.free -= 1
        work.tokens += 1
        work.computed = work.tokens
    for work, take in plan.chunks:
        need = -(-(work.computed + take) // BS) - work.blocks
        work.blocks += need
        pool.free -= need
        work.computed += take
    assert pool.free >= 0, "the plan gave out blocks the pool has not got"
    for work, _ in plan.chunks:
        if work.computed == work.tokens:
            scheduler.start(work)


def add(scheduler: Scheduler[FakeWork], name: str, tokens: int, group: int, **kw: int) -> FakeWork:
    work = FakeWork(name, (scheduler.rank(group), group, len(name) * 1000 + ord(name[-1])), tokens, **kw)
    scheduler.add(work)
    return work


def test_growth_preempts_the_lowest_priority_and_it_recomputes_later() -> None:
    pool = FakePool(4)
    s: Scheduler[FakeWork] = Scheduler(pool, 4)
    a, b = add(s, "a", 4, group=1), add(s, "b", 4, group=2)
    plan = s.schedule(None)
    assert [(w.name, t) for w, t in plan.chunks] == [("a", 4), ("b", 4)]
    run(s, plan)
    assert pool.free == 2 and set(s.running.values()) == {a, b}
    # Each now feeds a 5th token: a new block each (2 free): no preemption.
    plan = s.schedule(None)
    assert plan.preempted == []
    run(s, plan)
    assert pool.free == 0
    # 9th token: both need a block again and none is free: b (later, lower priority) gives its back.
    for _ in range(3):
        run(s, s.schedule(None))
    plan = s.schedule(None)
    assert plan.preempted == [b] and not b.running and b.num_blocks == 0
    assert s.num_preemptions == 1
    run(s, plan)
    assert a.num_blocks == 3 and pool.free == 0


def test_a_waiting_request_preempts_only_lower_priority_work() -> None:
    pool = FakePool(4)
    s: Scheduler[FakeWork] = Scheduler(pool, 4)
    # The first request's second sample (rank 1) runs and holds every block.
    first = add(s, "a0", 4, group=1)
    second = add(s, "a1", 12, group=1)
    plan = s.schedule(None)
    run(s, plan)
    assert first.running and second.running and pool.free == 0
    # A new request's first sequence (rank 0) outranks the sample: the sample is preempted for it.
    user = add(s, "u", 4, group=2)
    plan = s.schedule(None)
    assert plan.preempted == [second] and plan.chunks == [(user, 4), (second, 4)]
    run(s, plan)
    # A later request's first sequence preempts nobody of the same rank: it waits for blocks. (The
    # sample's part-way prompt gave its block back to the growth of the running ones.)
    add(s, "b0", 4, group=3)
    add(s, "b1", 4, group=3)
    plan = s.schedule(None)
    assert plan.preempted == [] and plan.chunks == []
    assert not second.opened


def test_head_of_line_a_long_prompt_is_not_passed_by_short_ones() -> None:
    pool = FakePool(3)
    s: Scheduler[FakeWork] = Scheduler(pool, 10)
    long_prompt = add(s, "long", 20, group=1)
    add(s, "short", 2, group=2)
    plan = s.schedule(None)
    # 3 blocks free: the long prompt runs 12 of its tokens; the short one does not jump ahead.
    assert [(w.name, t) for w, t in plan.chunks] == [("long", 12)]
    run(s, plan)
    assert long_prompt.computed == 12


def test_the_budget_limits_prompt_tokens() -> None:
    s: Scheduler[FakeWork] = Scheduler(FakePool(100), 100)
    add(s, "a", 10, group=1)
    add(s, "b", 10, group=2)
    plan = s.schedule(14)
    assert [(w.name, t) for w, t in plan.chunks] == [("a", 10), ("b", 4)]


def test_samples_wait_for_the_prompt_they_share() -> None:
    pool = FakePool(100)
    s: Scheduler[FakeWork] = Scheduler(pool, 100)
    leader = add(s, "s0", 18, group=1, share=7)
    follower = add(s, "s1", 18, group=1, share=7)
    plan = s.schedule(8)
    assert [w for w, _ in plan.chunks] == [leader]
    run(s, plan)
    plan = s.schedule(None)  # the leader is still part-way: the follower still waits
    assert [w for w, _ in plan.chunks] == [leader]
    run(s, plan)
    follower.cached = 4  # the leader's full blocks are in the prefix cache now
    plan = s.schedule(None)
    assert plan.chunks == [(follower, 2)]


def test_work_larger_than_the_pool_fails_alone_and_the_rest_goes_on() -> None:
    s: Scheduler[FakeWork] = Scheduler(FakePool(2), 2)
    huge = add(s, "huge", 9, group=1)
    small = add(s, "small", 4, group=2)
    plan = s.schedule(None)
    assert plan.failed == [huge] and plan.chunks == [(small, 4)]
    assert s.waiting == [small] and not huge.opened


def test_a_cached_prefix_never_takes_the_blocks_running_sequences_need() -> None:
    pool = FakePool(2)
    s: Scheduler[FakeWork] = Scheduler(pool, 10)
    a = add(s, "a", 4, group=1)
    run(s, s.schedule(None))
    pool.free = 1
    # a needs a block this step; b's prefix hit would take the last free one.
    b = add(s, "b", 9, group=2, cached=1)
    plan = s.schedule(None)
    assert plan.chunks == [] and not b.opened and pool.free == 1
    run(s, plan)
    assert a.num_blocks == 2


def test_a_blocked_head_takes_the_blocks_of_later_part_way_prompts() -> None:
    pool = FakePool(4)
    s: Scheduler[FakeWork] = Scheduler(pool, 4)
    head = add(s, "h", 12, group=1)
    other = add(s, "o", 8, group=2)
    # As after a preemption: the head holds nothing, a later prompt holds 3 blocks part-way.
    other.tokens, other.is_open, other.blocks, other.computed = 16, True, 3, 12
    pool.free = 1
    plan = s.schedule(None)
    assert plan.chunks == [(head, 12)]
    assert not other.opened and pool.free == 4


def test_max_adapters_keeps_a_steps_lora_adapters_within_the_limit() -> None:
    """--max-loras: waiting work of a third adapter waits while two others hold the running batch; work
    of the adapters in use and of the base model goes on past it; it starts once an adapter is free."""
    adapters = {"a": "x", "b": "y", "c": "z", "d": "x", "e": ""}
    pool = FakePool(64)
    s: Scheduler[FakeWork] = Scheduler(pool, 64, max_adapters=2, adapter_of=lambda w: adapters[w.name])
    a, b, c, d, e = (add(s, name, 4, group=i) for i, name in enumerate("abcde"))
    plan = s.schedule(None)
    assert [w.name for w, _ in plan.chunks] == ["a", "b", "d", "e"]
    run(s, plan)
    assert s.waiting == [c]
    assert s.schedule(None).chunks == []  # x and y still run
    for work in (a, d):  # adapter x's requests leave
        s.remove(work)
    plan = s.schedule(None)
    assert [w.name for w, _ in plan.chunks] == ["c"]
    # Without a limit every adapter runs at once.
    free: Scheduler[FakeWork] = Scheduler(FakePool(64), 64, adapter_of=lambda w: adapters[w.name])
    for i, name in enumerate("abcde"):
        add(free, name, 4, group=i)
    assert len(free.schedule(None).chunks) == 5
    del b, e
