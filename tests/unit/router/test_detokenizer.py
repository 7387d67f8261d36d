"""router/detokenizer.py: incremental detokenization and stop strings.

The tokenizer is the tiny byte-level BPE of ``tiny_model_dir``: its vocabulary is trained on a small
English corpus, so accented letters, CJK and emoji are split into byte tokens that decode to U+FFFD on
their own. Streamed text must still add up to the full decode, with no broken character in any delta.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from router.detokenizer import REPLACEMENT, IncrementalDetokenizer, StopMatcher
from router.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(60)

TEXTS = [
    "café naïve 東京 🤗🚀",
    "Hello world! 👋🏽 résumé, crème brûlée",
    "日本語のテキストと中文文本",
    "emoji family 👨\u200d👩\u200d👧 and flags 🇫🇷🇩🇪",
    "Ünïcödé ✓ ½ € 𝄞 — “quotes” …",
    "def add(a, b):\n    return a + b\n",
    "  leading spaces,\ttabs\n\nand blank lines  ",
    "Ελληνικά και русский текст",
    "🤗",
    "a",
    "The capital of France is Paris.",
]

CHAR_POOL = (
    list("abcxyz ,.!?\n") + list("éüñçøß") + list("東京日本語中文") + ["🤗", "🚀", "👋🏽", "€", "𝄞", "Ω"]
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir: Path):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def stream(tok, prompt_ids: list[int], ids: list[int], context: int = 5) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, context=context)
    deltas = [detok.push(i) for i in ids]
    return deltas, detok.flush()


# --------------------------------------------------------------------------------------------- detokenizer


def test_tokenizer_splits_multibyte_characters(tok) -> None:
    """Sanity: the texts below do exercise tokens that are partial characters."""
    partial = [i for text in TEXTS for i in tok.encode(text) if REPLACEMENT in decode(tok, [i])]
    assert len(partial) > 20


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt", ["", "Hello", "東京 🤗", "User: hi\nAssistant:"])
def test_deltas_add_up_to_full_decode(tok, text: str, prompt: str) -> None:
    ids = tok.encode(text)
    deltas, tail = stream(tok, tok.encode(prompt), ids)
    assert "".join(deltas) + tail == decode(tok, ids) == text
    assert tail == ""  # the text ends on a whole character: nothing left over
    for delta in deltas:
        assert REPLACEMENT not in delta


def test_multibyte_character_waits_for_its_last_byte(tok) -> None:
    ids = tok.encode("a🤗")
    assert decode(tok, ids[:1]) == "a"
    detok = IncrementalDetokenizer(tok, [])
    deltas = [detok.push(i) for i in ids]
    assert deltas[0] == "a"
    assert all(d == "" for d in deltas[1:-1])
    assert deltas[-1] == "🤗"


def test_leading_space_follows_the_prompt(tok) -> None:
    full = tok.encode("Hello world")
    prompt = tok.encode("Hello")
    assert full[: len(prompt)] == prompt
    deltas, tail = stream(tok, prompt, full[len(prompt) :])
    assert "".join(deltas) + tail == " world"


def test_context_sizes(tok) -> None:
    ids = tok.encode("naïve 🤗 text")
    for context in (0, 1, 2, 5, 50):
        deltas, tail = stream(tok, tok.encode("some prompt café"), ids, context=context)
        assert "".join(deltas) + tail == "naïve 🤗 text"
        assert all(REPLACEMENT not in d for d in deltas)


def test_prompt_starting_inside_a_character(tok) -> None:
    """A left-truncated prompt can start with continuation bytes; they must not leak into the output."""
    prompt = tok.encode("🤗🚀 ok")[1:]
    assert decode(tok, prompt).startswith(REPLACEMENT)
    for context in (1, 3, 5):
        deltas, tail = stream(tok, prompt, tok.encode(" done é"), context=context)
        assert "".join(deltas) + tail == " done é"


def test_flush_releases_an_unfinished_character(tok) -> None:
    ids = tok.encode("ab🤗")[:-1]  # the emoji's last byte never comes
    assert decode(tok, ids).endswith(REPLACEMENT)
    detok = IncrementalDetokenizer(tok, tok.encode("x"))
    deltas = [detok.push(i) for i in ids]
    assert "".join(deltas) == "ab"
    assert all(REPLACEMENT not in d for d in deltas)
    tail = detok.flush()
    assert tail.startswith(REPLACEMENT)
    assert "".join(deltas) + tail == decode(tok, ids)
    assert detok.flush() == ""  # nothing twice


def test_flush_with_nothing_withheld(tok) -> None:
    detok = IncrementalDetokenizer(tok, tok.encode("prompt"))
    assert detok.flush() == ""
    assert detok.push(tok.encode("Hello")[0]) == "Hello"
    assert detok.flush() == ""


def test_broken_bytes_followed_by_text_are_released(tok) -> None:
    """Bytes that never form a character are released once ordinary text follows them."""
    broken = tok.encode("🤗")[:1]
    ids = broken + tok.encode(" and more")
    deltas, tail = stream(tok, [], ids)
    assert "".join(deltas) + tail == decode(tok, ids)
    assert decode(tok, ids).startswith(REPLACEMENT)


def test_special_tokens_are_decoded_as_text(tok) -> None:
    ids = [*tok.encode("Hi"), tok.eos_token_id]
    deltas, tail = stream(tok, [], ids)
    assert "".join(deltas) + tail == "Hi<|im_end|>"


def test_random_texts_and_prompt_splits(tok) -> None:
    """Property: for many random texts, any prompt/generation split of a token sequence adds up."""
    rng = random.Random(1234)
    for _ in range(150):
        text = "".join(rng.choice(CHAR_POOL) for _ in range(rng.randint(1, 25)))
        prompt = "".join(rng.choice(CHAR_POOL) for _ in range(rng.randint(0, 8)))
        ids = tok.encode(text)
        context = rng.choice([0, 1, 3, 5, 8])
        deltas, tail = stream(tok, tok.encode(prompt), ids, context=context)
        assert "".join(deltas) + tail == text, (prompt, text, context)
        assert all(REPLACEMENT not in d for d in deltas), (prompt, text)
        assert tail == ""


def test_random_token_sequences_match_decode(tok) -> None:
    """Property: arbitrary token ids (broken bytes included) still add up to the full decode."""
    rng = random.Random(99)
    vocab = len(tok)
    for _ in range(150):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 20))]  # no specials
        prompt = tok.encode("".join(rng.choice(CHAR_POOL) for _ in range(rng.randint(0, 6))))
        deltas, tail = stream(tok, prompt, ids)
        full = decode(tok, ids)
        assert "".join(deltas) + tail == full, ids
        if REPLACEMENT not in full:
            assert all(REPLACEMENT not in d for d in deltas)


# ------------------------------------------------------------------- pieces: tokens decoded without decoding


@pytest.fixture(scope="module")
def router_tok(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_model_dir)


def stream_with_pieces(tok: Tokenizer, prompt_ids: list[int], ids: list[int]) -> tuple[list[str], str, int]:
    """The router's way: a token's piece when push_piece takes it, else the decoded windows."""
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas, fast = [], 0
    for i in ids:
        text = detok.push_piece(i, tok.piece(i))
        fast += text is not None
        deltas.append(text if text is not None else detok.push(i))
    return deltas, detok.flush(), fast


def test_piece_is_what_a_token_adds_after_whole_characters(router_tok: Tokenizer) -> None:
    pieces = {i: p for i in range(len(router_tok.hf)) if (p := router_tok.piece(i)) is not None}
    assert len(pieces) > len(router_tok.hf) // 2
    assert all(router_tok.piece(i) is None for i in router_tok.special_ids)
    assert all(REPLACEMENT not in p and p for p in pieces.values())
    for context in ("", "Hello", "café 東京 🤗"):
        ctx = router_tok.encode(context, add_special_tokens=False)
        for i, piece in pieces.items():
            assert router_tok.decode([*ctx, i]) == router_tok.decode(ctx) + piece, (context, i)


def test_pieces_give_the_same_deltas_as_decoding(tok, router_tok: Tokenizer) -> None:
    """Property: with pieces, every delta is the one the windowed decoding gives (broken bytes included),
    and most tokens skip decoding."""
    rng = random.Random(7)
    vocab, total, fast = len(tok), 0, 0
    for round_ in range(300):
        if round_ % 2:
            ids = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))]
        else:
            ids = tok.encode("".join(rng.choice(CHAR_POOL) for _ in range(rng.randint(1, 30))))
        prompt = tok.encode("".join(rng.choice(CHAR_POOL) for _ in range(rng.randint(0, 6))))
        expected, expected_tail = stream(tok, prompt, ids)
        deltas, tail, used = stream_with_pieces(router_tok, prompt, ids)
        assert (deltas, tail) == (expected, expected_tail), (prompt, ids)
        total, fast = total + len(ids), fast + used
    assert fast > total // 5  # the tiny vocabulary has many partial-character tokens


def test_no_piece_without_a_byte_level_decoder(router_tok: Tokenizer) -> None:
    plain = Tokenizer.__new__(Tokenizer)
    plain.__dict__.update(router_tok.__dict__, _byte_level=False, _pieces={})
    assert all(plain.piece(i) is None for i in range(50, 150))


# --------------------------------------------------------------------------------------------- stop matcher


def reference_cut(text: str, stops: list[str], include_stop: bool) -> tuple[str, bool]:
    """The text as it must come out: cut at the stop string that completes first (earliest end).

    Among stops completing at the same place, the one starting first (the longest) wins.
    """
    found = [(i + len(s), i, s) for s in stops if s and (i := text.find(s)) >= 0]
    if not found:
        return text, False
    end, start, _ = min(found)
    return (text[:end] if include_stop else text[:start]), True


def run_matcher(chunks: list[str], stops: list[str], include_stop: bool) -> tuple[str, bool, list[str]]:
    matcher = StopMatcher(stops, include_stop=include_stop)
    released: list[str] = []
    for chunk in chunks:
        text, hit = matcher.push(chunk)
        released.append(text)
        if hit:
            return "".join(released), True, released
    released.append(matcher.flush())
    return "".join(released), False, released


def split_randomly(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), k=rng.randint(0, len(text) - 1))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def test_no_stops_passes_through() -> None:
    matcher = StopMatcher([])
    assert matcher.push("Hello") == ("Hello", False)
    assert matcher.push("") == ("", False)
    assert matcher.flush() == ""


def test_empty_stop_strings_are_ignored() -> None:
    matcher = StopMatcher(["", ""])
    assert matcher.push("abc") == ("abc", False)
    matcher = StopMatcher(["", "x"])
    assert matcher.push("abc") == ("abc", False)
    assert matcher.push("axb") == ("ax", True)


def test_prefix_of_stop_is_held_until_resolved() -> None:
    matcher = StopMatcher(["Hello"], include_stop=False)
    assert matcher.push("Say He") == ("Say ", False)
    assert matcher.push("l") == ("", False)
    assert matcher.push("lp") == ("Hellp", False)  # resolved: not the stop after all
    assert matcher.push("H") == ("", False)
    assert matcher.push("ello world") == ("", True)


@pytest.mark.parametrize(("include_stop", "expected"), [(True, "one two###"), (False, "one two")])
def test_cuts_at_the_stop(include_stop: bool, expected: str) -> None:
    matcher = StopMatcher(["###"], include_stop=include_stop)
    assert matcher.push("one two### three ###") == (expected, True)


@pytest.mark.parametrize("include_stop", [True, False])
def test_stop_split_over_many_deltas(include_stop: bool) -> None:
    chunks = ["The answer", " is 4", "2", ".", "<", "|", "e", "n", "d", "|", ">", " ignored"]
    out, hit, released = run_matcher(chunks, ["<|end|>"], include_stop)
    assert hit
    assert out == ("The answer is 42.<|end|>" if include_stop else "The answer is 42.")
    assert released[:4] == ["The answer", " is 4", "2", "."]  # nothing held needlessly
    assert released[4:-1] == ["", "", "", "", "", ""]


def test_held_text_released_by_flush() -> None:
    matcher = StopMatcher(["</answer>"])
    assert matcher.push("42 </ans") == ("42 ", False)
    assert matcher.flush() == "</ans"
    assert matcher.flush() == ""


def test_repeated_characters_in_stop() -> None:
    """A held "aa" followed by "a" releases one "a" and keeps holding "aa"."""
    matcher = StopMatcher(["aab"], include_stop=False)
    assert matcher.push("a") == ("", False)
    assert matcher.push("a") == ("", False)
    assert matcher.push("a") == ("a", False)
    assert matcher.push("b") == ("", True)
    out, hit, _ = run_matcher(list("xaaaab"), ["aab"], include_stop=True)
    assert (out, hit) == ("xaaaab", True)


def test_several_overlapping_stops() -> None:
    stops = ["\n\nUser:", "Assistant:", "###"]
    assert run_matcher(["Hi\n", "\nUser: x"], stops, False)[:2] == ("Hi", True)
    assert run_matcher(["Hi\n", "\nUser: x"], stops, True)[:2] == ("Hi\n\nUser:", True)
    assert run_matcher(["Hi\n\nAssis", "tant: ### User:"], stops, True)[:2] == ("Hi\n\nAssistant:", True)
    # Stops overlapping each other in the text: the first one to complete wins.
    assert run_matcher(["xab", "a"], ["ab", "ba"], True)[:2] == ("xab", True)
    assert run_matcher(["xb", "ab"], ["ab", "ba"], True)[:2] == ("xba", True)
    assert run_matcher(["xbab"], ["ab", "ba"], False)[:2] == ("x", True)
    # A held tail that could start either of two stops: the one that completes wins.
    matcher = StopMatcher(["abcd", "cdef"])
    assert matcher.push("xabc") == ("x", False)  # "abc" (for "abcd") and "c" (for "cdef") held
    assert matcher.push("de") == ("abcd", True)
    matcher = StopMatcher(["abcd", "cdef"], include_stop=False)
    assert matcher.push("xabc") == ("x", False)
    assert matcher.push("Xcde") == ("abcX", False)  # "abcd" is off; "cde" is still held for "cdef"
    assert matcher.push("f!") == ("", True)


def test_stop_found_as_soon_as_it_completes() -> None:
    matcher = StopMatcher(["abcd", "cdef"])
    assert matcher.push("xabc") == ("x", False)
    assert matcher.push("d") == ("abcd", True)


@pytest.mark.parametrize(
    ("stops", "text", "include_stop", "expected"),
    [
        (["abc", "b"], "xabcx", True, "xab"),
        (["abc", "b"], "xabcx", False, "xa"),
        (["\n\nUser:", "\n\n"], "Hi\n\nUser: x", True, "Hi\n\n"),
    ],
)
def test_stop_nested_inside_a_longer_stop_cuts_at_first_completion(
    stops: list[str], text: str, include_stop: bool, expected: str
) -> None:
    """A stop inside a longer one completes first; the result must not depend on the chunking."""
    per_char = run_matcher(list(text), stops, include_stop)[:2]
    whole = run_matcher([text], stops, include_stop)[:2]
    assert per_char == (expected, True)
    assert whole == per_char, f"one delta gives {whole}, one character at a time gives {per_char}"


@pytest.mark.parametrize("include_stop", [True, False])
def test_random_splits_match_reference(include_stop: bool) -> None:
    """Property: whatever the chunking, the output is the reference cut (stops not nested in others)."""
    rng = random.Random(7 + include_stop)
    alphabet = "abcd é🤗"
    for _ in range(400):
        stops = []
        while len(stops) < rng.randint(1, 3):
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
            if not any(s in t or t in s for t in stops):
                stops.append(s)
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        expected = reference_cut(text, stops, include_stop)
        for _ in range(4):
            chunks = split_randomly(rng, text)
            out, hit, _ = run_matcher(chunks, stops, include_stop)
            assert (out, hit) == expected, (text, stops, chunks)


@pytest.mark.parametrize("include_stop", [True, False])
def test_random_splits_match_reference_with_nested_stops(include_stop: bool) -> None:
    """Property: same, with stops that may contain one another."""
    rng = random.Random(70 + include_stop)
    alphabet = "abc"
    failures = []
    for _ in range(300):
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))
        ]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        expected = reference_cut(text, stops, include_stop)
        for _ in range(3):
            chunks = split_randomly(rng, text)
            got = run_matcher(chunks, stops, include_stop)[:2]
            if got != expected:
                failures.append((text, stops, chunks, got, expected))
    assert not failures, f"{len(failures)} mismatches, first: {failures[0]}"


def test_release_invariant_with_per_character_stream() -> None:
    """Property: released text plus held text is always everything pushed so far (before a stop)."""
    rng = random.Random(5)
    for _ in range(200):
        stops = ["".join(rng.choice("xyz") for _ in range(rng.randint(2, 4))) for _ in range(2)]
        matcher = StopMatcher(stops, include_stop=True)
        pushed = released = ""
        for ch in "".join(rng.choice("xyzw") for _ in range(30)):
            pushed += ch
            text, hit = matcher.push(ch)
            released += text
            if hit:
                assert any(released.endswith(s) for s in stops)
                assert all(s not in released[:-1] for s in stops)
                break
            assert pushed.startswith(released)
            held = pushed[len(released) :]
            # Held text is only ever the start of some stop string.
            assert held == "" or any(s.startswith(held) for s in stops)
        else:
            assert released + matcher.flush() == pushed
