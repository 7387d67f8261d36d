"""The logits-processor contract: what a plugin implements to change next-token scores on the shard.

A processor is one object per shard process (built once, from its entry point, at start-up). It acts on
the rows of a batch that use it: a row uses a processor when its request names it (the request's
``processors`` map: name -> argument, a string the router validated) or when the server enabled the
processor for every request (``--plugin NAME``; the argument is then None).

Per step, for each processor in ``order`` (lowest first), the sampler calls ``apply`` once with the rows
that use it, after the penalties and before temperature and the top-k/top-p/min-p/typical-p warpers, then
``advance`` once the batch's tokens are chosen. Rows keep their state object across steps; the shard moves
it with its row when batches are joined or filtered, so a state must not refer to its row number.
Every rank of a sharded model runs the same processors on the same full-vocabulary scores, so a processor
must be deterministic: the same inputs give the same scores on every rank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class ProcessorArgumentError(ValueError):
    """A request's argument for a processor is invalid; the request fails with this message."""


@dataclass(frozen=True)
class ProcessorContext:
    """What a processor may know of the shard it runs in."""

    # The model directory: config.json, the tokenizer files (tokenizer.json, tokenizer_config.json).
    model_path: Path
    # Rows of the scores tensor the processor sees (the model's output width, which may exceed the
    # tokenizer's vocabulary).
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    device: torch.device
    # Server-wide options given at start-up (e.g. watermark_gamma), by name.
    options: dict[str, Any] = field(default_factory=dict)


class LogitsProcessor(ABC):
    """A per-request logits processor (see the module docstring for when it runs)."""

    #: The name requests and ``--plugin`` use; also the entry point's name.
    name: str = ""
    #: Processors run in ascending order; built-ins use 100 (watermark) and 500 (grammar).
    order: int = 1000

    def setup(self, context: ProcessorContext) -> None:  # noqa: B027 - optional hook
        """Called once, before the first request, with the shard's model and options."""

    @abstractmethod
    def new_state(self, argument: str | None, prompt_ids: list[int]) -> Any:
        """The state of a new row. ``argument`` is the request's (None when the processor runs for every
        request). Returns None when this row does not need the processor after all. Raises
        ProcessorArgumentError for an argument it cannot use."""

    @abstractmethod
    def apply(self, scores: torch.Tensor, states: list[Any], last_ids: torch.Tensor) -> torch.Tensor:
        """Returns the processed scores of the rows that use this processor.

        ``scores``: [rows, vocab] float32 (a copy: it may be changed in place and returned); ``states``:
        those rows' states, in the same order; ``last_ids``: each row's latest token (its prompt's last on
        the first step)."""

    def advance(self, states: list[Any], ids: list[int]) -> None:  # noqa: B027 - optional hook
        """Tells the rows' states which token each row chose this step (same order as ``apply``)."""
