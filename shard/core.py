"""The engine core: requests in, steps run one after another, tokens and endings out.

The router adds requests and aborts them (proto ``Generate``); from then on the core owns them. Each
``step`` hands waiting requests to the engine, runs one step of it, and decides how each request that got
a token ends (its length, an end-of-sequence id, one of its stop token ids: ``Ending``), so the router
never has to tell the shard what to keep. Admission, abort, failure and finishing are written here once,
for every engine:

- the paged engine (``ChunkedEngine``) schedules for itself (``shard.scheduler``: KV blocks, step budget,
  preemption), so every waiting request is handed to it at once;
- engines that run whole prompts and keep their own KV (transformers, CTranslate2) get waiting requests by
  TGI's rule: a prefill batch within ``max_batch_prefill_tokens`` and, with what already runs, within
  ``max_batch_total_tokens`` (a padded backend pays ``(n + 1) x the longest prompt``), joining a running
  batch once ``waiting_served_ratio`` x the running count wait or ``max_waiting_tokens`` steps passed.

Requests that end (their length, EOS, a stop id, an abort) leave the engine at the start of the next step,
all at once (``StepEngine.remove``): the core is the one place that knows which requests are alive.

Failures: a request whose own row fails (non-finite logits) leaves alone; a step that raises fails every
request the engine holds (``Output.failed``) and the engine drops them all; the core goes on.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from .engine import StepEngine
from .faults import is_fatal
from .types import RequestFailure, RequestSpec, StepResult

log = logging.getLogger(__name__)

# Steps the warm-up may take (its requests ask for 2 tokens each).
WARMUP_STEPS = 1000
# Finish reasons (proto FinishReason).
FINISH_NONE, FINISH_LENGTH, FINISH_EOS, FINISH_STOP = 0, 1, 2, 3
# A row past its request's end within one step (speculation): dropped from the step's output.
AFTER_END = -1


@dataclass(frozen=True)
class Limits:
    """TGI's batching flags, for engines that do not schedule for themselves."""

    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int = 16000
    waiting_served_ratio: float = 1.2
    max_waiting_tokens: int = 20


@dataclass(slots=True)
class Ending:
    """What ends one request: its length, and the ids that end it once ``min_new_tokens`` are out."""

    spec: RequestSpec
    eos_ids: frozenset[int]
    stop_ids: frozenset[int]
    generated: int = 0

    def push(self, token_id: int) -> int:
        """Counts one generated token; returns the finish reason it brings (FINISH_NONE: it goes on)."""
        self.generated += 1
        spec = self.spec
        if self.generated >= spec.max_new_tokens:
            return FINISH_LENGTH
        if self.generated < spec.min_new_tokens:
            return FINISH_NONE
        if token_id in self.eos_ids:
            return FINISH_EOS
        if token_id in self.stop_ids:
            return FINISH_STOP
        return FINISH_NONE


@dataclass
class Output:
    """One step: its result (tokens, failures) and each row's finish reason; the queue after it."""

    result: StepResult
    finish_reasons: list[int]
    total_ns: int = 0
    # The engine's calls within the step (forward and sampling).
    forward_ns: int = 0
    joined: int = 0
    max_tokens: int = 0
    waiting: int = 0
    running: int = 0
    prefill: bool = False
    failed: bool = False
    cache: dict[str, int] | None = field(default=None)
    # The LoRA adapters of the running and of the waiting requests, each once.
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)


class EngineCore:
    """Owns the shard's requests from ``add`` until they end, and runs the engine's steps."""

    def __init__(
        self, engine: StepEngine, limits: Limits | None = None, contain_failures: bool = True
    ) -> None:
        """``contain_failures``: a failed step fails its requests and the core goes on (one rank); else
        (several ranks, whose group a failed step may have left out of step) the error propagates."""
        self.engine = engine
        self.contain_failures = contain_failures
        self.limits = limits or Limits()
        self.schedules_itself = engine.schedules_itself
        self.requires_padding = engine.backend.info.requires_padding
        self.eos_ids = frozenset(engine.backend.info.eos_token_ids)
        # Requests alive, by id (added, not ended, not aborted).
        self.live: dict[int, Ending] = {}
        # Requests not yet handed to the engine, in arrival order.
        self.waiting: deque[RequestSpec] = deque()
        # Live requests the engine holds; and those it holds that have ended since the last step: they
        # leave the engine (with their memory) at the start of the next one, all at once.
        self.handed: set[int] = set()
        self._gone: list[int] = []
        self._waiting_steps = 0
        # Tokens the live requests may grow to (prompt + max_new_tokens each).
        self._max_tokens = 0

    # -- requests in ------------------------------------------------------------------------------
    def use_eos(self, ids: list[int]) -> None:
        """The router's end-of-sequence ids, for a model whose configuration declares none."""
        if not self.eos_ids:
            self.eos_ids = frozenset(ids)

    def add(self, requests: list[RequestSpec]) -> list[RequestFailure]:
        """Queues new requests; a repeated id is refused alone."""
        refused = []
        for r in requests:
            if r.id in self.live:
                refused.append(RequestFailure(r.id, f"request id {r.id} is already running"))
                continue
            eos = frozenset() if r.ignore_eos else self.eos_ids
            self.live[r.id] = Ending(r, eos, frozenset(r.stop_token_ids))
            self._max_tokens += len(r.input_ids) + r.max_new_tokens
            self.waiting.append(r)
        return refused

    def abort(self, request_ids: list[int]) -> None:
        """Ends these requests now; the engine drops them (and their memory) at its next step."""
        gone = {rid for rid in request_ids if self._end(rid)}
        if gone and self.waiting:
            self.waiting = deque(r for r in self.waiting if r.id not in gone)

    def has_work(self) -> bool:
        """Whether a step has something to do: requests alive, or ended ones to let go of."""
        return bool(self.live) or bool(self._gone)

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> Output:
        """Lets ended requests go, hands waiting requests to the engine and runs one of its steps."""
        started = time.perf_counter_ns()
        idle = not self.handed
        joining = self._admit(idle)
        engine_started = time.perf_counter_ns()
        try:
            if self._gone:
                self.engine.remove(self._gone)
                self._gone = []
            self.handed.update(r.id for r in joining)
            refused = self.engine.add(joining) if joining else []
            for failure in refused:
                self.handed.discard(failure.request_id)
            result = self.engine.step()
        except Exception as e:
            return self._failed(e, started)
        forward_ns = time.perf_counter_ns() - engine_started
        result.failures += refused
        out = self._finish(result)
        out.prefill = idle
        out.joined = len(joining)
        out.forward_ns = forward_ns
        out.total_ns = time.perf_counter_ns() - started
        self._count(out)
        return out

    def warmup(self, requests: list[RequestSpec]) -> None:
        """Runs requests to their end before serving (nothing else may be running)."""
        self.add(requests)
        for _ in range(WARMUP_STEPS):
            if not self.live:
                break
            out = self.step()
            if out.failed or out.result.failures:
                raise RuntimeError(f"warm-up failed: {out.result.failures[0].message}")
        if self.live:
            raise RuntimeError(f"warm-up did not finish in {WARMUP_STEPS} steps")
        self.clear()

    def clear(self) -> None:
        """Drops every request and every batch of the engine."""
        self.live.clear()
        self._max_tokens = 0
        self.waiting.clear()
        self.handed.clear()
        self._gone = []
        self.engine.clear()

    # -- inside ------------------------------------------------------------------------------------
    def _end(self, rid: int) -> bool:
        """``rid`` leaves the live requests (whatever ended it); False if it was not live."""
        ending = self.live.pop(rid, None)
        if ending is None:
            return False
        self._max_tokens -= len(ending.spec.input_ids) + ending.spec.max_new_tokens
        if rid in self.handed:
            self.handed.discard(rid)
            self._gone.append(rid)
        return True

    def _admit(self, idle: bool) -> list[RequestSpec]:
        """The waiting requests the engine takes now (see the module docstring)."""
        if not self.waiting:
            return []
        if self.schedules_itself:
            joining = list(self.waiting)
            self.waiting.clear()
            return joining
        limits = self.limits
        min_size = None
        if not idle:
            self._waiting_steps += 1
            running = len(self.handed)
            if self._waiting_steps < limits.max_waiting_tokens:
                min_size = int(running * limits.waiting_served_ratio)
                if len(self.waiting) < min_size:
                    return []
        taken = self._fit(min_size, limits.max_batch_total_tokens - self._held_tokens())
        if not taken and idle:
            # Nothing runs and the first request is larger than the budgets: it runs alone (the router
            # admits nothing that exceeds --max-total-tokens, so the budgets were set below it).
            taken = [self.waiting.popleft()]
        if taken:
            self._waiting_steps = 0
        return taken

    def _fit(self, min_size: int | None, token_budget: int) -> list[RequestSpec]:
        """Pops the longest prefix of the waiting requests that fits the budgets (TGI's next_batch);
        nothing when fewer than ``min_size`` fit."""
        taken: list[RequestSpec] = []
        prefill = decode = longest = 0
        for r in self.waiting:
            prompt = len(r.input_ids)
            if self.requires_padding:
                longest = max(longest, prompt)
                next_prefill = (len(taken) + 1) * longest
            else:
                next_prefill = prefill + prompt
            next_decode = decode + r.max_new_tokens
            if (
                next_prefill > self.limits.max_batch_prefill_tokens
                or next_prefill + next_decode > token_budget
            ):
                break
            taken.append(r)
            prefill, decode = next_prefill, next_decode
        if not taken or (min_size is not None and len(taken) < min_size):
            return []
        for _ in taken:
            self.waiting.popleft()
        return taken

    def _held_tokens(self) -> int:
        """Tokens the running requests hold (padded backends: every row as long as the longest)."""
        rows = [self.live[rid] for rid in self.handed]
        if not rows:
            return 0
        if self.requires_padding:
            longest = max(len(e.spec.input_ids) + e.generated for e in rows)
            remaining = sum(e.spec.max_new_tokens - e.generated for e in rows)
            return len(rows) * longest + remaining
        return sum(len(e.spec.input_ids) + e.spec.max_new_tokens for e in rows)

    def _finish(self, result: StepResult) -> Output:
        """Each row's finish reason; ended and failed requests leave."""
        live = self.live
        for failure in result.failures:  # the engine has let them go already
            self.handed.discard(failure.request_id)
            self._end(failure.request_id)
        reasons = []
        # Requests that ended at an earlier row of this step: a speculative step gives a request several
        # rows, and the tokens after its end are not its own.
        ended: set[int] = set()
        for rid, token_id in zip(result.request_ids, result.token_ids, strict=True):
            ending = live.get(rid)
            reason = FINISH_NONE if ending is None else ending.push(token_id)
            if reason:
                self._end(rid)
                ended.add(rid)
            elif ending is None and rid in ended:
                reason = AFTER_END
            reasons.append(reason)
        if AFTER_END in reasons:
            keep = [row for row, reason in enumerate(reasons) if reason != AFTER_END]
            result = result.take(keep)
            reasons = [reasons[row] for row in keep]
        return Output(result, reasons)

    def _count(self, out: Output) -> None:
        waiting = len(self.waiting) + self.engine.num_waiting()
        out.waiting = waiting
        out.running = max(len(self.live) - waiting, 0)
        out.max_tokens = self._max_tokens
        out.cache = self.engine.stats()
        out.running_adapters, out.waiting_adapters = self.engine.adapters()
        for r in self.waiting:  # not handed to the engine yet
            if r.adapter_id and r.adapter_id not in out.waiting_adapters:
                out.waiting_adapters.append(r.adapter_id)

    def _failed(self, error: Exception, started: int) -> Output:
        """A step that raised: every request the engine holds fails, and the engine drops them all."""
        if is_fatal(error) or not self.contain_failures:
            raise error
        log.exception("Step failed")
        message = f"{type(error).__name__}: {error}"
        ids = sorted(self.handed)
        for rid in ids:
            self._end(rid)
        self._gone = []
        self.engine.clear()
        out = Output(StepResult([], [], []), [], failed=True)
        out.result.failures = [RequestFailure(rid, message) for rid in ids]
        out.total_ns = time.perf_counter_ns() - started
        self._count(out)
        return out
