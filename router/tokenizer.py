"""The router's tokenizer: a fast Hugging Face tokenizer loaded from the model directory."""

from __future__ import annotations

import functools
from pathlib import Path


class Tokenizer:
    """Thread-safe encode/decode plus the token facts the API reports (special ids, token strings)."""

    def __init__(self, name_or_path: str | Path, revision: str | None = None) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision)
        self.special_ids = frozenset(int(i) for i in self.hf.all_special_ids)
        self.eos_token_id = self.hf.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = False, **kwargs: object) -> str:
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens, **kwargs)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one tokenizer per process, bounded cache
    def token_text(self, token_id: int) -> str:
        """A single token decoded on its own (TGI's text for prefill and top tokens)."""
        return self.hf.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def is_special(self, token_id: int) -> bool:
        return token_id in self.special_ids
