"""The protocol every model backend implements (transformers today; CTranslate2 and others later).

A backend owns the model and its KV memory and knows nothing of sampling, requests or the wire: it turns
token ids into next-token logits and keeps each row's cache between steps. The engine (``shard.engine``)
does the rest, identically for every backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class BackendInfo:
    name: str
    dtype: str
    device_type: str
    requires_padding: bool
    eos_token_ids: list[int]
    vocab_size: int
    max_position_embeddings: int = 0
    # Request parameters this backend cannot honour (names as in common.params.SamplingParams, plus
    # "min_new_tokens"); the router refuses requests that use them.
    unsupported_parameters: tuple[str, ...] = ()
    # The LoRA adapters requests may name (``RequestSpec.adapter_id``), in the order given.
    lora_adapters: tuple[str, ...] = ()
    # --max-loras: the most adapters on the device at once (0: all of them).
    max_loras: int = 0


@dataclass
class PrefillOutput:
    """``state``: the backend's per-row KV state; ``logits``: [batch, vocab] for each row's last position;
    ``prompt_logits``: for the rows that asked, [prompt_len, vocab] logits of every prompt position."""

    state: Any
    logits: torch.Tensor
    prompt_logits: list[torch.Tensor | None]


class Backend(Protocol):
    info: BackendInfo
    device: torch.device

    def prefill(self, prompts: list[list[int]], want_prompt_logits: list[bool]) -> PrefillOutput:
        """Runs the prompts, returns their last-position logits and a state holding their KV cache."""
        ...

    def decode(self, state: Any, input_ids: torch.Tensor) -> torch.Tensor:
        """Feeds one token per row ([batch] ids), extends the state in place, returns [batch, vocab] logits."""
        ...

    def select(self, state: Any, index: torch.Tensor) -> Any:
        """The state of the rows in ``index`` (in that order); the other rows' memory can be freed."""
        ...

    def concatenate(self, states: list[Any]) -> Any:
        """One state holding the rows of all ``states``, in order, without recomputing any of them."""
        ...

    def release(self, state: Any) -> None:
        """Gives back the memory of every row of ``state`` (a batch that is dropped as a whole)."""
        ...

    def max_supported_total_tokens(self) -> int | None:
        """Tokens the backend can keep resident in total, when it can measure it (else None)."""
        ...
