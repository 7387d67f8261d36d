"""The ``ban-word`` logits processor (entry point group ``text_generation.logits_processors``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shard.processors.base import LogitsProcessor, ProcessorArgumentError, ProcessorContext

from . import WordMatcher, ban_word, token_texts


@dataclass
class _Row:
    """One row's progress: how much of the word the text generated so far ends with."""

    matched: int = 0


class BanWord(LogitsProcessor):
    """Gives -inf to every token that would complete the banned word (case-insensitive).

    Enabled with ``--plugin ban-word``, it runs for every request (argument None). A request may also
    name it with an empty argument; any other argument is refused.
    """

    name = "ban-word"
    order = 1000  # after the built-ins (watermark 100, grammar 500)

    def setup(self, context: ProcessorContext) -> None:
        """Builds the banned token-id sets once, from the model's tokenizer, on the shard's device."""
        self.word = ban_word()
        self.matcher = WordMatcher.of(self.word)
        texts = token_texts(context.model_path)
        # The scores may be wider than the tokenizer's vocabulary (padded embeddings): ignore the rest.
        texts = texts[: context.vocab_size]
        eos = set(context.eos_token_ids)
        self.banned = [
            torch.tensor([i for i in ids if i not in eos], dtype=torch.long, device=context.device)
            for ids in self.matcher.banned(texts)
        ]
        self.texts = texts

    def new_state(self, argument: str | None, prompt_ids: list[int]) -> Any:
        if argument:
            raise ProcessorArgumentError("ban-word takes no argument (the word is the server's BAN_WORD)")
        return _Row()

    def apply(self, scores: torch.Tensor, states: list[Any], last_ids: torch.Tensor) -> torch.Tensor:
        for row, state in enumerate(states):
            scores[row].index_fill_(0, self.banned[state.matched], float("-inf"))
        return scores

    def advance(self, states: list[Any], ids: list[int]) -> None:
        for state, token in zip(states, ids, strict=True):
            text = self.texts[token] if 0 <= token < len(self.texts) else ""
            state.matched, _ = self.matcher.run(state.matched, text)
