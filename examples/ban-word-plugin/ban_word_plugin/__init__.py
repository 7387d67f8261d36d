"""An example text-generation-server plugin: the server never generates one word.

The word comes from the ``BAN_WORD`` environment variable (default ``Paris``) and is matched without
regard to case. Two entry points, both named ``ban-word``:

- ``processor.BanWord`` (``text_generation.logits_processors``): on the shard, gives -inf to every token
  that would complete the word, whether one token holds it whole or it would be spelled over several;
- ``route.add_route`` (``text_generation.router_extensions``): ``GET /ban-word`` on the router.

This module holds what both share: the word and the banned token sets, computed from the model's
``tokenizer.json`` with the tokenizers library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORD = "Paris"


def ban_word() -> str:
    """The word to ban: ``BAN_WORD``, else ``Paris``. An empty word is refused."""
    word = os.environ.get("BAN_WORD", DEFAULT_WORD).strip()
    if not word:
        raise ValueError("BAN_WORD is empty: set it to the word to ban")
    return word


def token_texts(model_path: str | Path) -> list[str]:
    """Each token id's own decoded text (special tokens included), from ``model_path/tokenizer.json``."""
    from tokenizers import Tokenizer

    path = Path(model_path) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the ban-word plugin needs a fast tokenizer file")
    tokenizer = Tokenizer.from_file(str(path))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    return tokenizer.decode_batch([[i] for i in range(size)], skip_special_tokens=False)


@dataclass(frozen=True)
class WordMatcher:
    """A KMP automaton over lower-cased text for one word. A state is the length of the longest end of
    the text generated so far that is a beginning of the word (0 .. len(word) - 1)."""

    word: str  # lower-cased

    @classmethod
    def of(cls, word: str) -> WordMatcher:
        return cls(word.lower())

    @property
    def failure(self) -> list[int]:
        """failure[i]: the longest proper border of word[: i + 1] (classic KMP table)."""
        w, out, k = self.word, [0] * len(self.word), 0
        for i in range(1, len(w)):
            while k and w[i] != w[k]:
                k = out[k - 1]
            if w[i] == w[k]:
                k += 1
            out[i] = k
        return out

    def run(self, state: int, text: str) -> tuple[int, bool]:
        """The state after ``text``, and whether the word was completed on the way."""
        w, failure, completed = self.word, self.failure, False
        for ch in text.lower():
            while state and ch != w[state]:
                state = failure[state - 1]
            if ch == w[state]:
                state += 1
            if state == len(w):
                completed, state = True, failure[state - 1]
        return state, completed

    def borders(self, state: int) -> list[int]:
        """Every k > 0 such that word[:k] ends the matched text word[:state] (state itself first)."""
        out, failure = [], self.failure
        while state:
            out.append(state)
            state = failure[state - 1]
        return out

    def banned(self, texts: list[str]) -> list[list[int]]:
        """For each state, the token ids whose text would complete the word from it: the tokens that
        contain the word, and those that begin with the rest of a beginning the text already ends with."""
        lowered = [t.lower() for t in texts]
        whole = {i for i, t in enumerate(lowered) if self.word in t}
        out = []
        for state in range(len(self.word)):
            ids = set(whole)
            for k in self.borders(state):
                rest = self.word[k:]
                ids.update(i for i, t in enumerate(lowered) if t.startswith(rest))
            out.append(sorted(ids))
        return out

    def containing(self, texts: list[str]) -> list[int]:
        """The token ids whose own text contains the word."""
        return [i for i, t in enumerate(texts) if self.word in t.lower()]
