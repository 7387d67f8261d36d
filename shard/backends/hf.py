"""The transformers backend: any ``AutoModelForCausalLM`` with a left-padded, resident KV cache.

Layout (as TGI's CausalLM): every row of a batch shares one padded length ``L``; a row's real tokens are
its last ``n`` slots, padding sits on the left and is masked out. Decoding appends one slot to every row.
Joining batches pads the shorter caches on the left; leaving trims the left padding no remaining row
needs. No row is ever recomputed. Rotary positions come from each row's own token count, so padding
does not shift them.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from common.quantize import BITSANDBYTES

from ..config import ShardConfig
from ..dist import Parallel
from ..dtypes import DTYPES, default_dtype
from .base import BackendInfo, PrefillOutput

if TYPE_CHECKING:
    from transformers import DynamicCache

log = logging.getLogger(__name__)


def bnb_config(quantize: str, compute_dtype: torch.dtype) -> object:
    """transformers' BitsAndBytesConfig for ``--quantize bitsandbytes[-nf4|-fp4]``: LLM.int8, or 4-bit
    NF4/FP4 weights computing in ``compute_dtype``."""
    from common.quantize import BITSANDBYTES, require

    require(quantize)
    from transformers import BitsAndBytesConfig

    mode = BITSANDBYTES[quantize]
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=compute_dtype
    )


@dataclass
class HFState:
    """A batch's KV cache: ``attention_mask`` [batch, L] marks real slots; ``positions`` [batch] is each
    row's next rotary position (its number of real tokens)."""

    cache: DynamicCache
    attention_mask: torch.Tensor
    positions: torch.Tensor


class HFBackend:
    """Runs a transformers causal LM; implements ``shard.backends.base.Backend``."""

    def __init__(
        self,
        model_path: Path | str,
        device: torch.device,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        quantize: str | None = None,
    ) -> None:
        from transformers import AutoModelForCausalLM, DynamicCache

        self.device = device
        torch_dtype = DTYPES[dtype] if dtype else default_dtype(device, model_path, quantize)
        kwargs: dict = {}
        if quantize:
            # bitsandbytes quantizes the weights as they load, on the device they load to.
            kwargs = {"quantization_config": bnb_config(quantize, torch_dtype), "device_map": {"": device}}
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kwargs
        )
        self.model.eval()
        if not quantize:  # a bitsandbytes model is where it loaded (and refuses .to)
            self.model.to(device)  # type: ignore[arg-type]  # transformers types its decorated .to as unbound
        self._cache_class = DynamicCache
        params = inspect.signature(self.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._has_logits_to_keep = "logits_to_keep" in params
        config = self.model.config.get_text_config()
        self.info = BackendInfo(
            name=f"transformers+{quantize}" if quantize else "transformers",
            dtype=str(torch_dtype).removeprefix("torch."),
            device_type=device.type,
            requires_padding=True,
            eos_token_ids=self._eos_ids(),
            vocab_size=int(config.vocab_size),
            max_position_embeddings=int(getattr(config, "max_position_embeddings", 0) or 0),
        )
        log.info(
            "Loaded %s (%s, %s%s) from %s: %.0f MiB of weights",
            type(self.model).__name__,
            self.info.dtype,
            device,
            f", {quantize}" if quantize else "",
            model_path,
            self.model.get_memory_footprint() / 2**20,
        )

    def _eos_ids(self) -> list[int]:
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = getattr(self.model.config, "eos_token_id", None)
        if eos is None:
            return []
        return [int(e) for e in eos] if isinstance(eos, list | tuple) else [int(eos)]

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        keep: int,
    ) -> torch.Tensor:
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if self._has_logits_to_keep:
            kwargs["logits_to_keep"] = keep
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, **kwargs)
        return out.logits

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], want_prompt_logits: list[bool]) -> PrefillOutput:
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._cache_class(config=self.model.config)
        logits = self._forward(ids, mask, positions, cache, keep=0 if any(want_prompt_logits) else 1)
        prompt_logits = [
            logits[row, width - n :] if want else None
            for row, (n, want) in enumerate(zip(lengths, want_prompt_logits, strict=True))
        ]
        state = HFState(cache, mask, torch.tensor(lengths, dtype=torch.long, device=self.device))
        return PrefillOutput(state, logits[:, -1, :], prompt_logits)

    @torch.inference_mode()
    def decode(self, state: HFState, input_ids: torch.Tensor) -> torch.Tensor:
        mask = F.pad(state.attention_mask, (0, 1), value=1)
        logits = self._forward(
            input_ids.unsqueeze(1), mask, state.positions.unsqueeze(1), state.cache, keep=1
        )
        state.attention_mask = mask
        state.positions = state.positions + 1
        return logits[:, -1, :]

    def _layers(self, state: HFState) -> list[Any]:
        """The cache's layers, each with ``keys`` and ``values`` [batch, kv heads, L, head dim]
        (transformers types them as a union of layer kinds, some without either)."""
        return list(state.cache.layers)

    def select(self, state: HFState, index: torch.Tensor) -> HFState:
        mask = state.attention_mask[index]
        keep = max(int(mask.sum(dim=1).max()), 1)
        for layer in self._layers(state):
            length = layer.keys.shape[-2]
            start = max(0, length - keep)
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        return HFState(state.cache, mask[:, mask.shape[1] - keep :], state.positions[index])

    def concatenate(self, states: list[HFState]) -> HFState:
        width = max(s.attention_mask.shape[1] for s in states)
        masks = [F.pad(s.attention_mask, (width - s.attention_mask.shape[1], 0)) for s in states]
        merged = states[0].cache
        layers = [self._layers(s) for s in states]
        for layer_idx, layer in enumerate(layers[0]):
            parts = [state_layers[layer_idx] for state_layers in layers]
            length = max(p.keys.shape[-2] for p in parts)
            layer.keys = torch.cat([F.pad(p.keys, (0, 0, length - p.keys.shape[-2], 0)) for p in parts])
            layer.values = torch.cat([F.pad(p.values, (0, 0, length - p.values.shape[-2], 0)) for p in parts])
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = width
        return HFState(merged, torch.cat(masks), torch.cat([s.positions for s in states]))

    def release(self, state: HFState) -> None:
        """Nothing to do: the cache's tensors go when the last reference to them does."""

    def max_supported_total_tokens(self) -> int | None:
        return None


def load(config: ShardConfig, device: torch.device, parallel: Parallel) -> HFBackend:
    """The ``transformers`` entry point of ``text_generation.backends`` (one rank only)."""
    quantize = config.quantize if config.quantize in BITSANDBYTES else None
    return HFBackend(config.model_path, device, config.dtype, config.trust_remote_code, quantize=quantize)
