"""The engine of the CTranslate2 backend: continuous batching over ctranslate2's own decoding loop.

ctranslate2 runs a batch start to end in one call (``Generator.generate_batch``) and keeps its KV cache
inside; a batch cannot grow once started. So each group of requests that arrive together (an ``add``)
runs as one batch (a *group*: the requests whose sampling options match and whose prompts have about the
same length) on a worker thread of its own, and the engine paces every group one step per ``step``:

- ``generate_batch`` gets a callback that ctranslate2 calls for every token. At the first token of a new
  step the callback hands the previous step's tokens over and waits for the engine to release the group:
  the worker computes each step once, with its KV cache, and never runs ahead by more than that step.
- Joining: ``add`` queues new groups; each starts in the first step with a free worker (its first token)
  and takes part in the steps after it with the others. Leaving: a removed request is stopped at its next
  token (the callback returns True, which ends that row of the batch); a group whose rows have all left
  ends and frees its worker.
- Steps are paced group after group on CPU (each step uses every compute thread) and all at once on CUDA.
- Prompts of one group may differ a little in length: ctranslate2 runs the shortest prompt at once and
  feeds the longer prompts' last tokens one per step, so a longer prompt gets its first token a few steps
  later.
- Token log-probabilities come from ctranslate2 (``return_scores``); ``top_n_tokens`` from the step's
  logits (``return_logits_vocab``, only for groups that ask); prompt log-probabilities
  (``decoder_input_details``) from ``Generator.score_batch``.
"""

from __future__ import annotations

import atexit
import logging
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .faults import Faults
from .types import PromptLogprobs, RequestFailure, RequestSpec, StepResult

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# How long shutting down waits for the running batches to end (each ends at its next callback).
CLOSE_TIMEOUT_S = 20.0


def length_slack(length: int) -> int:
    """How much longer than a group's shortest prompt another prompt of the group may be (in tokens)."""
    return max(8, length // 8)


@dataclass(frozen=True)
class Options:
    """The generate_batch options a group shares (ctranslate2 takes one set per batch)."""

    sampling_topk: int
    sampling_topp: float
    sampling_temperature: float
    repetition_penalty: float
    logits: bool  # return_logits_vocab: a request wants top_n_tokens

    @classmethod
    def of(cls, r: RequestSpec) -> Options:
        p = r.params
        if p.sampling:
            # top_k 0 = the whole vocabulary (ctranslate2's sampling_topk=0); 1 would be greedy.
            topk, topp, temperature = p.top_k, p.top_p, p.temperature
        else:
            topk, topp, temperature = 1, 1.0, 1.0
        return cls(topk, topp, temperature, p.repetition_penalty, r.top_n_tokens > 0)


@dataclass
class Token:
    """One token a group's callback received."""

    row: Row
    token_id: int
    logprob: float
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass
class Row:
    request: RequestSpec
    group: Group
    index: int
    started: bool = False  # has had its first token
    stop: bool = False  # it left: end its row of the batch at its next token
    ended: bool = False  # ctranslate2 calls back no more for it
    prompt: PromptLogprobs | None = None  # delivered with its first token


class GroupError(RuntimeError):
    pass


class Group:
    """One ctranslate2 batch on one worker thread, paused between steps by its callback."""

    def __init__(self, requests: list[RequestSpec], options: Options) -> None:
        self.options = options
        self.rows = [Row(r, self, i) for i, r in enumerate(requests)]
        self.cond = threading.Condition()
        self.buffer: list[Token] = []  # the tokens of the step ctranslate2 is reporting
        self.buffer_step = -1
        self.ready: deque[list[Token]] = deque()  # complete steps the engine has not taken yet
        self.published = 0  # steps handed over
        self.released = 0  # steps the worker may go past
        self.submitted = False
        self.finished = False  # the job is over: no more steps, its worker is free
        self.error: BaseException | None = None
        self.aborted = False  # shutting down: end every row at once
        self.top_n = max(r.top_n_tokens for r in requests)

    def settled(self) -> bool:
        """Whether the worker is done with this group: finished, or never started."""
        return self.finished or not self.submitted

    @property
    def live(self) -> bool:
        """Whether a row may still produce tokens anybody wants."""
        return any(not (row.stop or row.ended) for row in self.rows)

    # -- the worker's side (ctranslate2's thread) --------------------------------------------------
    def callback(self, step: Any) -> bool:
        with self.cond:
            if step.step != self.buffer_step:
                if self.buffer_step >= 0:  # a new step begins: the previous one is complete
                    self._publish()
                    # A group whose rows have all left goes on at once: its callbacks end them.
                    while self.released < self.published and not self.aborted and self.live:
                        self.cond.wait()
                self.buffer_step = step.step
            row = self.rows[step.batch_id]
            if row.stop or self.aborted:
                row.ended = True
                return True
            self.buffer.append(self._token(row, step))
            if step.is_last:
                row.ended = True
            return False

    def _token(self, row: Row, step: Any) -> Token:
        token = Token(row, int(step.token_id), float(step.log_prob))
        if self.options.logits and step.logits is not None:
            logits = _to_numpy(step.logits).reshape(-1).astype(np.float64)
            logprobs = logits - logits.max()
            logprobs -= math.log(np.exp(logprobs).sum())
            token.logprob = float(logprobs[token.token_id])
            n = min(self.top_n, logprobs.shape[0])
            if n:
                top = np.argpartition(-logprobs, n - 1)[:n]
                top = top[np.argsort(-logprobs[top], kind="stable")]
                token.top_ids = [int(i) for i in top]
                token.top_logprobs = [float(logprobs[i]) for i in top]
        return token

    def _publish(self) -> None:
        self.ready.append(self.buffer)
        self.buffer = []
        self.published += 1
        self.cond.notify_all()

    def watch(self, results: list[Any]) -> None:
        """Waits for the job to end (on a thread of its own); hands over its last step."""
        error: BaseException | None = None
        try:
            for result in results:
                result.result()
        except BaseException as e:
            error = e
        with self.cond:
            if self.buffer or self.buffer_step >= 0:
                self._publish()
            self.error = error
            self.finished = True
            for row in self.rows:
                row.ended = True
            self.cond.notify_all()

    # -- the engine's side -------------------------------------------------------------------------
    def release(self) -> None:
        """Lets the worker compute the next step."""
        with self.cond:
            self.released = self.published
            self.cond.notify_all()

    def take(self) -> list[Token] | None:
        """The next complete step (waits for it); None when the job ended without one."""
        with self.cond:
            while not self.ready and not self.finished:
                self.cond.wait()
            if self.ready:
                return self.ready.popleft()
            if self.error is not None:
                raise GroupError(f"ctranslate2 failed: {type(self.error).__name__}: {self.error}")
            return None

    def abort(self) -> None:
        with self.cond:
            self.aborted = True
            self.cond.notify_all()


def _to_numpy(logits: Any) -> np.ndarray:
    try:
        return np.asarray(logits)
    except (TypeError, ValueError, RuntimeError):  # a CUDA StorageView
        import torch

        return torch.as_tensor(logits, device="cuda").float().cpu().numpy()


class CT2Model(Protocol):
    """What the engine uses of the backend (``backends.ct2.CT2Backend``, which makes the engine)."""

    device: torch.device
    max_batches: int
    generator: Any  # a ctranslate2.Generator

    def to_tokens(self, ids: list[int]) -> list[str]: ...


class CT2Engine:
    """The engine protocol (shard.engine.StepEngine) over ctranslate2's own decoding loop."""

    schedules_itself = False

    def __init__(self, backend: CT2Model, faults: Faults | None = None) -> None:
        self.backend = backend
        self.faults = faults or Faults(enabled=False)
        self.rows: dict[int, Row] = {}  # request id -> its row, while the engine holds it
        self.running: list[Group] = []  # submitted, not finished
        self.waiting: list[Group] = []  # not submitted: every worker was busy
        self.parallel = backend.device.type == "cuda"
        ref = weakref.ref(self)

        def close_if_alive() -> None:
            engine = ref()
            if engine is not None:
                engine.close()

        atexit.register(close_if_alive)

    # -- the protocol -----------------------------------------------------------------------------
    def add(self, requests: list[RequestSpec]) -> list[RequestFailure]:
        admitted, refused = [], []
        for r in requests:
            try:
                self.backend.to_tokens(r.input_ids)  # refused now, not on a worker, for an unknown id
            except ValueError as e:
                refused.append(RequestFailure(r.id, str(e)))
            else:
                admitted.append(r)
        groups = self._groups(admitted)
        for group in groups:
            for row in group.rows:
                self.rows[row.request.id] = row
        self.waiting.extend(groups)
        return refused

    def remove(self, request_ids: Collection[int]) -> None:
        for rid in request_ids:
            self._drop(rid)
        self._release_closing()

    def step(self) -> StepResult:
        """One step of every running group, then the waiting groups that can start (their first token)."""
        self.faults.before_step([row.request for row in self.rows.values()])
        self._release_closing()
        groups = [g for g in self.running if g.live]
        tokens: list[Token] = []
        failed: list[RequestFailure] = []
        if self.parallel:
            for group in groups:
                group.release()
        for group in groups:
            if not self.parallel:
                group.release()
            step = group.take()
            if step is not None:
                tokens += self._accept(step)
        got = {id(t.row) for t in tokens}
        for group in groups:
            if group.finished:
                # The job is over: a row still held cannot get another token.
                for row in group.rows:
                    if not row.stop and self.rows.get(row.request.id) is row and id(row) not in got:
                        failed.append(RequestFailure(row.request.id, "the CTranslate2 batch ended early"))
        tokens += self._start_waiting()
        for failure in failed:
            self.rows.pop(failure.request_id, None)
        result = self._result(tokens)
        result.failures = failed
        return result

    def stats(self) -> dict[str, int] | None:
        """ctranslate2 keeps its KV cache to itself: no figures."""
        return None

    def num_waiting(self) -> int:
        return sum(len(g.rows) for g in self.waiting)

    def adapters(self) -> tuple[list[str], list[str]]:
        """None: CTranslate2 runs no LoRA adapters (the router offers none)."""
        return [], []

    def processor_names(self) -> list[str]:
        return []  # ctranslate2 runs its own sampling: no logits processors

    def clear(self) -> None:
        for rid in list(self.rows):
            self._drop(rid)
        self._release_closing()

    def close(self) -> None:
        """Ends every batch at once (shutdown): a worker paused in a callback would keep the process."""
        groups = [*self.running, *self.waiting]
        for group in groups:
            group.abort()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        for group in groups:
            with group.cond:
                group.cond.wait_for(group.settled, timeout=max(0.0, deadline - time.monotonic()))
        self.running.clear()
        self.waiting.clear()

    # -- groups -----------------------------------------------------------------------------------
    def _groups(self, requests: list[RequestSpec]) -> list[Group]:
        """Requests with the same options and prompts within ``length_slack`` tokens, together. A request
        that wants top tokens (the step's whole logits, ``return_logits_vocab``) runs in a group of its
        own: with the logits on, ctranslate2 does not report a batch's rows step by step in lock step,
        and a group of two or more would wait for a step that never completes."""
        by_options: dict[Options, list[RequestSpec]] = {}
        groups = []
        for r in requests:
            options = Options.of(r)
            if options.logits:
                groups.append(Group([r], options))
            else:
                by_options.setdefault(options, []).append(r)
        for options, members in by_options.items():
            members.sort(key=lambda r: len(r.input_ids))
            current: list[RequestSpec] = []
            for r in members:
                if current and len(r.input_ids) > len(current[0].input_ids) + length_slack(
                    len(current[0].input_ids)
                ):
                    groups.append(Group(current, options))
                    current = []
                current.append(r)
            groups.append(Group(current, options))
        return groups

    def _start_waiting(self) -> list[Token]:
        """Starts waiting groups, in order, while workers are free; returns their first tokens."""
        tokens: list[Token] = []
        for group in list(self.waiting):
            if not group.live:
                self.waiting.remove(group)
                continue
            if not self._free_worker():
                break
            self.waiting.remove(group)
            self._submit(group)
            first = group.take()
            if first is not None:
                tokens += self._accept(first)
        return tokens

    def _free_worker(self) -> bool:
        """Whether a worker can take a group now (waits for groups that are ending to end)."""
        self.running = [g for g in self.running if not g.finished]
        if len(self.running) < self.backend.max_batches:
            return True
        closing = [g for g in self.running if not g.live]
        if not closing:
            return False
        for group in closing:
            with group.cond:
                while not group.finished:
                    group.cond.wait()
        self.running = [g for g in self.running if not g.finished]
        return len(self.running) < self.backend.max_batches

    def _submit(self, group: Group) -> None:
        backend = self.backend
        options = group.options
        requests = [row.request for row in group.rows]
        scored = [row for row in group.rows if row.request.prefill_logprobs]
        if scored:
            self._score(scored)
        results = backend.generator.generate_batch(
            [backend.to_tokens(r.input_ids) for r in requests],
            max_length=max(r.max_new_tokens for r in requests),
            include_prompt_in_result=False,
            end_token=[],  # the engine core decides where a sequence ends
            return_scores=True,
            return_logits_vocab=options.logits,
            sampling_topk=options.sampling_topk,
            sampling_topp=options.sampling_topp,
            sampling_temperature=options.sampling_temperature,
            repetition_penalty=options.repetition_penalty,
            callback=group.callback,
            asynchronous=True,
        )
        group.submitted = True
        self.running.append(group)
        threading.Thread(target=group.watch, args=(results,), name="ct2-watch", daemon=True).start()

    def _score(self, rows: list[Row]) -> None:
        """Prompt log-probabilities (decoder_input_details) from ctranslate2's scoring."""
        prompts = [row.request.input_ids for row in rows]
        results = self.backend.generator.score_batch(
            [self.backend.to_tokens(p) for p in prompts], max_input_length=0
        )
        for row, prompt, result in zip(rows, prompts, results, strict=True):
            values = [float(v) for v in result.log_probs][: len(prompt) - 1]
            row.prompt = PromptLogprobs(row.request.id, list(prompt), [math.nan, *values])

    def _accept(self, tokens: list[Token]) -> list[Token]:
        """A step's tokens, less those of rows that have left since."""
        return [t for t in tokens if not t.row.stop and self.rows.get(t.row.request.id) is t.row]

    def _release_closing(self) -> None:
        """Forgets the groups whose job is over (their worker is free)."""
        self.running = [g for g in self.running if not g.finished]

    def _drop(self, request_id: int) -> None:
        row = self.rows.pop(request_id, None)
        if row is None:
            return
        with row.group.cond:
            row.stop = True
            row.group.cond.notify_all()  # a paused worker whose rows have all left goes on and ends them
        if not row.group.submitted and not row.group.live and row.group in self.waiting:
            self.waiting.remove(row.group)

    def _result(self, tokens: list[Token]) -> StepResult:
        """The step's tokens as the columns the servicer sends (each row's first token brings its prompt
        log-probabilities along)."""
        width = max((len(t.top_ids) for t in tokens), default=0)
        result = StepResult([], [], [], top_n=width)
        for token in tokens:
            row = token.row
            result.request_ids.append(row.request.id)
            result.token_ids.append(token.token_id)
            result.logprobs.append(token.logprob)
            pad = width - len(token.top_ids)
            result.top_ids += token.top_ids + [0] * pad
            result.top_logprobs += token.top_logprobs + [float("-inf")] * pad
            if not row.started:
                row.started = True
                if row.prompt is not None:
                    result.prefill.append(row.prompt)
        return result
