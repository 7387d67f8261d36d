"""The engine of backends that run decodes and prompt chunks in one step (the paged backend).

``add`` hands new requests to the scheduler (``shard.scheduler``), which decides every step what runs:
the running sequences' next tokens, and the next chunks of waiting prompts in the same forward, under a
token budget that keeps a step within about twice the cost of a plain decode step (``StepCosts``) and
under the KV blocks the pool has. When blocks run out, the scheduler preempts the running sequence of
lowest priority: its blocks go back and it recomputes its tokens later, picking up where it was (its
sampling state waits in ``Job.resume``). A request whose prompt is complete gets its first token in that
step and joins the running batch.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .backends.base import PrefillOutput
from .backends.paged import Chunk, PagedBackend, PagedState, open_sequence
from .batch import Batch
from .engine import Engine, admit
from .faults import Faults
from .paged.kv_cache import PagedKVCache, Sequence
from .paged.lora import AdapterError, adapter_salt
from .processors import Processors
from .scheduler import Plan, Scheduler
from .speculation import Acceptance, NgramIndex, Verified, accept, pays
from .types import RequestFailure, RequestSpec, StepResult

# Prompt tokens a step can take "for free" beside its decodes: below this many tokens a step costs about
# one read of the weights, whatever it computes. The floor of every chunk budget.
FREE_TOKENS = {"cpu": 16, "cuda": 256}
EWMA = 0.3
# How many times the plain budget a step may take while many more requests wait than run.
MAX_BUDGET_SCALE = 8
# Prompt tokens of a step that decodes nothing (TGI's --max-batch-prefill-tokens default).
PREFILL_TOKENS = 4096
# Most draft tokens a running sequence feeds in one step (--speculate; 0: no speculation).
SPECULATE = 8


class StepCosts:
    """What steps cost here, learnt from the steps themselves: the seconds of a step's decodes, and the
    seconds one prompt token adds to a step. Chunks are then sized so that a step with a chunk takes about
    twice a plain decode step: running streams keep at least half their pace, and prompts go as fast as
    that allows, on any device.

    A step costs about ``decode_s + token_s * prompt_tokens``. ``token_s`` is measured cleanly on steps
    that decode nothing (the warm-up's, an idle server's first prompts); ``decode_s`` on every step, as
    what is left of it once its prompt tokens are paid for. Under steady load nearly every step carries a
    chunk and the decodes grow dearer as contexts lengthen: learning ``decode_s`` from plain decode steps
    alone left it at its early, cheap value, charged the growth to the prompt tokens and shrank every
    budget to the floor, so arriving users queued for seconds behind a few tokens a step."""

    def __init__(self, free_tokens: int) -> None:
        self.free_tokens = free_tokens
        self.decode_s: float | None = None
        self.token_s: float | None = None
        # Whether token_s was measured on a step without decodes (else it is inferred, and provisional).
        self._token_s_measured = False

    def budget(self, decoding: int, waiting: int = 0) -> int | None:
        """Prompt tokens for a step beside ``decoding`` running rows while ``waiting`` requests wait; None
        = no limit (nobody decodes).

        The step takes about twice its decodes while at most as many wait as run. When more wait (a
        crowd arriving, or many preempted sequences to recompute while few run) the budget grows with
        their ratio, up to ``MAX_BUDGET_SCALE`` times: the few running streams slow down so that the many
        waiting ones are not left to start a few tokens a step (recomputing a thousand preempted
        sequences at 16 tokens a step took minutes while the pool stood empty)."""
        if decoding == 0:
            return None
        step_tokens = self.step_tokens()
        if step_tokens is None:
            return max(decoding, 2 * self.free_tokens - decoding)
        scale = min(max(waiting / decoding, 1.0), MAX_BUDGET_SCALE)
        return max(self.free_tokens, int(step_tokens * scale))

    def step_tokens(self) -> int | None:
        """How many prompt tokens cost what a step's decodes do (None until both are measured)."""
        if self.decode_s is None or self.token_s is None:
            return None
        return int(self.decode_s / self.token_s)

    def observe(self, seconds: float, decoding: int, prompt_tokens: int) -> None:
        if not decoding:
            if prompt_tokens:
                self.token_s = _ewma(
                    self.token_s if self._token_s_measured else None, seconds / prompt_tokens
                )
                self._token_s_measured = True
            return
        if not prompt_tokens:
            self.decode_s = _ewma(self.decode_s, seconds)
        elif self._token_s_measured:
            assert self.token_s is not None
            self.decode_s = _ewma(self.decode_s, max(seconds - self.token_s * prompt_tokens, 0.0))
        else:  # no clean measure yet: charge the prompt tokens what the step cost over its decodes
            extra = seconds - (self.decode_s or 0.0)
            if extra > 0:
                self.token_s = _ewma(self.token_s, extra / prompt_tokens)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA) * old + EWMA * new


@dataclass(eq=False)
class Job:
    """One request on this shard, from ``add`` until it leaves: the scheduler's ``Work``."""

    request: RequestSpec
    # What it runs when it (re)starts: its prompt, or, after a preemption, every token it had fed.
    tokens: list[int]
    key: tuple[int, int, int]
    share: int
    want_logits: bool
    seq: Sequence | None = None
    running: bool = False
    # A preempted request's batch row (sampling state, history, the token it feeds next): it rejoins the
    # running batch with it once its tokens are recomputed, without sampling again.
    resume: Batch | None = None
    prompt_logits: list[torch.Tensor] = field(default_factory=list)
    # Speculation: its text so far, indexed for draft lookup (built when it first may draft), and the
    # share of its drafts accepted.
    ngram: NgramIndex | None = None
    acceptance: Acceptance = field(default_factory=Acceptance)

    @property
    def opened(self) -> bool:
        return self.seq is not None

    @property
    def sequence(self) -> Sequence:
        """Its sequence, once opened (the scheduler opens every request it gives a chunk)."""
        assert self.seq is not None, "the request has no sequence"
        return self.seq

    @property
    def num_tokens(self) -> int:
        seq = self.seq
        if seq is None:
            return len(self.tokens)
        return len(seq.tokens) + 1 if self.running else len(seq.tokens)

    @property
    def num_computed(self) -> int:
        return 0 if self.seq is None else self.seq.computed

    @property
    def num_blocks(self) -> int:
        return 0 if self.seq is None else len(self.seq.blocks)


def _adapter_of(job: Job) -> str:
    return job.request.adapter_id


class CachePool:
    """The scheduler's ``Pool`` over the paged KV cache."""

    def __init__(self, cache: PagedKVCache, long_rope_from: int | None = None) -> None:
        self.cache = cache
        self.long_rope_from = long_rope_from  # LongRoPE's switch (``open_sequence``), or None
        self.block_size = cache.block_size
        self.window = cache.window

    def num_free(self) -> int:
        return self.cache.allocator.num_free

    def open(self, job: Job) -> None:
        # A preempted request needs no prompt logits: they were sent already.
        r = job.request
        salt = adapter_salt(r.cache_salt, r.adapter_id)
        job.seq = open_sequence(self.cache, job.tokens, not job.want_logits, salt, self.long_rope_from)
        job.seq.adapter = r.adapter_id

    def release(self, job: Job) -> None:
        seq = job.seq
        if seq is None:
            return
        if job.running:  # it recomputes what it had fed; nothing else shares that
            job.tokens = list(seq.tokens)
            job.want_logits = False
            job.share = -1 - job.request.id
        self.cache.release(seq)
        job.seq = None
        job.prompt_logits = []

    def slide(self, job: Job) -> None:
        if job.seq is not None:
            self.cache.slide(job.seq)


class ChunkedEngine(Engine):
    """Every request it holds is the scheduler's: each step runs what ``Scheduler.schedule`` plans."""

    backend: PagedBackend
    schedules_itself = True

    def __init__(
        self,
        backend: PagedBackend,
        faults: Faults | None = None,
        processors: Processors | None = None,
        prefill_tokens: int = PREFILL_TOKENS,
        speculate: int = SPECULATE,
    ) -> None:
        """``speculate``: most draft tokens per running sequence and step (``shard.speculation``)."""
        super().__init__(backend, faults, processors)
        self.prefill_tokens = prefill_tokens
        self.speculate = speculate
        # Draft tokens fed and accepted, since start.
        self.drafted = 0
        self.accepted = 0
        self.costs = StepCosts(FREE_TOKENS.get(backend.device.type, 16))
        self.scheduler: Scheduler[Job] = Scheduler(
            CachePool(backend.cache, backend.long_rope_from),
            backend.cache.allocator.num_blocks,
            backend.max_loras,
            _adapter_of,
        )
        self.jobs: dict[int, Job] = {}

    # -- the protocol -----------------------------------------------------------------------------
    def add(self, requests: list[RequestSpec]) -> list[RequestFailure]:
        admitted, refused = admit(self.processors, requests, self.backend.adapters)
        for r in admitted:
            group = r.group or r.id
            job = Job(
                r,
                list(r.input_ids),
                (self.scheduler.rank(group), group, r.id),
                hash((tuple(r.input_ids), r.cache_salt, r.adapter_id)),
                r.prefill_logprobs,
            )
            self.jobs[r.id] = job
            self.scheduler.add(job)
        return refused

    def remove(self, request_ids: Collection[int]) -> None:
        in_batch = set()
        for rid in request_ids:
            job = self.jobs.get(rid)
            if job is not None:
                if job.running:
                    in_batch.add(rid)
                self._leave(job)
        if in_batch:
            self.batch = self._without(self.batch, in_batch)

    def clear(self) -> None:
        super().clear()
        for job in list(self.jobs.values()):
            self._leave(job)

    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def update_lora(self, name: str, path: str, unload: bool) -> tuple[str, ...]:
        """Loads (``path``: a local PEFT directory) or unloads the adapter ``name`` between steps; returns
        the adapters loaded after. An adapter a live request uses is not unloaded (``AdapterError``)."""
        if unload:
            users = sum(1 for job in self.jobs.values() if job.request.adapter_id == name)
            if users:
                raise AdapterError(
                    f"adapter {name!r} is in use by {users} live request(s); unload it once they end"
                )
            self.backend.remove_adapter(name)
        else:
            self.backend.add_adapter(name, Path(path))
        return tuple(self.backend.adapters)

    def adapters(self) -> tuple[list[str], list[str]]:
        """The adapters of its requests: running (decoding, or their prompt under way) and waiting."""
        if not self.backend.adapters:  # nothing to look for (and no loop over the requests every step)
            return [], []
        running: dict[str, None] = {}
        waiting: dict[str, None] = {}
        for job in self.jobs.values():
            if job.request.adapter_id:
                (running if job.running or job.opened else waiting)[job.request.adapter_id] = None
        return list(running), list(waiting)

    def stats(self) -> dict[str, int]:
        return {
            **self.backend.stats(),
            "preemptions": self.scheduler.num_preemptions,
            "speculative_drafted": self.drafted,
            "speculative_accepted": self.accepted,
        }

    def _leave(self, job: Job) -> None:
        """``job`` leaves the shard: out of the scheduler, its blocks back to the pool."""
        if self.jobs.pop(job.request.id, None) is None:
            return
        self.scheduler.remove(job)
        if job.seq is not None:
            self.backend.cache.release(job.seq)
            job.seq = None

    def _forget(self, request_ids: list[int]) -> None:
        """Requests that left the running batch (whose ``select`` gave their blocks back)."""
        for rid in request_ids:
            job = self.jobs.get(rid)
            if job is not None:
                self._leave(job)

    # -- one step ---------------------------------------------------------------------------------
    def step(self) -> StepResult:
        """Decodes the running batch (if any) and runs the prompt chunks the scheduler picks in the same
        forward; prompts that complete get their first token and join the batch."""
        decoding = len(self.batch) if self.batch is not None else 0
        budget = self.costs.budget(decoding, self.scheduler.num_waiting)
        if budget is None:
            budget = self.prefill_tokens
        budget = self.backend.parallel.agree(budget)  # timings differ between ranks; plans must not
        plan = self.scheduler.schedule(budget)
        results = self._apply(plan)
        batch = self.batch
        decoding = len(batch) if batch is not None else 0
        chunks = plan.chunks
        if self.faults.enabled:
            self.faults.before_step([j.request for j, _ in chunks] + (batch.requests if batch else []))
        for job, take in chunks:
            self.backend.cache.reserve(job.sequence, job.sequence.computed + take)
        if batch is None and not chunks:
            return StepResult.join(results)
        prompt_tokens = sum(t for _, t in chunks)
        drafts = None
        if batch is not None and self.speculate and not self.faults.enabled:
            # Timings differ between ranks; whether a row drafts must not.
            step_tokens = self.backend.parallel.agree(self.costs.step_tokens() or 0)
            drafts = self._drafts(batch, budget - prompt_tokens, step_tokens)
        prompt_chunks = [Chunk(j.sequence, take, j.want_logits) for j, take in chunks]
        started = time.perf_counter()
        if drafts is None:
            decode_logits, chunk_logits = self.backend.step(
                batch.state if batch is not None else None,
                batch.next_ids if batch is not None else None,
                prompt_chunks,
            )
            drafted = 0
        else:
            assert batch is not None
            row_logits, chunk_logits = self._step_with_drafts(batch, drafts, prompt_chunks)
            drafted = sum(len(d) for d in drafts)
        self.costs.observe(time.perf_counter() - started, decoding, prompt_tokens + drafted)
        if batch is not None and drafts is not None:
            result, self.batch = self._verify(batch, row_logits, drafts)
            self._forget([f.request_id for f in result.failures])
            results.append(result)
        elif batch is not None:
            assert decode_logits is not None
            logits = self.faults.poison(batch.requests, decode_logits)
            choice = batch.sampler.choose(logits, batch.history)
            batch.history.append(choice.ids)
            batch.next_ids = choice.ids
            result, self.batch = self._drop_failed(batch, self._result(batch, choice), logits, choice)
            self._forget([f.request_id for f in result.failures])
            results.append(result)
        results += self._join(chunks, chunk_logits)
        return StepResult.join(results)

    # -- speculation ------------------------------------------------------------------------------
    def _drafts(self, batch: Batch, room: int, step_tokens: int) -> list[list[int]] | None:
        """Each running row's draft tokens for this step (most ``speculate``, all of them within ``room``
        tokens and the pool's free blocks), or None when no row drafts: where the row's text offers a
        continuation and drafting pays for it (``shard.speculation.pays``)."""
        rows = len(batch)
        if room <= 0 or not pays(1.0, rows, step_tokens):  # not even a sure draft would pay
            return None
        cache = self.backend.cache
        bs = cache.block_size
        seqs: list = batch.state.seqs
        # Free blocks less those the rows' next tokens take this step.
        free = cache.allocator.num_free - sum(len(s.tokens) + 1 > len(s.blocks) * bs for s in seqs)
        lengths = batch.history.lengths.tolist()
        prompts = batch.history.prompt_lengths.tolist()
        drafts: list[list[int]] = []
        for row, request in enumerate(batch.requests):
            job = self._job(request)
            # Every emitted token counts against max_new_tokens; the last one is the model's own.
            left = request.max_new_tokens - (lengths[row] - prompts[row]) - 1
            k = min(self.speculate, room, left, self.backend.draft_room(seqs[row]))
            draft: list[int] = []
            if not pays(job.acceptance.rate, rows, step_tokens):
                job.acceptance.rest()
            elif k > 0:
                draft = self._index(job, batch, row, lengths[row]).propose(k)
                seq = seqs[row]
                total = len(seq.tokens) + 1 + len(draft)
                extra = -(-total // bs) - max(len(seq.blocks), -(-(len(seq.tokens) + 1) // bs))
                if extra > free:
                    draft = []
                free -= extra if draft else 0
                room -= len(draft)
            drafts.append(draft)
        return drafts if any(drafts) else None

    def _job(self, request: RequestSpec) -> Job:
        return self.jobs[request.id]

    @staticmethod
    def _index(job: Job, batch: Batch, row: int, length: int) -> NgramIndex:
        """The row's draft index, brought up to its text so far (prompt, output, the token it feeds)."""
        if job.ngram is None:
            job.ngram = NgramIndex(batch.history.ids[row, :length].tolist())
        elif len(job.ngram.tokens) < length:
            job.ngram.extend(batch.history.ids[row, len(job.ngram.tokens) : length].tolist())
        return job.ngram

    def _step_with_drafts(
        self, batch: Batch, drafts: list[list[int]], prompt_chunks: list[Chunk]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One forward: the rows without drafts decode as usual; each row with drafts runs its next token
        and its drafts as a chunk with logits at every position. Returns each row's logits
        ``[1 + drafts, vocab]`` and the prompt chunks' logits."""
        seqs = batch.state.seqs
        next_ids = batch.next_ids.tolist()
        plain = [row for row, draft in enumerate(drafts) if not draft]
        drafting = [row for row, draft in enumerate(drafts) if draft]
        chunks = []
        for row in drafting:
            seq = seqs[row]
            seq.tokens += [next_ids[row], *drafts[row]]
            self.backend.cache.reserve(seq, len(seq.tokens))
            chunks.append(Chunk(seq, 1 + len(drafts[row]), want_all=True, seal=False))
        index = torch.tensor(plain, dtype=torch.long, device=batch.next_ids.device)
        decode_logits, logits = self.backend.step(
            PagedState([seqs[row] for row in plain]) if plain else None,
            batch.next_ids[index] if plain else None,
            chunks + prompt_chunks,
        )
        row_logits: list[torch.Tensor] = [torch.empty(0)] * len(drafts)
        for i, row in enumerate(plain):
            assert decode_logits is not None
            row_logits[row] = decode_logits[i : i + 1]
        for i, row in enumerate(drafting):
            row_logits[row] = logits[i]
        return row_logits, logits[len(drafting) :]

    def _verify(
        self, batch: Batch, row_logits: list[torch.Tensor], drafts: list[list[int]]
    ) -> tuple[StepResult, Batch | None]:
        """Picks each row's tokens (``shard.speculation.accept``), cuts the rejected drafts off the
        sequences, and returns the step's rows (several per drafting request, in order)."""
        verified = accept(batch.sampler, batch.history, row_logits, drafts)
        cache = self.backend.cache
        for row, draft in enumerate(drafts):
            if draft:
                seq = batch.state.seqs[row]
                taken = verified.accepted[row]
                cache.truncate(seq, len(seq.tokens) - len(draft) + taken)
                cache.seal(seq)
                self._job(batch.requests[row]).acceptance.observe(len(draft), taken)
                self.drafted += len(draft)
                self.accepted += taken
        batch.next_ids = torch.tensor([ids[-1] for ids in verified.ids], dtype=torch.long,
                                      device=batch.next_ids.device)  # fmt: skip
        result = _rows(batch, verified)
        bad = [
            row
            for row, logits in enumerate(row_logits)
            if bool(torch.isnan(logits[0].sum())) or any(x != x for x in verified.logprobs[row])
        ]
        return self._drop_rows(batch, result, bad)

    def _join(self, chunks: list[tuple[Job, int]], chunk_logits: list[torch.Tensor]) -> list[StepResult]:
        """Prompts this step completed start running: new requests with their first token, preempted
        ones with the token they had."""
        joined = [self.batch] if self.batch is not None else []
        new: list[tuple[Job, torch.Tensor]] = []
        for (job, _), logits in zip(chunks, chunk_logits, strict=True):
            if job.want_logits:
                job.prompt_logits.append(logits)
            if job.num_computed < job.num_tokens:
                continue
            self.scheduler.start(job)
            if job.resume is not None:  # recomputed: it goes on from the token it had
                resumed, job.resume = job.resume, None
                resumed.state = PagedState([job.sequence])
                joined.append(resumed)
            else:
                new.append((job, logits))
        results = []
        if new:
            started, result = self._start([j.request for j, _ in new], self._output(new))
            self._forget([f.request_id for f in result.failures])
            results.append(result)
            if started is not None:
                joined.append(started)
        self.batch = Batch.concatenate(joined, self.backend) if joined else None
        return results

    def _apply(self, plan: Plan[Job]) -> list[StepResult]:
        """Takes the preempted rows out of the running batch (to wait with their sampling state) and
        fails the requests that can never fit."""
        results: list[StepResult] = []
        if plan.failed:
            pool = self.scheduler.num_blocks * self.backend.cache.block_size
            failures = [
                RequestFailure(
                    j.request.id,
                    f"the request needs {j.num_tokens} KV cache tokens and the pool holds {pool}",
                )
                for j in plan.failed
            ]
            results.append(StepResult([], [], [], failures=failures))
            for job in plan.failed:
                self.jobs.pop(job.request.id, None)
            self.batch = self._without(self.batch, {f.request_id for f in failures})
        if plan.preempted and self.batch is not None:
            for job in plan.preempted:
                job.resume = self.batch.rows([job.request.id], None)
            self.batch = self._without(self.batch, {j.request.id for j in plan.preempted})
        return results

    def _output(self, new: list[tuple[Job, torch.Tensor]]) -> PrefillOutput:
        """The completed prompts as a prefill's output: their sequences, last logits, prompt logits."""
        return PrefillOutput(
            PagedState([j.sequence for j, _ in new]),
            torch.cat([logits[-1:] for _, logits in new]),
            [torch.cat(j.prompt_logits) if j.want_logits else None for j, _ in new],
        )


def _rows(batch: Batch, verified: Verified) -> StepResult:
    """A verified step as result rows: each request's tokens in order, top alternatives padded to the
    batch's widest."""
    width = batch.sampler.max_top_n
    out = StepResult([], [], [], top_n=width)
    for row, request in enumerate(batch.requests):
        for t, token in enumerate(verified.ids[row]):
            out.request_ids.append(request.id)
            out.token_ids.append(token)
            out.logprobs.append(verified.logprobs[row][t])
            if width:
                ids, logprobs = verified.top_ids[row][t], verified.top_logprobs[row][t]
                out.top_ids += ids + [0] * (width - len(ids))
                out.top_logprobs += logprobs + [float("-inf")] * (width - len(logprobs))
    return out
