"""Fixtures of the router's tool-call tests: the tiny model's tokenizer, and llguidance's view of it (the
grammars are checked token by token as the shard's matcher runs them)."""

from __future__ import annotations

from pathlib import Path

import llguidance
import pytest

from router.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def ll_tokenizer(tiny_model_dir: Path, tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(
        (tiny_model_dir / "tokenizer.json").read_text(), eos_token=[tokenizer.eos_token_id]
    )
