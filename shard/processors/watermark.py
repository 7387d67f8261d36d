"""Watermarking (Kirchenbauer et al., "A Watermark for Large Language Models", 2023), as TGI's
``watermark`` parameter, and its detector.

At every step the previous token seeds a pseudo-random split of the vocabulary: a "green" fraction
``gamma`` of the ids gets ``delta`` added to its logits, so watermarked text holds more green tokens than
chance. Whoever knows the key counts them: ``detect`` turns the count into a z-score, without the model.

Here the split is a keyed hash, not a seeded permutation: token ``v`` is green after token ``p`` when
``hash32(hash32(p ^ key) ^ v) < gamma * 2**32``. It needs no generator state, is the same on every rank
and device, and the detector computes it for (previous, token) pairs directly.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ..sampling import mix32
from .base import LogitsProcessor, ProcessorArgumentError, ProcessorContext

# TGI's default hash key (a prime); the detector must use the generator's key.
DEFAULT_KEY = 15485863
# Default z-score threshold (the paper's): above it, text is called watermarked.
DEFAULT_Z_THRESHOLD = 4.0
_GREEN_CACHE = 1024


def is_green(
    previous: torch.Tensor, tokens: torch.Tensor, gamma: float, key: int = DEFAULT_KEY
) -> torch.Tensor:
    """Whether each of ``tokens`` is green after its ``previous`` token (broadcasting int64 tensors)."""
    seed = mix32((previous.long() ^ key) & 0xFFFFFFFF)
    return mix32(seed ^ tokens.long()) < int(gamma * 2**32)


@dataclass(frozen=True)
class WatermarkDetection:
    """A detector's verdict on one token sequence."""

    scored_tokens: int
    green_tokens: int
    green_fraction: float
    z_score: float
    p_value: float
    watermarked: bool


def detect(
    token_ids: list[int],
    gamma: float = 0.5,
    key: int = DEFAULT_KEY,
    z_threshold: float = DEFAULT_Z_THRESHOLD,
    prompt_last_id: int | None = None,
) -> WatermarkDetection:
    """Counts the green tokens of ``token_ids`` (each scored against the token before it; the first one
    against ``prompt_last_id`` when given) and tests them against chance with a one-sided z-test."""
    ids = ([prompt_last_id] if prompt_last_id is not None else []) + list(token_ids)
    if len(ids) < 2:
        raise ValueError("the watermark detector needs at least one scored token")
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be in (0, 1); given {gamma}")
    t = torch.tensor(ids, dtype=torch.long)
    scored = len(ids) - 1
    green = int(is_green(t[:-1], t[1:], gamma, key).sum())
    z = (green - gamma * scored) / math.sqrt(scored * gamma * (1.0 - gamma))
    return WatermarkDetection(
        scored_tokens=scored,
        green_tokens=green,
        green_fraction=green / scored,
        z_score=z,
        p_value=0.5 * math.erfc(z / math.sqrt(2.0)),
        watermarked=z > z_threshold,
    )


class Watermark(LogitsProcessor):
    """Adds ``delta`` to the logits of the green list that the previous token selects."""

    name = "watermark"
    order = 100

    def __init__(self) -> None:
        self.gamma = 0.5
        self.delta = 2.0
        self.key = DEFAULT_KEY
        self.vocab = torch.arange(0)
        self._green: OrderedDict[int, torch.Tensor] = OrderedDict()

    def setup(self, context: ProcessorContext) -> None:
        self.gamma = float(context.options.get("watermark_gamma", self.gamma))
        self.delta = float(context.options.get("watermark_delta", self.delta))
        if not 0.0 < self.gamma < 1.0:
            raise ValueError(f"--watermark-gamma must be in (0, 1); given {self.gamma}")
        self.vocab = torch.arange(context.vocab_size, dtype=torch.long, device=context.device)

    def new_state(self, argument: str | None, prompt_ids: list[int]) -> Any:
        if argument:
            raise ProcessorArgumentError("the watermark takes no per-request argument")
        return True

    def apply(self, scores: torch.Tensor, states: list[Any], last_ids: torch.Tensor) -> torch.Tensor:
        masks = torch.stack([self._green_after(int(p)) for p in last_ids.tolist()])
        return scores + masks[:, : scores.shape[1]].to(scores.dtype) * self.delta

    def _green_after(self, previous: int) -> torch.Tensor:
        """The green mask after ``previous`` (cached for the most recent previous tokens)."""
        mask = self._green.get(previous)
        if mask is None:
            mask = is_green(
                torch.tensor(previous, device=self.vocab.device), self.vocab, self.gamma, self.key
            )
            self._green[previous] = mask
            if len(self._green) > _GREEN_CACHE:
                self._green.popitem(last=False)
        else:
            self._green.move_to_end(previous)
        return mask
