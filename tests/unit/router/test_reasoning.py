"""Reasoning parsers (router/reasoning.py): <think> blocks (DeepSeek-R1, Qwen3, QwQ, SmolLM3) and gpt-oss
harmony channels, whole-text and streamed at every split point, prompt detection, the registry and
entry-point plugins, and reasoning followed by a tool-call parser."""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.plugins import PluginError
from router.reasoning import (
    GptOssReasoningParser,
    ReasoningOutput,
    ReasoningParser,
    ThinkReasoningParser,
    detect_reasoning_parser,
    get_reasoning_parser,
    reasoning_parser_names,
)
from router.toolcalls import HermesParser, ParsedOutput, ToolCallDelta
from tests.fake_plugins import installed

pytestmark = pytest.mark.timeout(120)


def splits(text: str) -> Iterator[list[str]]:
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)
    rng = random.Random(len(text))
    for _ in range(10):
        n = rng.randint(0, min(8, max(len(text) - 1, 0)))
        cuts = sorted(rng.sample(range(1, len(text)), n)) if n else []
        bounds = [0, *cuts, len(text)]
        yield [text[a:b] for a, b in itertools.pairwise(bounds)]


def parse_everywhere(parser: ReasoningParser, text: str, in_reasoning: bool = False) -> ReasoningOutput:
    """The whole-text result, checked against streaming at every split, per character, in random pieces."""
    whole = parser.parse(text, in_reasoning=in_reasoning)
    for pieces in splits(text):
        stream = parser.stream(in_reasoning=in_reasoning)
        out = ReasoningOutput()
        for piece in pieces:
            out += stream.feed(piece)
        out += stream.finish()
        assert out == whole, pieces
        assert stream.finish() == ReasoningOutput()
    return whole


THINK = ThinkReasoningParser()
HARMONY = GptOssReasoningParser()


# ---- <think> -----------------------------------------------------------------------------------------


def test_qwen3_thinking() -> None:
    text = (
        "<think>\nOkay, the user wants to know 17 × 23. Let me compute: 17 × 20 = 340, 17 × 3 = 51, "
        "so 391.\n</think>\n\n17 × 23 = **391**."
    )
    assert parse_everywhere(THINK, text) == ReasoningOutput(
        "Okay, the user wants to know 17 × 23. Let me compute: 17 × 20 = 340, 17 × 3 = 51, so 391.",
        "17 × 23 = **391**.",
    )


def test_deepseek_r1_prompt_opened_think() -> None:
    # DeepSeek-R1's template ends the prompt with "<think>\n": only "</think>" comes.
    prompt = "<｜begin▁of▁sentence｜><｜User｜>Is 97 prime?<｜Assistant｜><think>\n"
    assert THINK.prompt_opens_reasoning(prompt)
    text = (
        "Okay, so I need to check whether 97 is prime. √97 ≈ 9.8, so I test 2, 3, 5, 7.\n"
        "None divides it.\n</think>\n\nYes — **97 is prime**: no prime up to √97 divides it."
    )
    assert parse_everywhere(THINK, text, in_reasoning=True) == ReasoningOutput(
        "Okay, so I need to check whether 97 is prime. √97 ≈ 9.8, so I test 2, 3, 5, 7.\nNone divides it.",
        "Yes — **97 is prime**: no prime up to √97 divides it.",
    )
    # The same response parsed as if the prompt had not opened reasoning is all content.
    assert THINK.parse(text) == ReasoningOutput("", text)
    # An older R1 that writes the opening tag itself, parsed either way.
    assert parse_everywhere(THINK, "<think>\nHmm.\n</think>\nYes.", in_reasoning=True) == ReasoningOutput(
        "Hmm.", "Yes."
    )


def test_prompt_detection() -> None:
    # Qwen3 with enable_thinking=False puts an empty, closed block in the prompt: the answer is content.
    assert not THINK.prompt_opens_reasoning(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )  # fmt: skip
    assert not THINK.prompt_opens_reasoning("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # An earlier turn's closed block does not count; the last one opened does.
    assert THINK.prompt_opens_reasoning("<think>a</think>b<|im_start|>assistant\n<think>\n")
    assert HARMONY.prompt_opens_reasoning("<|start|>assistant<|channel|>analysis<|message|>")
    assert not HARMONY.prompt_opens_reasoning("<|start|>user<|message|>hi<|end|><|start|>assistant")


def test_smollm3_and_qwen3_no_think() -> None:
    assert parse_everywhere(THINK, "<think>\nThe user greets me.\n</think>\nHello! 👋") == ReasoningOutput(
        "The user greets me.", "Hello! 👋"
    )
    # Thinking disabled in the prompt: the output has no tags and is returned unchanged.
    assert parse_everywhere(THINK, "Hello! How can I help you today?\n") == ReasoningOutput(
        "", "Hello! How can I help you today?\n"
    )
    assert parse_everywhere(THINK, "<think>\n\n</think>\n\nDirect answer.") == ReasoningOutput(
        "", "Direct answer."
    )


@pytest.mark.parametrize(
    ("text", "in_reasoning", "expected"),
    [
        ("<think>\nLet me think about whether 2^31 − 1", False, ("Let me think about whether 2^31 − 1", "")),
        ("<think>\nstill thinking \n\n", False, ("still thinking \n\n", "")),  # cut off: kept whole
        ("Still thinking about </thi", True, ("Still thinking about </thi", "")),
        ("Answer first. <think>late</think> rest", False, ("", "Answer first. <think>late</think> rest")),
        ("  <thinking>not the tag</thinking>", False, ("", "  <thinking>not the tag</thinking>")),
        ("<think>a</think>b</think>c", False, ("a", "b</think>c")),
        ("<think>", False, ("", "")),
        ("", False, ("", "")),
        ("", True, ("", "")),
        ("   ", False, ("", "   ")),
        ("<thi", False, ("", "<thi")),
        ("</think>only the end", True, ("", "only the end")),
    ],
)
def test_think_edge_cases(text: str, in_reasoning: bool, expected: tuple[str, str]) -> None:
    assert parse_everywhere(THINK, text, in_reasoning) == ReasoningOutput(*expected)


def test_think_streams_as_it_goes() -> None:
    stream = THINK.stream()
    assert stream.feed("<thi") == ReasoningOutput()
    assert stream.feed("nk>\nFirst") == ReasoningOutput("First")
    assert stream.feed(" step. </th") == ReasoningOutput(" step.")  # " </th" held
    assert stream.feed("ink>\n\nThe") == ReasoningOutput("", "The")
    assert stream.feed(" end.") == ReasoningOutput("", " end.")
    assert stream.finish() == ReasoningOutput()
    with pytest.raises(RuntimeError):
        stream.feed("x")


def test_qwen3_reasoning_then_tool_calls_streamed() -> None:
    """The route's pipeline: reasoning first, its content into a tool-call stream."""
    text = (
        "<think>\nThe user asks for the weather in 東京; I should call get_weather.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "東京", "unit": "celsius"}}\n</tool_call>'
    )
    for pieces in splits(text):
        reasoning = THINK.stream()
        tools = HermesParser().stream()
        thought = ""
        deltas = []
        for piece in [*pieces, None]:
            out = reasoning.feed(piece) if piece is not None else reasoning.finish()
            thought += out.reasoning
            deltas += tools.feed(out.content)
        deltas += tools.finish()
        parsed = ParsedOutput.from_deltas(deltas)
        assert thought == "The user asks for the weather in 東京; I should call get_weather."
        assert parsed.content == ""
        assert [(c.name, c.arguments) for c in parsed.calls] == [
            ("get_weather", '{"city":"東京","unit":"celsius"}')
        ]
        assert isinstance(deltas[0], ToolCallDelta)


# ---- gpt-oss harmony ---------------------------------------------------------------------------------

GPT_OSS_ANSWER = (
    '<|channel|>analysis<|message|>User asks: "What is 2+2?" Simple arithmetic. Provide answer.<|end|>'
    "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>"
)
GPT_OSS_TOOL = (
    "<|channel|>analysis<|message|>Need to use function get_weather for Tokyo.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"location":"Tokyo, Japan"}<|call|>'
)


def test_gpt_oss_answer() -> None:
    assert parse_everywhere(HARMONY, GPT_OSS_ANSWER) == ReasoningOutput(
        'User asks: "What is 2+2?" Simple arithmetic. Provide answer.', "2 + 2 = 4."
    )
    # The end token stripped (it is the stop token), and analysis twice.
    text = (
        "<|channel|>analysis<|message|>First thought.<|end|><|start|>assistant<|channel|>analysis<|message|>"
        " Second.<|end|><|start|>assistant<|channel|>final<|message|>Réponse : 4 ✅"
    )
    assert parse_everywhere(HARMONY, text) == ReasoningOutput("First thought. Second.", "Réponse : 4 ✅")


def test_gpt_oss_tool_call_passes_through_verbatim() -> None:
    assert parse_everywhere(HARMONY, GPT_OSS_TOOL) == ReasoningOutput(
        "Need to use function get_weather for Tokyo.",
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"location":"Tokyo, Japan"}<|call|>',
    )


@pytest.mark.parametrize(
    ("text", "in_reasoning", "expected"),
    [
        ("Plain text from a prompt that already opened the final channel.", False, ("", None)),
        ("Thinking inside an analysis opened by the prompt<|end|>", True, ("Thinking inside an analysis opened by the prompt", "")),
        ("<|channel|>analysis<|message|>cut off mid-thou", False, ("cut off mid-thou", "")),
        ("<|channel|>analysis<|message|>x<|end|><|start|>assistant<|chan", False, ("x", "<|start|>assistant<|chan")),
        ("<|channel|>commentary<|message|>Let me look that up.<|end|>", False, ("", "Let me look that up.")),
        ("<|chan", False, ("", "<|chan")),
        ("", False, ("", "")),
    ],
)  # fmt: skip
def test_gpt_oss_edge_cases(text: str, in_reasoning: bool, expected: tuple[str, str | None]) -> None:
    reasoning, content = expected
    assert parse_everywhere(HARMONY, text, in_reasoning) == ReasoningOutput(
        reasoning, text if content is None else content
    )


@pytest.mark.parametrize("parser", [THINK, HARMONY], ids=lambda p: p.name)
def test_random_garbage_never_raises_and_keeps_text(parser: ReasoningParser) -> None:
    rng = random.Random(11)
    alphabet = ["a", " ", "\n", "é", "<", ">", "|", "<think>", "</think>", "<|channel|>", "<|message|>",
                "<|end|>", "<|start|>", "analysis", "final", "to=", "<|call|>"]  # fmt: skip
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 20)))
        for in_reasoning in (False, True):
            whole = parser.parse(text, in_reasoning)
            stream = parser.stream(in_reasoning)
            out = ReasoningOutput()
            for ch in text:
                out += stream.feed(ch)
            assert out + stream.finish() == whole
            if parser is THINK and not in_reasoning and not text.lstrip().startswith("<think>"):
                assert whole == ReasoningOutput("", text)


# ---- registry, detection, plugins --------------------------------------------------------------------


def test_registry() -> None:
    assert reasoning_parser_names()[:4] == ["think", "deepseek_r1", "qwen3", "gpt_oss"]
    for name in ("think", "deepseek_r1", "qwen3"):
        assert isinstance(get_reasoning_parser(name), ThinkReasoningParser)
    assert isinstance(get_reasoning_parser("gpt_oss"), GptOssReasoningParser)
    assert isinstance(THINK, ReasoningParser)
    with pytest.raises(PluginError, match=r"no reasoning parser named 'nope'"):
        get_reasoning_parser("nope")


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}", "think"),
        ("{{'<｜Assistant｜>'}}{% if add_generation_prompt %}{{'<think>\\n'}}{% endif %}", "think"),
        ("{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1] %}", "think"),
        ("{{- '<|start|>assistant<|channel|>analysis<|message|>' + message.thinking + '<|end|>' }}", "gpt_oss"),
        ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}", None),
        (None, None),
    ],
)  # fmt: skip
def test_detect_reasoning_parser(template: str | None, expected: str | None) -> None:
    assert detect_reasoning_parser(template) == expected


PLUGIN_MODULE = "tgi_fake_reasoning_mod"
PLUGIN_SOURCE = """\
from router.reasoning import ThinkReasoningParser


class Bracketed(ThinkReasoningParser):
    name = "bracketed"
"""


@pytest.fixture
def fake_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    yield from installed(
        tmp_path, monkeypatch, "tgi-fake-reasoning", "0.2",
        f"[text_generation.reasoning_parsers]\nbracketed = {PLUGIN_MODULE}:Bracketed\nbroken = nowhere_mod:X\n",
        PLUGIN_MODULE, PLUGIN_SOURCE,
    )  # fmt: skip


def test_plugin(fake_plugin: Path) -> None:
    assert reasoning_parser_names()[4:] == ["bracketed", "broken"]
    assert get_reasoning_parser("bracketed").parse("<think>x</think>y") == ReasoningOutput("x", "y")
    with pytest.raises(PluginError, match=r"'broken' \(from tgi-fake-reasoning 0.2\).*ModuleNotFoundError"):
        get_reasoning_parser("broken")
