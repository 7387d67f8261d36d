"""Fairness between LoRA adapters in the scheduler (--max-loras, ``Scheduler.max_adapters``): a request
whose adapter has no place on the device waits for one, but never forever, however busy the adapters in
use are kept; the places go to waiting adapters in arrival order."""

from __future__ import annotations

from shard.scheduler import Scheduler

from .test_scheduler import FakePool, FakeWork, add, run

# Steps a request decodes before it leaves.
LIFE = 3


class Load:
    """A scheduler under --max-loras with requests that arrive over time and each decode ``LIFE`` steps."""

    def __init__(self, max_adapters: int) -> None:
        self.adapters: dict[str, str] = {}
        self.s: Scheduler[FakeWork] = Scheduler(
            FakePool(4096), 4096, max_adapters=max_adapters, adapter_of=lambda w: self.adapters[w.name]
        )
        self.group = 0
        self.decoded: dict[str, int] = {}
        self.started: dict[str, int] = {}
        self.finished: dict[str, int] = {}
        self.step_no = 0

    def arrive(self, name: str, adapter: str) -> FakeWork:
        self.group += 1
        self.adapters[name] = adapter
        return add(self.s, name, 4, group=self.group)

    def step(self) -> None:
        plan = self.s.schedule(None)
        step_adapters = {
            self.adapters[w.name] for w in [*self.s.running.values(), *(w for w, _ in plan.chunks)]
        }
        assert len(step_adapters - {""}) <= (self.s.max_adapters or 0), step_adapters
        running = list(self.s.running.values())
        run(self.s, plan)
        self.step_no += 1
        for work in running:
            self.decoded[work.name] = self.decoded.get(work.name, 0) + 1
            if self.decoded[work.name] == LIFE:
                self.s.remove(work)
                self.finished[work.name] = self.step_no
        for work in self.s.running.values():
            self.started.setdefault(work.name, self.step_no)


def test_a_waiting_adapter_gets_a_place_while_requests_keep_the_others_busy() -> None:
    """--max-loras 1: adapter x runs, a request for z arrives, and then a new request for x arrives every
    step, each running LIFE steps: x is never idle. The z request still starts within a few lifetimes
    (the x requests that arrived after it wait for it), and so do the later x requests after it."""
    load = Load(max_adapters=1)
    load.arrive("x0", "x")
    load.step()
    assert "x0" in load.started
    load.arrive("z", "z")
    for i in range(1, 40):
        load.arrive(f"x{i}", "x")
        load.step()
    # x0 and the x requests that joined while it ran (before it left) end; then z has its turn.
    assert "z" in load.started and load.started["z"] <= 2 + 2 * LIFE, load.started
    # No x request starves either: every one that arrived before the last few has run.
    assert all(f"x{i}" in load.started for i in range(30)), sorted(load.started)
    for _ in range(4 * LIFE):
        load.step()
    assert set(load.finished) == {"z", *(f"x{i}" for i in range(40))}


def test_places_go_to_waiting_adapters_in_arrival_order() -> None:
    """--max-loras 2 held by x and y; z, then w, then v arrive, and x and y keep getting new requests: z
    gets the first place that frees, w the next, v the one after; the base model's requests never wait."""
    load = Load(max_adapters=2)
    load.arrive("x0", "x")
    load.arrive("y0", "y")
    load.step()
    for name in ("z", "w", "v"):
        load.arrive(name, name)
    load.arrive("base", "")
    for i in range(1, 40):
        load.arrive(f"x{i}", "x")
        load.arrive(f"y{i}", "y")
        load.step()
    assert load.started["base"] == 2
    assert load.started["z"] <= load.started["w"] <= load.started["v"], load.started
    assert load.started["v"] <= 2 + 4 * LIFE, load.started
    for _ in range(8 * LIFE):
        load.step()
    assert not load.s.waiting and not load.s.running


def test_later_requests_still_join_an_adapter_while_an_older_one_holds_it() -> None:
    """Fairness costs no batching while it is not needed: a request of an adapter in use arriving after a
    waiting one still joins the step as long as a request older than the waiting one holds that adapter."""
    adapters = {"a": "x", "c": "z", "d": "x"}
    s: Scheduler[FakeWork] = Scheduler(
        FakePool(64), 64, max_adapters=1, adapter_of=lambda w: adapters[w.name]
    )
    a = add(s, "a", 4, group=1)
    run(s, s.schedule(None))
    c, d = add(s, "c", 4, group=2), add(s, "d", 4, group=3)
    plan = s.schedule(None)
    assert [w.name for w, _ in plan.chunks] == ["d"]  # a (older than c) holds x: d joins it
    run(s, plan)
    adapters["e"] = "x"
    e = add(s, "e", 4, group=4)
    s.remove(a)  # x's holder older than c leaves: d still holds x, but e waits behind c
    assert s.schedule(None).chunks == []
    s.remove(d)
    plan = s.schedule(None)
    assert [w.name for w, _ in plan.chunks] == ["c"]
    run(s, plan)
    s.remove(c)
    assert [w.name for w, _ in s.schedule(None).chunks] == ["e"]
    del e
