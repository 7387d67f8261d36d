"""router/generation.py: the batching loop's fast path (``plain``, then ``begin``/``push``) gives the same
events, text and ending as accounting every token with ``push`` alone (which decodes each one)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from common.params import SamplingParams
from router.generation import GenerationState, StreamEvent
from router.tokenizer import Tokenizer
from router.validation import ValidRequest

pytestmark = pytest.mark.timeout(60)

WORDS = ["The", " capital", " of", " France", " is", " Paris", ".", " café", " 東京", " 🤗", "\n", " stop"]


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_model_dir)


def request(prompt_ids: list[int], rng: random.Random, stop_ids: tuple[int, ...]) -> ValidRequest:
    return ValidRequest(
        inputs="prompt",
        input_ids=prompt_ids,
        parameters=SamplingParams(),
        max_new_tokens=rng.randint(1, 40),
        stop=rng.choice([[], [], [" Paris"], ["op", "東"]]),
        details=False,
        decoder_input_details=False,
        top_n_tokens=0,
        return_full_text=False,
        seed=None,
        ignore_eos_token=rng.random() < 0.3,
        include_stop=rng.random() < 0.5,
        min_new_tokens=rng.choice([0, 0, 3]),
        skip_special_tokens=rng.random() < 0.7,
        stop_token_ids=rng.choice([(), stop_ids]),
    )


def summary(event: StreamEvent) -> tuple:
    f = event.finished
    t = event.token
    return (
        t.id,
        t.text,
        t.special,
        event.delta,
        f and (f.generated_text, f.finish_reason, f.generated_tokens),
    )


def fast(state: GenerationState, token_id: int) -> tuple[StreamEvent, bool]:
    """The batching loop's way; and whether ``plain`` took the token."""
    event = state.plain(token_id, -0.5)
    if event is not None:
        return event, True
    text = state.begin(token_id)
    if type(text) is tuple:
        prefix, full = state.tokenizer.decode_batch(list(text))
        return state.push(token_id, -0.5, [], (prefix, full)), False
    return state.push(token_id, -0.5, [], text=text), False


def test_fast_path_matches_push_alone(tok: Tokenizer) -> None:
    rng = random.Random(11)
    eos = frozenset([tok.eos_token_id]) if tok.eos_token_id is not None else frozenset()
    specials = sorted(tok.special_ids)
    plain = 0
    for _ in range(300):
        ids = tok.encode(
            "".join(rng.choice(WORDS) for _ in range(rng.randint(1, 25))), add_special_tokens=False
        )
        for _ in range(rng.randint(0, 2)):
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(specials))
        prompt = tok.encode(
            "".join(rng.choice(WORDS) for _ in range(rng.randint(0, 4))), add_special_tokens=False
        )
        valid = request(prompt, rng, tuple(tok.encode(" is", add_special_tokens=False)[:1]))
        reference, candidate = GenerationState(valid, tok, eos), GenerationState(valid, tok, eos)
        for token_id in ids:
            event, took = fast(candidate, token_id)
            expected = summary(reference.push(token_id, -0.5, []))
            assert summary(event) == expected, (prompt, ids, token_id)
            plain += took
            if expected[-1] is not None:
                break
    assert plain > 100
