"""The sampling parameters of one request: the router validates them, the shard applies them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Per-request next-token choice (mirrors proto NextTokenChooserParameters). Neutral values switch a
    step off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    typical_p: float = 1.0
    do_sample: bool = False
    seed: int = 0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    min_p: float = 0.0
    # (token id, bias) pairs added to the raw logits.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # (logits processor name, argument) pairs this request uses (shard/processors/), sorted by name.
    processors: tuple[tuple[str, str], ...] = ()

    @property
    def has_warpers(self) -> bool:
        return (
            self.temperature != 1.0
            or self.top_k > 0
            or self.top_p < 1.0
            or self.typical_p < 1.0
            or self.min_p > 0.0
        )

    @property
    def sampling(self) -> bool:
        """TGI's rule: any warper implies sampling, as does do_sample."""
        return self.do_sample or self.has_warpers
