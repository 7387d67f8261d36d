"""The shard's generation loop: cached batches, prefill, decode, clear; the same for every backend."""

from __future__ import annotations

import logging
import math

import torch

from .backends.base import Backend, PrefillOutput
from .batch import Batch
from .sampling import Choice, Sampler, TokenHistory
from .types import PromptLogprobs, RequestSpec, StepResult

log = logging.getLogger(__name__)


class UnknownBatchError(KeyError):
    """The router named a batch this shard does not hold."""


def prompt_logprobs(request_id: int, ids: list[int], logits: torch.Tensor) -> PromptLogprobs:
    """Log-probability of each prompt token given the ones before it (NaN for the first)."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(ids[1:], dtype=torch.long, device=logits.device).unsqueeze(1)
    values = logprobs.gather(1, targets).squeeze(1).tolist() if len(ids) > 1 else []
    return PromptLogprobs(request_id, list(ids), [math.nan, *values])


class Engine:
    """Holds the shard's cached batches and runs steps on them through a backend."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.batches: dict[int, Batch] = {}

    def prefill(self, batch_id: int, requests: list[RequestSpec], max_tokens: int) -> StepResult:
        """Runs new requests' prompts, picks their first token and caches them as batch ``batch_id``."""
        if not requests:
            raise ValueError("a prefill batch needs at least one request")
        device = self.backend.device
        prompts = [r.input_ids for r in requests]
        out = self._prefill_shared(prompts, [r.prefill_logprobs for r in requests])
        history = TokenHistory.from_prompts(prompts, [r.max_new_tokens for r in requests], device)
        eos = tuple(self.backend.info.eos_token_ids)
        sampler = Sampler(
            [r.params for r in requests],
            [r.top_n_tokens for r in requests],
            device,
            [r.min_new_tokens for r in requests],
            [eos + r.stop_token_ids for r in requests],
        )
        choice = sampler.choose(out.logits, history)
        history.append(choice.ids)
        batch = Batch(batch_id, requests, sampler, history, choice.ids, out.state, max_tokens)
        self.batches[batch_id] = batch
        result = self._result(batch, choice)
        result.prefill = [
            prompt_logprobs(r.id, r.input_ids, logits)
            for r, logits in zip(requests, out.prompt_logits, strict=True)
            if logits is not None
        ]
        return result

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

    def decode(self, wanted: list[tuple[int, list[int]]]) -> tuple[StepResult, Batch | None]:
        """One step over the named batches, each cut down first to the request ids the router still wants.

        Returns the step's generations and the merged batch now cached (None if nothing was left)."""
        missing = [bid for bid, _ in wanted if bid not in self.batches]
        if missing:
            raise UnknownBatchError(f"no cached batch {missing}")
        kept = []
        for batch_id, request_ids in wanted:
            batch = self.batches.pop(batch_id).select(request_ids, self.backend)
            if batch is not None:
                kept.append(batch)
        if not kept:
            return StepResult([], [], []), None
        batch = Batch.concatenate(kept, self.backend)
        logits = self.backend.decode(batch.state, batch.next_ids)
        choice = batch.sampler.choose(logits, batch.history)
        batch.history.append(choice.ids)
        batch.next_ids = choice.ids
        self.batches[batch.id] = batch
        return self._result(batch, choice), batch

    def clear(self, batch_id: int | None = None) -> None:
        if batch_id is None:
            self.batches.clear()
        else:
            self.batches.pop(batch_id, None)

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
