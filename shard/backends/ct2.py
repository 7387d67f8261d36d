"""The CTranslate2 backend (``--quantize ct2``): a ``ctranslate2.Generator`` on a converted model.

The launcher converts the model once (launcher/weights.py): the directory it passes holds the model's own
config, generation config and tokenizer files, and the CTranslate2 model in its ``ct2/`` subdirectory.
CTranslate2 owns its decoding loop and KV cache, so this backend brings its own engine
(``shard.ct2_engine.CT2Engine``) instead of the logits-based one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from common.quantize import CT2_UNSUPPORTED_PARAMETERS, ct2_compute_type, ct2_device, require

from ..config import ShardConfig
from ..ct2_engine import CT2Engine
from ..dist import Parallel
from ..faults import Faults
from .base import BackendInfo

log = logging.getLogger(__name__)

CT2_SUBDIR = "ct2"


def ct2_model_dir(model_path: Path) -> Path:
    """The CTranslate2 model of a served directory: ``ct2/`` inside it, or the directory itself."""
    for candidate in (model_path / CT2_SUBDIR, model_path):
        if (candidate / "model.bin").is_file():
            return candidate
    raise ValueError(
        f"{model_path} holds no CTranslate2 model (model.bin): start the server through the launcher with "
        "--quantize ct2, which converts the model once into its weights cache"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _ids(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [int(v) for v in value]
    if isinstance(value, int | float | str):
        return [int(value)]
    raise ValueError(f"expected a token id or a list of them, got {value!r}")


class CT2Backend:
    """Loads the converted model; its engine (``shard.ct2_engine.CT2Engine``) runs requests on it."""

    def __init__(
        self, model_path: Path | str, dtype: str | None = None, threads: int = 0, max_batches: int = 16
    ) -> None:
        require("ct2")
        import ctranslate2

        model_path = Path(model_path)
        directory = ct2_model_dir(model_path)
        device = ct2_device()
        self.compute_type = ct2_compute_type(dtype, device)
        self.max_batches = max(1, max_batches)
        # One worker per batch that can be running (each is paused between steps), plus one for scoring
        # prompts (decoder_input_details) while they all are.
        self.generator = ctranslate2.Generator(
            str(directory),
            device=device,
            compute_type=self.compute_type,
            inter_threads=self.max_batches + 1,
            intra_threads=threads,
        )
        vocabulary = json.loads((directory / "vocabulary.json").read_text())
        if isinstance(vocabulary, dict):  # {token: id}
            vocabulary = [t for t, _ in sorted(vocabulary.items(), key=lambda item: item[1])]
        self.tokens: list[str] = list(vocabulary)
        self.device = torch.device(device)
        config = _read_json(model_path / "config.json")
        text_config = config.get("text_config") or config
        generation = _read_json(model_path / "generation_config.json")
        eos = _ids(generation.get("eos_token_id")) or _ids(text_config.get("eos_token_id"))
        self.info = BackendInfo(
            name="ct2",
            dtype=self.compute_type,
            device_type=device,
            requires_padding=False,
            eos_token_ids=eos,
            vocab_size=len(self.tokens),
            max_position_embeddings=int(text_config.get("max_position_embeddings") or 0),
            unsupported_parameters=CT2_UNSUPPORTED_PARAMETERS,
        )
        log.info(
            "Loaded the CTranslate2 model %s (%s on %s, %d compute threads, up to %d batches)",
            directory,
            self.compute_type,
            device,
            threads or 0,
            self.max_batches,
        )

    def to_tokens(self, ids: list[int]) -> list[str]:
        tokens = self.tokens
        try:
            return [tokens[i] for i in ids]
        except IndexError:
            raise ValueError(f"a token id is outside the model's vocabulary of {len(tokens)}") from None

    def make_engine(self, faults: Faults | None) -> CT2Engine:
        return CT2Engine(self, faults)

    def max_supported_total_tokens(self) -> int | None:
        return None


def load(config: ShardConfig, device: torch.device, parallel: Parallel) -> CT2Backend:
    """The ``ct2`` entry point of ``text_generation.backends`` (``--quantize ct2``; one rank only)."""
    from common.quantize import cores_available

    threads = config.ct2_threads or cores_available()
    return CT2Backend(config.model_path, config.dtype, threads, config.ct2_max_batches)
