"""shard/core.py: admission (TGI's budgets for engines that do not schedule), endings, aborts, failures.

The engine here is a stand-in that holds request ids and gives every one the next id of a fixed list at
each step: the core's decisions are checked without a model. The real engines
under the core are tested in test_paged.py, test_engine.py and end to end.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import pytest

from shard.core import FINISH_EOS, FINISH_LENGTH, FINISH_NONE, FINISH_STOP, EngineCore, Limits
from shard.types import RequestFailure, RequestSpec, StepResult

pytestmark = pytest.mark.timeout(60)

EOS = 2


@dataclass
class Info:
    requires_padding: bool = False
    eos_token_ids: list[int] = field(default_factory=lambda: [EOS])


@dataclass
class Backend:
    info: Info


class FakeEngine:
    """Holds request ids; each step gives every held request ``tokens[i]`` (i: its step). New requests
    get their first token in the step after ``add`` (a self-scheduling engine takes them all at once)."""

    def __init__(self, padding: bool = False, chunked: bool = False, tokens: list[int] | None = None) -> None:
        self.backend = Backend(Info(requires_padding=padding))
        self.schedules_itself = chunked
        self.tokens = tokens or [10, 11, 12, 13, 14, 15, 16, 17]
        self.held: list[int] = []
        self.steps: dict[int, int] = {}
        self.prefills: list[list[int]] = []
        self.removed: list[list[int]] = []
        self.fail_next: Exception | None = None
        self.nan_rows: set[int] = set()

    def add(self, requests: list[RequestSpec]) -> list[RequestFailure]:
        self.prefills.append([r.id for r in requests])
        self.held += [r.id for r in requests]
        return []

    def remove(self, request_ids: Collection[int]) -> None:
        self.removed.append(list(request_ids))
        self.held = [rid for rid in self.held if rid not in set(request_ids)]

    def step(self) -> StepResult:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        bad = [rid for rid in self.held if rid in self.nan_rows]
        self.held = [rid for rid in self.held if rid not in self.nan_rows]
        out = []
        for rid in self.held:
            out.append(self.tokens[self.steps.get(rid, 0) % len(self.tokens)])
            self.steps[rid] = self.steps.get(rid, 0) + 1
        n = len(self.held)
        return StepResult(list(self.held), out, [-0.5] * n, failures=[RequestFailure(r, "NaN") for r in bad])

    def clear(self) -> None:
        self.held = []

    def stats(self) -> dict[str, int] | None:
        return None

    def num_waiting(self) -> int:
        return 0

    def adapters(self) -> tuple[list[str], list[str]]:
        return [], []

    def processor_names(self) -> list[str]:
        return []


def spec(rid: int, prompt: int = 4, new: int = 3, **kw: object) -> RequestSpec:
    return RequestSpec(rid, list(range(3, 3 + prompt)), max_new_tokens=new, **kw)  # type: ignore[arg-type]


def run(core: EngineCore) -> dict[int, tuple[list[int], int]]:
    """Steps until nothing is left: each request's tokens and finish reason."""
    out: dict[int, tuple[list[int], int]] = {}
    for _ in range(100):
        if not core.has_work():
            return out
        step = core.step()
        for rid, token, reason in zip(
            step.result.request_ids, step.result.token_ids, step.finish_reasons, strict=True
        ):
            tokens, _ = out.get(rid, ([], FINISH_NONE))
            out[rid] = ([*tokens, token], reason)
    raise AssertionError("the core never ran out of work")


def test_requests_end_on_their_length_and_the_engine_lets_them_go() -> None:
    engine = FakeEngine()
    core = EngineCore(engine)  # type: ignore[arg-type]
    core.add([spec(1, new=2), spec(2, new=4)])
    assert run(core) == {1: ([10, 11], FINISH_LENGTH), 2: ([10, 11, 12, 13], FINISH_LENGTH)}
    assert engine.held == [] and core.live == {}


def test_eos_and_stop_ids_end_a_request_once_min_new_tokens_are_out() -> None:
    engine = FakeEngine(tokens=[EOS, 7, EOS, 9])
    core = EngineCore(engine)  # type: ignore[arg-type]
    core.add(
        [
            spec(1, new=9),
            spec(2, new=9, min_new_tokens=2),
            spec(3, new=9, ignore_eos=True, stop_token_ids=(9,)),
        ]
    )
    ended = run(core)
    assert ended[1] == ([EOS], FINISH_EOS)
    assert ended[2] == ([EOS, 7, EOS], FINISH_EOS)
    assert ended[3] == ([EOS, 7, EOS, 9], FINISH_STOP)


def test_the_routers_eos_ids_count_only_where_the_model_declares_none() -> None:
    engine = FakeEngine(tokens=[5, 6])
    core = EngineCore(engine)  # type: ignore[arg-type]
    core.use_eos([6])
    core.add([spec(1, new=9)])
    assert run(core)[1] == ([5, 6, 5, 6, 5, 6, 5, 6, 5], FINISH_LENGTH)  # the model's own EOS (2) stays
    engine.backend.info.eos_token_ids = []
    core = EngineCore(engine)  # type: ignore[arg-type]
    core.use_eos([6])
    core.add([spec(2, new=9)])
    assert run(core)[2] == ([5, 6], FINISH_EOS)


def test_an_aborted_request_leaves_at_the_next_step() -> None:
    engine = FakeEngine()
    core = EngineCore(engine)  # type: ignore[arg-type]
    core.add([spec(1, new=9), spec(2, new=9)])
    core.step()
    core.abort([1])
    step = core.step()
    assert step.result.request_ids == [2]
    assert engine.held == [2] and engine.removed == [[1]]


def test_a_repeated_id_is_refused_alone() -> None:
    core = EngineCore(FakeEngine())  # type: ignore[arg-type]
    assert core.add([spec(1)]) == []
    refused = core.add([spec(1), spec(2)])
    assert [f.request_id for f in refused] == [1] and set(core.live) == {1, 2}


def test_a_failed_step_fails_its_requests_and_the_core_goes_on() -> None:
    engine = FakeEngine()
    core = EngineCore(engine)  # type: ignore[arg-type]
    core.add([spec(1, new=9), spec(2, new=9)])
    core.step()
    engine.fail_next = RuntimeError("boom")
    out = core.step()
    assert out.failed and sorted(f.request_id for f in out.result.failures) == [1, 2]
    assert "RuntimeError: boom" in out.result.failures[0].message
    assert core.live == {} and engine.held == []
    core.add([spec(3, new=2)])
    assert run(core) == {3: ([10, 11], FINISH_LENGTH)}


def test_with_several_ranks_a_failed_step_is_not_contained() -> None:
    engine = FakeEngine()
    core = EngineCore(engine, contain_failures=False)  # type: ignore[arg-type]
    core.add([spec(1, new=9)])
    engine.fail_next = RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        core.step()


def test_a_failed_row_leaves_alone() -> None:
    engine = FakeEngine()
    core = EngineCore(engine)  # type: ignore[arg-type]
    core.add([spec(1, new=5), spec(2, new=5)])
    core.step()
    engine.nan_rows = {1}
    out = core.step()
    assert [f.request_id for f in out.result.failures] == [1] and out.result.request_ids == [2]
    assert set(core.live) == {2}


def test_an_engine_that_schedules_itself_gets_every_request_at_once() -> None:
    engine = FakeEngine(chunked=True)
    core = EngineCore(engine, Limits(max_batch_prefill_tokens=4, max_batch_total_tokens=8))  # type: ignore[arg-type]
    core.add([spec(i, prompt=10, new=2) for i in range(5)])
    core.step()
    assert engine.prefills == [[0, 1, 2, 3, 4]]


# -- TGI's admission, for engines that do not schedule ------------------------------------------------
@pytest.mark.parametrize("padding", [False, True])
def test_arrival_order_within_the_prefill_budget(padding: bool) -> None:
    engine = FakeEngine(padding=padding)
    limits = Limits(max_batch_prefill_tokens=12 if not padding else 11, max_batch_total_tokens=10**6)
    core = EngineCore(engine, limits)  # type: ignore[arg-type]
    core.add([spec(1, prompt=4), spec(2, prompt=4), spec(3, prompt=4), spec(4, prompt=4)])
    core.step()
    # Unpadded: 4 + 4 + 4 = 12 fit. Padded: n x the longest prompt (4) <= 11 -> 2 requests.
    assert engine.prefills == ([[1, 2, 3]] if not padding else [[1, 2]])


def test_the_total_budget_counts_what_runs() -> None:
    engine = FakeEngine()
    limits = Limits(max_batch_prefill_tokens=100, max_batch_total_tokens=20, max_waiting_tokens=1)
    core = EngineCore(engine, limits)  # type: ignore[arg-type]
    core.add([spec(1, prompt=4, new=6), spec(2, prompt=4, new=6)])  # 10 tokens each: both fit
    core.add([spec(3, prompt=4, new=6)])
    core.step()
    assert engine.prefills == [[1, 2]]
    core.step()  # request 3 waits: 20 tokens are held
    assert engine.prefills == [[1, 2]]
    core.abort([1])
    core.step()
    assert engine.prefills == [[1, 2], [3]]


def test_waiting_requests_join_by_the_ratio_or_after_max_waiting_tokens() -> None:
    engine = FakeEngine()
    limits = Limits(max_batch_total_tokens=10**6, waiting_served_ratio=2.0, max_waiting_tokens=3)
    core = EngineCore(engine, limits)  # type: ignore[arg-type]
    core.add([spec(1, new=50), spec(2, new=50)])
    core.step()
    core.add([spec(3, new=50)])  # 1 waiting < 2 x 2 running: it waits for max_waiting_tokens steps
    core.step()
    core.step()
    assert engine.prefills == [[1, 2]]
    core.step()
    assert engine.prefills == [[1, 2], [3]]
    core.add([spec(i, new=50) for i in range(4, 10)])  # 6 waiting >= 2 x 3 running: they join at once
    core.step()
    assert engine.prefills[-1] == [4, 5, 6, 7, 8, 9]


def test_a_request_over_the_budgets_runs_alone_when_nothing_else_does() -> None:
    engine = FakeEngine()
    core = EngineCore(engine, Limits(max_batch_prefill_tokens=8, max_batch_total_tokens=10))  # type: ignore[arg-type]
    core.add([spec(1, prompt=6, new=20)])
    assert run(core)[1][1] == FINISH_LENGTH


def test_warmup_runs_to_the_end_and_leaves_nothing() -> None:
    engine = FakeEngine()
    core = EngineCore(engine)  # type: ignore[arg-type]
    core.warmup([spec(0, new=2), spec(1, new=2)])
    assert core.live == {} and engine.held == [] and not core.has_work()


def test_ended_requests_leave_the_engine_at_the_next_step_all_at_once() -> None:
    engine = FakeEngine()
    core = EngineCore(engine)  # type: ignore[arg-type]
    core.add([spec(1, new=1), spec(2, new=1), spec(3, new=5)])
    core.step()  # 1 and 2 end on their length
    assert engine.removed == [] and not core.handed - {3}
    core.engine.nan_rows = {3}
    out = core.step()
    assert engine.removed == [[1, 2]] and [f.request_id for f in out.result.failures] == [3]
    core.step()  # the engine let the failed row go itself: nothing more to remove
    assert engine.removed == [[1, 2]] and not core.has_work()
