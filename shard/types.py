"""Values that cross the shard's internal boundaries (server <-> engine <-> backend)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SamplingParams:
    """Per-request next-token choice. Neutral values switch a step off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0

    @property
    def has_warpers(self) -> bool:
        return self.temperature != 1.0 or self.top_k > 0 or self.top_p < 1.0 or self.typical_p < 1.0

    @property
    def sampling(self) -> bool:
        """TGI's rule: any warper implies sampling, as does do_sample."""
        return self.do_sample or self.has_warpers


@dataclass(frozen=True)
class RequestSpec:
    id: int
    input_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 20
    prefill_logprobs: bool = False
    top_n_tokens: int = 0


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
