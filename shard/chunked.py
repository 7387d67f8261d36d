"""The engine for backends that run decodes and prompt chunks in one step (the paged backend).

A prompt does not have to run whole, at once, while every running stream waits: ``Prefill`` registers
new requests and, when nothing else is running, runs their prompts at once; otherwise their prompts run
in chunks inside the following ``Decode`` steps, beside the running streams, under a token budget that
keeps each step within about twice the cost of a plain decode step (``StepCosts``). A request whose prompt is complete
gets its first token in that step and joins the running batch. Until then the router sees it in the
cached batch's request ids, without a token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .backends.base import PrefillOutput
from .backends.paged import Chunk, PagedBackend, PagedState
from .batch import Batch, UnknownRequestError
from .engine import Cached, Engine, UnknownBatchError
from .faults import Faults
from .paged.kv_cache import Sequence
from .processors import Processors
from .types import RequestSpec, StepResult

# Prompt tokens a step can take "for free" beside its decodes: below this many tokens a step costs about
# one read of the weights, whatever it computes. The floor of every chunk budget.
FREE_TOKENS = {"cpu": 16, "cuda": 256}
EWMA = 0.3


class StepCosts:
    """What steps cost here, learnt from the steps themselves: a decode step's seconds, and the seconds
    one more prompt token adds to a step. Chunks are then sized so that a step with a chunk takes about
    twice a plain decode step: running streams keep at least half their pace, and prompts go as fast as
    that allows, on any device."""

    def __init__(self, free_tokens: int) -> None:
        self.free_tokens = free_tokens
        self.decode_s: float | None = None
        self.token_s: float | None = None

    def budget(self, decoding: int) -> int | None:
        """Prompt tokens for a step beside ``decoding`` running rows; None = no limit (nobody waits)."""
        if decoding == 0:
            return None
        if self.decode_s is None or self.token_s is None:
            return max(decoding, 2 * self.free_tokens - decoding)
        return max(self.free_tokens, int(self.decode_s / self.token_s))

    def observe(self, seconds: float, decoding: int, prompt_tokens: int) -> None:
        if prompt_tokens == 0:
            if decoding:
                self.decode_s = _ewma(self.decode_s, seconds)
            return
        extra = seconds - (self.decode_s or 0.0) if decoding else seconds
        if extra > 0:
            self.token_s = _ewma(self.token_s, extra / prompt_tokens)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new


@dataclass
class Pending:
    """Requests sharing one prompt (the n samples of a request share its prefill) still running it."""

    batch_id: int
    requests: list[RequestSpec]
    seq: Sequence
    want_logits: bool
    # KV tokens its requests may grow to (prompt + max_new_tokens each).
    max_tokens: int
    prompt_logits: list[torch.Tensor] = field(default_factory=list)

    @property
    def remaining(self) -> int:
        return len(self.seq.tokens) - self.seq.computed


def concat_results(results: list[StepResult]) -> StepResult:
    """One step's results side by side (top alternatives padded to the widest)."""
    results = [r for r in results if r.request_ids]
    if not results:
        return StepResult([], [], [])
    if len(results) == 1:
        return results[0]
    width = max(r.top_n for r in results)
    top_ids: list[int] = []
    top_logprobs: list[float] = []
    for r in results:
        pad = width - r.top_n
        for row in range(len(r.request_ids)):
            top_ids += r.top_ids[row * r.top_n : (row + 1) * r.top_n] + [0] * pad
            top_logprobs += r.top_logprobs[row * r.top_n : (row + 1) * r.top_n] + [float("-inf")] * pad
    return StepResult(
        request_ids=[i for r in results for i in r.request_ids],
        token_ids=[t for r in results for t in r.token_ids],
        logprobs=[x for r in results for x in r.logprobs],
        top_n=width,
        top_ids=top_ids,
        top_logprobs=top_logprobs,
        prefill=[p for r in results for p in r.prefill],
        failures=[f for r in results for f in r.failures],
    )


class ChunkedEngine(Engine):
    backend: PagedBackend
    chunked_prefill = True

    def __init__(
        self, backend: PagedBackend, faults: Faults | None = None, processors: Processors | None = None
    ) -> None:
        super().__init__(backend, faults, processors)
        self.pending: list[Pending] = []
        self.costs = StepCosts(FREE_TOKENS.get(backend.device.type, 16))

    # -- the protocol -----------------------------------------------------------------------------
    def prefill(self, batch_id: int, requests: list[RequestSpec], max_tokens: int) -> StepResult:
        if not requests:
            raise ValueError("a prefill batch needs at least one request")
        self.faults.before_step(requests)
        requests, refused = self._admit(requests)
        groups: dict[tuple[int, ...], list[RequestSpec]] = {}
        for r in requests:
            groups.setdefault(tuple(r.input_ids), []).append(r)
        added: list[Pending] = []
        try:
            for prompt, members in groups.items():
                want = any(r.prefill_logprobs for r in members)
                seq = self.backend.open(list(prompt), want)
                tokens = sum(len(r.input_ids) + r.max_new_tokens for r in members)
                added.append(Pending(batch_id, members, seq, want, tokens))
        except BaseException:
            for p in added:
                self.backend.cache.release(p.seq)
            raise
        self.pending.extend(added)
        if self.batches or not added:  # streams are running: the prompts run in chunks beside them
            return StepResult([], [], [], failures=refused)
        result = self._step(batch_id, None)[0]
        result.failures += refused
        return result

    def decode(self, wanted: list[tuple[int, list[int]]]) -> tuple[StepResult, Cached | None]:
        pending_ids = {r.id: p for p in self.pending for r in p.requests}
        known = set(self.batches) | {p.batch_id for p in self.pending}
        wanted = [(bid, ids) for bid, ids in wanted if ids or bid in known]
        missing = [bid for bid, _ in wanted if bid not in known]
        if missing:
            raise UnknownBatchError(f"no cached batch {missing}")
        if not wanted:
            return StepResult([], [], []), None
        target = wanted[0][0]
        keep_pending: set[int] = set()
        kept: list[Batch] = []
        popped = [(self.batches.pop(bid, None), bid, ids) for bid, ids in wanted]
        try:
            for old, bid, ids in popped:
                running = [rid for rid in ids if rid not in pending_ids or pending_ids[rid].batch_id != bid]
                keep_pending.update(rid for rid in ids if rid not in running)
                if old is None:
                    if running:
                        raise UnknownRequestError(f"batch {bid} holds no request {running}")
                    continue
                batch = old.select(running, self.backend)
                if batch is not None:
                    kept.append(batch)
            self._cut_pending({bid for _, bid, _ in popped}, keep_pending, target)
            merged = Batch.concatenate(kept, self.backend) if kept else None
            if merged is not None:
                merged.id = target
        except BaseException:
            for b in [*kept, *(old for old, _, _ in popped if old is not None)]:
                self.backend.release(b.state)
            raise
        return self._step(target, merged)

    def clear(self, batch_id: int | None = None) -> None:
        super().clear(batch_id)
        for p in [p for p in self.pending if batch_id is None or p.batch_id == batch_id]:
            self.backend.cache.release(p.seq)
            self.pending.remove(p)

    # -- one step ---------------------------------------------------------------------------------
    def _cut_pending(self, batch_ids: set[int], keep: set[int], target: int) -> None:
        """Drops pending requests of these batches that the router no longer wants; moves the rest into
        the merged batch ``target``."""
        for p in list(self.pending):
            if p.batch_id not in batch_ids:
                continue
            p.requests = [r for r in p.requests if r.id in keep]
            if not p.requests:
                self.backend.cache.release(p.seq)
                self.pending.remove(p)
            else:
                p.batch_id = target

    def _step(self, target: int, batch: Batch | None) -> tuple[StepResult, Cached | None]:
        """Decodes ``batch`` (if any) and runs the next chunks of batch ``target``'s pending prompts in
        the same forward; prompts that complete get their first token and join the batch."""
        mine = [p for p in self.pending if p.batch_id == target]
        decoding = len(batch) if batch is not None else 0
        budget = self.costs.budget(decoding)
        if budget is not None:  # timings differ between ranks; their chunk plans must not
            budget = self.backend.parallel.agree(budget)
        plan: list[tuple[Pending, int]] = []
        for p in mine:
            take = p.remaining if budget is None else min(p.remaining, budget)
            if take <= 0:
                break
            plan.append((p, take))
            if budget is not None:
                budget -= take
        requests = [r for p, _ in plan for r in p.requests] + (batch.requests if batch is not None else [])
        try:
            self.faults.before_step(requests)
            chunks = [Chunk(p.seq, take, p.want_logits) for p, take in plan]
            if batch is None and not chunks:
                return StepResult([], [], []), self._cached(target, None)
            started = time.perf_counter()
            decode_logits, chunk_logits = self.backend.step(
                batch.state if batch is not None else None,
                batch.next_ids if batch is not None else None,
                chunks,
            )
            self.costs.observe(time.perf_counter() - started, decoding, sum(c.length for c in chunks))
            results: list[StepResult] = []
            if batch is not None:
                logits = self.faults.poison(batch.requests, decode_logits)
                choice = batch.sampler.choose(logits, batch.history)
                batch.history.append(choice.ids)
                batch.next_ids = choice.ids
                result, batch = self._drop_failed(batch, self._result(batch, choice), logits, choice)
                results.append(result)
        except BaseException:
            if batch is not None:
                self.backend.release(batch.state)
            for p in mine:
                self.backend.cache.release(p.seq)
                self.pending.remove(p)
            raise
        joined = [batch] if batch is not None else []
        for (p, _), logits in zip(plan, chunk_logits, strict=True):
            if p.want_logits:
                p.prompt_logits.append(logits)
            if p.remaining:
                continue
            self.pending.remove(p)
            new, result = self._start(target, p.requests, self._output(p, logits), p.max_tokens)
            results.append(result)
            if new is not None:
                joined.append(new)
        merged = Batch.concatenate(joined, self.backend) if joined else None
        if merged is not None:
            merged.id = target
            self.batches[target] = merged
        return concat_results(results), self._cached(target, merged)

    def _output(self, p: Pending, logits: torch.Tensor) -> PrefillOutput:
        """The finished prompt as a prefill's output, one row per request (the n samples fork)."""
        n = len(p.requests)
        state = PagedState([p.seq])
        if n > 1:
            state = self.backend.select(state, torch.zeros(n, dtype=torch.long))
        prompt = torch.cat(p.prompt_logits) if p.want_logits else None
        wants = [r.prefill_logprobs for r in p.requests]
        return PrefillOutput(state, logits[-1:].expand(n, -1), [prompt if want else None for want in wants])

    def cached(self, batch_id: int) -> Cached | None:
        return self._cached(batch_id, self.batches.get(batch_id))

    def _cached(self, batch_id: int, batch: Batch | None) -> Cached | None:
        waiting = [r.id for p in self.pending if p.batch_id == batch_id for r in p.requests]
        if batch is None and not waiting:
            return None
        running = batch.request_ids if batch is not None else []
        max_tokens = batch.max_tokens if batch is not None else 0
        max_tokens += sum(p.max_tokens for p in self.pending if p.batch_id == batch_id)
        return Cached(batch_id, running + waiting, max_tokens)
