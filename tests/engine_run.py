"""Drives a shard engine (shard/engine.py's ``StepEngine``) directly, without the engine core: requests
arrive at given steps and leave once they have their ``max_new_tokens``."""

from __future__ import annotations

from shard.engine import StepEngine
from shard.types import RequestSpec, StepResult


def collect(out: dict[int, list[int]], result: StepResult) -> None:
    for rid, token in zip(result.request_ids, result.token_ids, strict=True):
        out.setdefault(rid, []).append(token)


def run_engine(
    engine: StepEngine, arrivals: dict[int, list[RequestSpec]], max_steps: int = 1000
) -> dict[int, list[int]]:
    """Each request's tokens: ``arrivals[k]`` are added before step ``k``; a request leaves (``remove``)
    before the step after the one that gave its last token."""
    out: dict[int, list[int]] = {}
    held: dict[int, RequestSpec] = {}
    for k in range(max_steps):
        done = [rid for rid, r in held.items() if len(out.get(rid, [])) >= r.max_new_tokens]
        if done:
            engine.remove(done)
            for rid in done:
                del held[rid]
        new = arrivals.get(k, [])
        if new:
            assert engine.add(new) == []
            held.update((r.id, r) for r in new)
        if not held and all(step <= k for step in arrivals):
            return out
        result = engine.step()
        assert not result.failures, result.failures
        collect(out, result)
    raise AssertionError(f"the engine did not finish in {max_steps} steps")
