"""Prompts: the user's text, or a synthetic one of an approximate token length."""

from __future__ import annotations

import random

# Common English words; with a leading space each is a single token in the usual BPE vocabularies
# (GPT-2, Llama, Mistral, SmolLM), so N words make about N tokens.
_TEXT = (
    "the of and to in is was for on that with as by at from his it an were are which this be or has had "
    "not but first one their its new after who they have her she two been other when there all during "
    "into school time may years more most only over city some world would where later up such used many "
    "can state about national out known university united then made"
)
_WORDS = tuple(_TEXT.split())


def synthetic_prompt(num_tokens: int, rng: random.Random | None = None) -> str:
    """A prompt of about ``num_tokens`` tokens (exact length depends on the model's tokenizer).

    Without ``rng`` it is always the same text; with one, the words are drawn from it, so that prompts
    differ from their first words on (a server's prefix cache cannot reuse one request's prompt for the
    next) while staying reproducible from a seed.
    """
    if num_tokens < 1:
        raise ValueError(f"input_tokens must be >= 1, got {num_tokens}")
    if rng is None:
        return " ".join(_WORDS[i % len(_WORDS)] for i in range(num_tokens))
    return " ".join(rng.choices(_WORDS, k=num_tokens))
