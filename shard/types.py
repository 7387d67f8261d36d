"""Values that cross the shard's internal boundaries (server <-> engine <-> backend)."""

from __future__ import annotations

from dataclasses import dataclass, field

from common.params import SamplingParams

__all__ = ["PromptLogprobs", "RequestFailure", "RequestSpec", "SamplingParams", "StepResult"]


@dataclass(frozen=True)
class RequestSpec:
    id: int
    input_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 20
    prefill_logprobs: bool = False
    top_n_tokens: int = 0
    min_new_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()
    # Test-only fault hook (shard/faults.py); "" = none.
    fault: str = ""
    # Prefix-cache blocks are shared only between requests with the same salt.
    cache_salt: str = ""
    # The client request this sequence belongs to (0: its own id): the scheduler is fair between them.
    group: int = 0
    # TGI's ignore_eos_token: the end-of-sequence ids do not end it.
    ignore_eos: bool = False
    # The LoRA adapter it runs with ("" = the base model; shard/paged/lora.py).
    adapter_id: str = ""


@dataclass(frozen=True)
class RequestFailure:
    """A request that failed on its own in a step (its batch-mates went on)."""

    request_id: int
    message: str


@dataclass(frozen=True)
class PromptLogprobs:
    request_id: int
    ids: list[int]
    logprobs: list[float]


@dataclass
class StepResult:
    """One step's output for every request of a batch, as parallel columns.

    Row ``i`` owns ``top_ids[i * top_n:(i + 1) * top_n]`` (most likely first).
    """

    request_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    top_n: int = 0
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)
    prefill: list[PromptLogprobs] = field(default_factory=list)
    failures: list[RequestFailure] = field(default_factory=list)

    def take(self, keep: list[int]) -> StepResult:
        """The token rows ``keep`` (indices, in order), with this result's prompt log-probabilities and
        failures."""
        width = self.top_n
        return StepResult(
            request_ids=[self.request_ids[i] for i in keep],
            token_ids=[self.token_ids[i] for i in keep],
            logprobs=[self.logprobs[i] for i in keep],
            top_n=width,
            top_ids=[v for i in keep for v in self.top_ids[i * width : (i + 1) * width]],
            top_logprobs=[v for i in keep for v in self.top_logprobs[i * width : (i + 1) * width]],
            prefill=self.prefill,
            failures=self.failures,
        )

    @staticmethod
    def join(results: list[StepResult]) -> StepResult:
        """One step's results side by side (top alternatives padded to the widest)."""
        results = [r for r in results if r.request_ids or r.failures or r.prefill]
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
