"""The plain engine (whole prompts, then decode steps) and the protocol every engine implements.

An engine holds the requests the engine core (shard/core.py) hands it and runs one step at a time over
all of them. The core tells it which requests leave (``remove``): the engine never reconciles lists of
wanted ids, and a request's memory goes back as soon as it leaves.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from typing import Any, Protocol, runtime_checkable

import torch

from .backends.base import Backend, PrefillOutput
from .batch import Batch
from .faults import Faults
from .processors import ProcessorArgumentError, Processors
from .sampling import Choice, Sampler, TokenHistory
from .types import PromptLogprobs, RequestFailure, RequestSpec, StepResult

log = logging.getLogger(__name__)


def prompt_logprobs(request_id: int, ids: list[int], logits: torch.Tensor) -> PromptLogprobs:
    """Log-probability of each prompt token given the ones before it (NaN for the first)."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(ids[1:], dtype=torch.long, device=logits.device).unsqueeze(1)
    values = logprobs.gather(1, targets).squeeze(1).tolist() if len(ids) > 1 else []
    return PromptLogprobs(request_id, list(ids), [math.nan, *values])


class StepEngine(Protocol):
    """What the engine core drives: requests in (``add``), out (``remove``), one step at a time.

    Contract: ``add`` takes requests the engine does not hold; each gets its first token in a later
    ``step`` (or fails, alone, in a step's ``failures``). ``remove`` takes ids the engine holds or has
    already let go (those are ignored), and frees their memory now. ``step`` runs one forward over what
    the engine holds and returns a row per token; a request that fails alone (non-finite logits, a KV
    need larger than the whole pool) is in ``failures`` and the engine has let it go. When ``step``
    raises, the core fails every request the engine holds and calls ``clear``."""

    backend: Any
    # Whether the engine schedules for itself (shard/scheduler.py): the core hands it every request at
    # once, and it decides which prompts run in which step.
    schedules_itself: bool

    def add(self, requests: list[RequestSpec]) -> list[RequestFailure]:
        """Takes new requests; returns those refused at once (each alone), which it does not hold."""
        ...

    def remove(self, request_ids: Collection[int]) -> None:
        """These requests leave now (ended or aborted), with their memory."""
        ...

    def step(self) -> StepResult:
        """One step over every request held: new prompts, then the running requests' next tokens."""
        ...

    def clear(self) -> None:
        """Drops every request, with its memory."""
        ...

    def stats(self) -> dict[str, int] | None:
        """The KV cache's figures (proto CacheStats fields), where the engine keeps one."""
        ...

    def num_waiting(self) -> int:
        """Requests it holds that have not started running."""
        ...

    def adapters(self) -> tuple[list[str], list[str]]:
        """The LoRA adapters of the requests it holds, (running, waiting), each once."""
        ...

    def processor_names(self) -> list[str]:
        """The logits processors a request may name."""
        ...


@runtime_checkable
class EngineBackend(Protocol):
    """A backend that runs its own decoding loop (CTranslate2, or a plugin's) and brings the engine that
    drives it; such an engine applies no logits processors."""

    def make_engine(self, faults: Faults | None) -> StepEngine:
        """The engine over this backend."""
        ...


def admit(
    processors: Processors, requests: list[RequestSpec], adapters: Collection[str] = ()
) -> tuple[list[RequestSpec], list[RequestFailure]]:
    """Splits off the requests whose logits-processor arguments are refused, or that name a LoRA adapter
    not among ``adapters``: each fails on its own (the router validates them first, so this is a second
    line of defence)."""
    admitted, refused = [], []
    for r in requests:
        if r.adapter_id and r.adapter_id not in adapters:
            refused.append(RequestFailure(r.id, f"`adapter_id` {r.adapter_id!r} is not loaded on this shard"))
            continue
        try:
            processors.new_states(dict(r.params.processors), r.input_ids)
        except ProcessorArgumentError as e:
            refused.append(RequestFailure(r.id, str(e)))
        else:
            admitted.append(r)
    return admitted, refused


class Engine:
    """Runs whole prompts (a step that has new requests prefills them first), then decode steps over one
    running batch, through a backend."""

    schedules_itself = False

    def __init__(
        self, backend: Backend, faults: Faults | None = None, processors: Processors | None = None
    ) -> None:
        self.backend = backend
        self.faults = faults or Faults(enabled=False)
        self.processors = processors or Processors([])
        self.batch: Batch | None = None
        # Requests added since the last step: their prompts run in the next one.
        self.pending: list[RequestSpec] = []

    def add(self, requests: list[RequestSpec]) -> list[RequestFailure]:
        admitted, refused = admit(self.processors, requests)
        self.pending += admitted
        return refused

    def remove(self, request_ids: Collection[int]) -> None:
        gone = set(request_ids)
        if self.pending:
            self.pending = [r for r in self.pending if r.id not in gone]
        self.batch = self._without(self.batch, gone)

    def _without(self, batch: Batch | None, gone: set[int]) -> Batch | None:
        """``batch`` less the rows of ``gone`` (their memory freed); None when nothing is left."""
        if batch is None:
            return None
        keep = [rid for rid in batch.request_ids if rid not in gone]
        return batch if len(keep) == len(batch) else batch.select(keep, self.backend)

    def step(self) -> StepResult:
        """Prefills the new requests (their first token); then, if a batch was running before, one decode
        step over it with the new rows joined (TGI's loop: prefill, concatenate, decode)."""
        running = self.batch is not None
        results = []
        if self.pending:
            joining, self.pending = self.pending, []
            self.faults.before_step(joining)
            out = self._prefill_shared([r.input_ids for r in joining], [r.prefill_logprobs for r in joining])
            new, result = self._start(joining, out)
            results.append(result)
            if new is not None:
                self.batch = new if self.batch is None else Batch.concatenate([self.batch, new], self.backend)
        if running:
            results.append(self._decode())
        return StepResult.join(results)

    def _decode(self) -> StepResult:
        batch = self.batch
        assert batch is not None
        self.faults.before_step(batch.requests)
        logits = self.backend.decode(batch.state, batch.next_ids)
        logits = self.faults.poison(batch.requests, logits)
        choice = batch.sampler.choose(logits, batch.history)
        batch.history.append(choice.ids)
        batch.next_ids = choice.ids
        result, self.batch = self._drop_failed(batch, self._result(batch, choice), logits, choice)
        return result

    def _start(self, requests: list[RequestSpec], out: PrefillOutput) -> tuple[Batch | None, StepResult]:
        """Picks the first token of requests whose prompts have run, and makes them a batch (None when
        every row failed)."""
        device = self.backend.device
        prompts = [r.input_ids for r in requests]
        try:
            history = TokenHistory.from_prompts(prompts, [r.max_new_tokens for r in requests], device)
            eos = tuple(self.backend.info.eos_token_ids)
            sampler = Sampler(
                [r.params for r in requests],
                [r.top_n_tokens for r in requests],
                device,
                [r.min_new_tokens for r in requests],
                [eos + r.stop_token_ids for r in requests],
                self.processors,
                [self.processors.new_states(dict(r.params.processors), r.input_ids) for r in requests],
            )
            choice = sampler.choose(out.logits, history)
            history.append(choice.ids)
        except BaseException:
            self.backend.release(out.state)
            raise
        batch = Batch(requests, sampler, history, choice.ids, out.state)
        result = self._result(batch, choice)
        result.prefill = [
            prompt_logprobs(r.id, r.input_ids, logits)
            for r, logits in zip(requests, out.prompt_logits, strict=True)
            if logits is not None
        ]
        result, survivor = self._drop_failed(batch, result, out.logits, choice)
        return survivor, result

    def _prefill_shared(self, prompts: list[list[int]], want_prompt_logits: list[bool]) -> PrefillOutput:
        """Runs each distinct prompt once (e.g. the n samples of one prompt) and gives every request a
        copy of its prompt's cache."""
        unique: dict[tuple[int, ...], int] = {}
        rows = [unique.setdefault(tuple(p), len(unique)) for p in prompts]
        if len(unique) == len(prompts):
            return self.backend.prefill(prompts, want_prompt_logits)
        wants = [False] * len(unique)
        for row, want in zip(rows, want_prompt_logits, strict=True):
            wants[row] = wants[row] or want
        out = self.backend.prefill([list(p) for p in unique], wants)
        index = torch.tensor(rows, dtype=torch.long, device=self.backend.device)
        return PrefillOutput(
            self.backend.select(out.state, index),
            out.logits[index],
            [
                out.prompt_logits[row] if want else None
                for row, want in zip(rows, want_prompt_logits, strict=True)
            ],
        )

    def _drop_failed(
        self, batch: Batch, result: StepResult, logits: torch.Tensor, choice: Choice
    ) -> tuple[StepResult, Batch | None]:
        """Takes the rows whose logits or chosen token are not numbers out of the step's result and of the
        running batch, as failures of their own requests: one bad row never costs its batch-mates."""
        # A row's sum is NaN when any of its logits is (or when it holds both infinities: a lost row too).
        bad = torch.isnan(logits.sum(dim=-1)) | torch.isnan(choice.logprobs)
        return self._drop_rows(batch, result, bad.nonzero().flatten().tolist())

    def _drop_rows(
        self, batch: Batch, result: StepResult, rows: list[int]
    ) -> tuple[StepResult, Batch | None]:
        """``_drop_failed`` for the batch rows ``rows`` that went wrong: their requests leave the batch,
        and every result row of theirs (a row may have several: speculation) leaves the result."""
        if not rows:
            return result, batch
        failed = {batch.requests[row].id for row in rows}
        log.warning("Requests %s failed: non-finite logits", sorted(failed))
        survivor = batch.select([r.id for r in batch.requests if r.id not in failed], self.backend)
        filtered = result.take([i for i, rid in enumerate(result.request_ids) if rid not in failed])
        filtered.prefill = [p for p in result.prefill if p.request_id not in failed]
        filtered.failures = [
            RequestFailure(rid, "the model produced non-finite logits (NaN) for this request")
            for rid in sorted(failed)
        ]
        return filtered, survivor

    def stats(self) -> dict[str, int] | None:
        """The KV cache's figures (proto CacheStats fields), from engines whose backend keeps one."""
        return None

    def num_waiting(self) -> int:
        return len(self.pending)

    def adapters(self) -> tuple[list[str], list[str]]:
        """None: its backends hold no LoRA adapters (``admit`` refuses requests that name one)."""
        return [], []

    def processor_names(self) -> list[str]:
        return self.processors.names

    def clear(self) -> None:
        self.pending = []
        if self.batch is not None:
            self.backend.release(self.batch.state)
            self.batch = None

    @staticmethod
    def _result(batch: Batch, choice: Choice) -> StepResult:
        return StepResult(
            request_ids=batch.request_ids,
            token_ids=choice.ids.tolist(),
            logprobs=choice.logprobs.tolist(),
            top_n=choice.top_ids.shape[1],
            top_ids=choice.top_ids.flatten().tolist(),
            top_logprobs=choice.top_logprobs.flatten().tolist(),
        )
