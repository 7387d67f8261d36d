"""The shard's generation loop: cached batches, prefill, decode, clear; the same for every backend."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .backends.base import Backend, PrefillOutput
from .batch import Batch
from .faults import Faults
from .processors import ProcessorArgumentError, Processors
from .sampling import Choice, Sampler, TokenHistory
from .types import PromptLogprobs, RequestFailure, RequestSpec, StepResult

log = logging.getLogger(__name__)


class UnknownBatchError(KeyError):
    """The router named a batch this shard does not hold."""


@dataclass(frozen=True)
class Cached:
    """What the router is told of a batch the shard keeps: its id and its requests, in the shard's order."""

    id: int
    request_ids: list[int]
    max_tokens: int

    @classmethod
    def of(cls, batch: Batch) -> Cached:
        return cls(batch.id, batch.request_ids, batch.max_tokens)


def prompt_logprobs(request_id: int, ids: list[int], logits: torch.Tensor) -> PromptLogprobs:
    """Log-probability of each prompt token given the ones before it (NaN for the first)."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(ids[1:], dtype=torch.long, device=logits.device).unsqueeze(1)
    values = logprobs.gather(1, targets).squeeze(1).tolist() if len(ids) > 1 else []
    return PromptLogprobs(request_id, list(ids), [math.nan, *values])


class StepEngine(Protocol):
    """What the engine core (shard/core.py) drives: batches named by the core, a step at a time."""

    backend: Any
    # Whether the engine schedules for itself: a prefill beside running batches only queues its requests,
    # whose prompts then run inside the following decode steps (shard/scheduler.py).
    chunked_prefill: bool

    def prefill(self, batch_id: int, requests: list[RequestSpec], max_tokens: int) -> StepResult:
        """Takes new requests as batch ``batch_id``; runs their prompts now unless it schedules itself
        and something is running."""
        ...

    def decode(self, wanted: list[tuple[int, list[int]]]) -> tuple[StepResult, Cached | None]:
        """One step over the named batches, each cut down first to the request ids still wanted."""
        ...

    def cached(self, batch_id: int) -> Cached | None:
        """Batch ``batch_id``'s requests, in the engine's order (None: nothing left)."""
        ...

    def clear(self, batch_id: int | None = None) -> None:
        """Drops one batch, or all, with their memory."""
        ...

    def stats(self) -> dict[str, int] | None:
        """The KV cache's figures (proto CacheStats fields), where the engine keeps one."""
        ...

    def num_waiting(self) -> int:
        """Requests it holds that have not started running."""
        ...

    def processor_names(self) -> list[str]:
        """The logits processors a request may name."""
        ...


class Engine:
    """Holds the shard's cached batches and runs steps on them through a backend."""

    chunked_prefill = False

    def __init__(
        self, backend: Backend, faults: Faults | None = None, processors: Processors | None = None
    ) -> None:
        self.backend = backend
        self.faults = faults or Faults(enabled=False)
        self.processors = processors or Processors([])
        self.batches: dict[int, Batch] = {}

    def prefill(self, batch_id: int, requests: list[RequestSpec], max_tokens: int) -> StepResult:
        """Runs new requests' prompts, picks their first token and caches them as batch ``batch_id``."""
        if not requests:
            raise ValueError("a prefill batch needs at least one request")
        self.faults.before_step(requests)
        requests, refused = self._admit(requests)
        if not requests:
            return StepResult([], [], [], failures=refused)
        out = self._prefill_shared([r.input_ids for r in requests], [r.prefill_logprobs for r in requests])
        batch, result = self._start(batch_id, requests, out, max_tokens)
        if batch is not None:
            self.batches[batch_id] = batch
        result.failures += refused
        return result

    def _admit(self, requests: list[RequestSpec]) -> tuple[list[RequestSpec], list[RequestFailure]]:
        """Splits off the requests whose logits-processor arguments are refused: each fails on its own
        (the router validates them first, so this is a second line of defence)."""
        admitted, refused = [], []
        for r in requests:
            try:
                self.processors.new_states(dict(r.params.processors), r.input_ids)
            except ProcessorArgumentError as e:
                refused.append(RequestFailure(r.id, str(e)))
            else:
                admitted.append(r)
        return admitted, refused

    def _start(
        self, batch_id: int, requests: list[RequestSpec], out: PrefillOutput, max_tokens: int
    ) -> tuple[Batch | None, StepResult]:
        """Picks the first token of requests whose prompts have run, and makes them a batch."""
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
        batch = Batch(batch_id, requests, sampler, history, choice.ids, out.state, max_tokens)
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

    def decode(self, wanted: list[tuple[int, list[int]]]) -> tuple[StepResult, Cached | None]:
        """One step over the named batches, each cut down first to the request ids the router still wants.

        Returns the step's generations and the merged batch now cached (None if nothing was left)."""
        # A batch whose every request failed is gone already; the router may still name it, empty.
        wanted = [(bid, ids) for bid, ids in wanted if ids or bid in self.batches]
        missing = [bid for bid, _ in wanted if bid not in self.batches]
        if missing:
            raise UnknownBatchError(f"no cached batch {missing}")
        popped = [(self.batches.pop(batch_id), request_ids) for batch_id, request_ids in wanted]
        kept: list[Batch] = []
        try:
            for old, request_ids in popped:
                batch = old.select(request_ids, self.backend)
                if batch is not None:
                    kept.append(batch)
            if not kept:
                return StepResult([], [], []), None
            batch = Batch.concatenate(kept, self.backend)
            self.faults.before_step(batch.requests)
            logits = self.backend.decode(batch.state, batch.next_ids)
            logits = self.faults.poison(batch.requests, logits)
            choice = batch.sampler.choose(logits, batch.history)
        except BaseException:
            # The router clears these batches after a failed step; their KV memory goes back now.
            for b in [*kept, *(old for old, _ in popped)]:
                self.backend.release(b.state)
            raise
        batch.history.append(choice.ids)
        batch.next_ids = choice.ids
        result, survivor = self._drop_failed(batch, self._result(batch, choice), logits, choice)
        if survivor is None:
            return result, None
        self.batches[survivor.id] = survivor
        return result, Cached.of(survivor)

    def _drop_failed(
        self, batch: Batch, result: StepResult, logits: torch.Tensor, choice: Choice
    ) -> tuple[StepResult, Batch | None]:
        """Takes the rows whose logits or chosen token are not numbers out of the step's result and of the
        cached batch, as failures of their own requests: one bad row never costs its batch-mates."""
        # A row's sum is NaN when any of its logits is (or when it holds both infinities: a lost row too).
        bad = torch.isnan(logits.sum(dim=-1)) | torch.isnan(choice.logprobs)
        if not bool(bad.any()):
            return result, batch
        rows = bad.nonzero().flatten().tolist()
        failed = {batch.requests[row].id for row in rows}
        log.warning("Requests %s failed: non-finite logits", sorted(failed))
        keep = [row for row in range(len(batch)) if row not in set(rows)]
        width = result.top_n
        survivor = batch.select([batch.requests[row].id for row in keep], self.backend)
        filtered = StepResult(
            request_ids=[result.request_ids[row] for row in keep],
            token_ids=[result.token_ids[row] for row in keep],
            logprobs=[result.logprobs[row] for row in keep],
            top_n=width,
            top_ids=[v for row in keep for v in result.top_ids[row * width : (row + 1) * width]],
            top_logprobs=[v for row in keep for v in result.top_logprobs[row * width : (row + 1) * width]],
            prefill=[p for p in result.prefill if p.request_id not in failed],
            failures=[
                RequestFailure(rid, "the model produced non-finite logits (NaN) for this request")
                for rid in sorted(failed)
            ],
        )
        return filtered, survivor

    def stats(self) -> dict[str, int] | None:
        """The KV cache's figures (proto CacheStats fields), from engines whose backend keeps one."""
        return None

    def num_waiting(self) -> int:
        return 0

    def processor_names(self) -> list[str]:
        return self.processors.names

    def cached(self, batch_id: int) -> Cached | None:
        """What the router is to be told of batch ``batch_id`` after a prefill (None: nothing left)."""
        batch = self.batches.get(batch_id)
        return None if batch is None else Cached.of(batch)

    def clear(self, batch_id: int | None = None) -> None:
        dropped = list(self.batches.values()) if batch_id is None else [self.batches.get(batch_id)]
        for batch in dropped:
            if batch is not None:
                self.backend.release(batch.state)
                self.batches.pop(batch.id, None)

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
