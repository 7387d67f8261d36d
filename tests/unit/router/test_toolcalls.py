"""Tool-call parsers (router/toolcalls): each format on outputs as its models write them, streamed at every
split point and character by character against whole-text parsing, malformed calls as content, the
registry, detection from chat templates, and third-party parsers through entry points."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.plugins import PluginError
from router.toolcalls import (
    BUILTIN_TOOL_PARSERS,
    ContentDelta,
    Delta,
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    ParsedOutput,
    PythonicParser,
    ToolCallDelta,
    ToolCallParser,
    detect_tool_parser,
    get_tool_parser,
    tool_parser_names,
)
from router.toolcalls.base import BufferedParser, BufferedStream
from tests.fake_plugins import installed

pytestmark = pytest.mark.timeout(120)

Summary = tuple[str, list[tuple[str, Any]]]


def summary(out: ParsedOutput) -> Summary:
    """Content and (name, arguments as a value) of each call: what must not depend on the split."""
    return out.content, [(c.name, json.loads(c.arguments)) for c in out.calls]


def check_deltas(deltas: list[Delta]) -> None:
    """OpenAI's streaming shape: calls indexed 0, 1, ... in order; the first piece of each has the id and
    the name and empty arguments, the later ones arguments only; no empty content piece."""
    seen: list[int] = []
    for delta in deltas:
        if isinstance(delta, ContentDelta):
            assert delta.text
            continue
        if delta.id is not None:
            assert delta.index == len(seen) and delta.name and delta.arguments == ""
            seen.append(delta.index)
        else:
            assert seen and delta.index == seen[-1] and delta.name is None


def run(parser: ToolCallParser, pieces: list[str]) -> list[Delta]:
    stream = parser.stream()
    deltas: list[Delta] = []
    for piece in pieces:
        deltas += stream.feed(piece)
    deltas += stream.finish()
    return deltas


def splits(text: str) -> Iterator[list[str]]:
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    yield list(text)
    rng = random.Random(len(text))
    for _ in range(10):
        cuts = (
            sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
            if len(text) > 1
            else []
        )
        bounds = [0, *cuts, len(text)]
        yield [text[a:b] for a, b in itertools.pairwise(bounds)]


def parse_everywhere(parser: ToolCallParser, text: str) -> Summary:
    """Parses ``text`` whole, then streamed split at every index, one character at a time and in random
    pieces; every way must give the whole-text result. Returns it."""
    whole = parser.parse(text)
    expected = summary(whole)
    for pieces in splits(text):
        deltas = run(parser, pieces)
        check_deltas(deltas)
        assert summary(ParsedOutput.from_deltas(deltas)) == expected, pieces
    return expected


def call(name: str, **arguments: Any) -> tuple[str, Any]:
    return (name, arguments)


# ---- Hermes / Qwen ----------------------------------------------------------------------------------

QWEN25_PARALLEL = (
    "<tool_call>\n"
    '{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA"}}\n'
    "</tool_call>\n"
    "<tool_call>\n"
    '{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, USA", "date": "2024-10-01"}}\n'
    "</tool_call>"
)


def test_hermes_qwen25_parallel_calls() -> None:
    assert parse_everywhere(HermesParser(), QWEN25_PARALLEL) == (
        "",
        [
            call("get_current_temperature", location="San Francisco, CA, USA"),
            call("get_temperature_date", location="San Francisco, CA, USA", date="2024-10-01"),
        ],
    )


def test_hermes_arguments_are_compact_json_and_ids_are_openai_style() -> None:
    out = HermesParser().parse(QWEN25_PARALLEL)
    assert out.calls[1].arguments == '{"location":"San Francisco, CA, USA","date":"2024-10-01"}'
    assert all(re.fullmatch(r"call_[A-Za-z0-9]{24}", c.id) for c in out.calls)
    assert out.calls[0].id != out.calls[1].id
    assert out.tool_calls_openai()[0] == {
        "id": out.calls[0].id,
        "type": "function",
        "function": {"name": "get_current_temperature", "arguments": '{"location":"San Francisco, CA, USA"}'},
    }


def test_hermes_content_before_and_after() -> None:
    text = (
        "I'll look up the weather in both cities for you.\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Berlin", "unit": "celsius"}}\n</tool_call>\n'
        "Let me know if you need anything else."
    )
    assert parse_everywhere(HermesParser(), text) == (
        "I'll look up the weather in both cities for you.\n\nLet me know if you need anything else.",
        [
            call("get_weather", city="Paris", unit="celsius"),
            call("get_weather", city="Berlin", unit="celsius"),
        ],
    )


def test_hermes_qwen3_after_reasoning_unicode_arguments() -> None:
    # Qwen3's content once router/reasoning.py took the <think> block away; Chinese, emoji, an escaped é,
    # and a string holding braces, quotes and a fake closing tag prefix.
    text = (
        "\n\n<tool_call>\n"
        '{"name": "search", "arguments": {"query": "北京 天气 🌧️", "lang": "caf\\u00e9", '
        '"note": "a {brace} and a \\"quote\\" and </tool_ca", "limit": 5, "exact": false, "tags": []}}\n'
        "</tool_call>"
    )
    content, calls = parse_everywhere(HermesParser(), text)
    assert content == ""
    assert calls == [
        call(
            "search",
            query="北京 天气 🌧️",
            lang="café",
            note='a {brace} and a "quote" and </tool_ca',
            limit=5,
            exact=False,
            tags=[],
        )
    ]
    assert HermesParser().parse(text).calls[0].arguments.startswith('{"query":"北京 天气 🌧️","lang":"café"')


def test_hermes_2_pro_variants() -> None:
    # Hermes 2 Pro: arguments before the name, sometimes a Python dict; arguments as a JSON string;
    # no arguments at all.
    text = (
        "<tool_call>\n{'arguments': {'symbol': 'TSLA', 'details': True, 'since': None}, 'name': 'get_stock_fundamentals'}\n</tool_call>\n"
        '<tool_call>\n{"name": "get_quote", "arguments": "{\\"symbol\\": \\"AAPL\\"}"}\n</tool_call>\n'
        '<tool_call>\n{"name": "market_open"}\n</tool_call>'
    )
    assert parse_everywhere(HermesParser(), text) == (
        "",
        [
            call("get_stock_fundamentals", symbol="TSLA", details=True, since=None),
            call("get_quote", symbol="AAPL"),
            call("market_open"),
        ],
    )


@pytest.mark.parametrize(
    "text",
    [
        "The capital of France is Paris.",
        "  Leading and trailing whitespace stays.\n\n",
        "Use the <b>bold</b> tag, or <tool> or <tool_calls>, a < b.",
        "",
        "\n",
        "An unfinished tag at the end <tool_ca",
    ],
)
def test_hermes_text_without_calls_is_unchanged(text: str) -> None:
    assert parse_everywhere(HermesParser(), text) == (text, [])


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',  # a brace short
        '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "get_weather", "arguments": ["Paris"]}\n</tool_call>',  # not an object
        '<tool_call>\n{"name": "f", "arguments": {"x": NaN}}\n</tool_call>',
        "<tool_call>\nget_weather(city='Paris')\n</tool_call>",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # cut off (max_tokens)
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n',  # never closed
        "<tool_call>" + "[" * 5000 + "]" * 5000 + "</tool_call>",
    ],
)
def test_hermes_malformed_calls_are_content(text: str) -> None:
    assert parse_everywhere(HermesParser(), "Checking. " + text) == ("Checking. " + text, [])


def test_hermes_good_call_beside_a_malformed_one() -> None:
    good = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>'
    bad = '<tool_call>\n{"name": "b", "arguments": {oops}}\n</tool_call>'
    assert parse_everywhere(HermesParser(), f"{good}\n{bad}\n{good}") == (bad, [call("a"), call("a")])


def test_hermes_streams_content_at_once_and_holds_a_possible_tag() -> None:
    stream = HermesParser().stream()
    assert stream.feed("Let me check") == [ContentDelta("Let me check")]
    assert stream.feed(". <tool_") == [ContentDelta(".")]  # " <tool_" could still become a tag
    assert stream.feed("") == []
    assert stream.feed('call>\n{"name": "f", "argu') == []
    deltas = stream.feed('ments": {"x": 1}}\n</tool_call>')
    assert [(d.index, d.name, d.arguments) for d in deltas if isinstance(d, ToolCallDelta)] == [
        (0, "f", ""),
        (0, None, '{"x":1}'),
    ]
    assert deltas[0].to_openai()["type"] == "function"
    assert deltas[1].to_openai() == {"index": 0, "function": {"arguments": '{"x":1}'}}
    assert stream.feed("\n") == []
    assert stream.finish() == []
    assert stream.finish() == []
    with pytest.raises(RuntimeError):
        stream.feed("more")


def test_hermes_false_tag_start_is_released() -> None:
    stream = HermesParser().stream()
    assert stream.feed("a <tool") == [ContentDelta("a")]
    assert stream.feed("box> b") == [ContentDelta(" <toolbox> b")]
    stream = HermesParser().stream()
    assert stream.feed("a <tool") == [ContentDelta("a")]
    assert stream.finish() == [ContentDelta(" <tool")]


def test_injected_id_factory() -> None:
    ids = iter(["id-1", "id-2"])
    out = HermesParser(id_factory=lambda: next(ids)).parse(QWEN25_PARALLEL)
    assert [c.id for c in out.calls] == ["id-1", "id-2"]


# ---- Llama 3.x JSON ----------------------------------------------------------------------------------


def test_llama31_bare_json_call() -> None:
    text = '{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA", "unit": "Fahrenheit"}}'
    assert parse_everywhere(Llama3JsonParser(), text) == (
        "",
        [call("get_current_conditions", location="San Francisco, CA", unit="Fahrenheit")],
    )


def test_llama33_python_tag_and_several_calls() -> None:
    text = (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "São Paulo", "days": 3}}; '
        '{"name": "get_time", "parameters": {"timezone": "America/Sao_Paulo"}};{"name": "ping", "parameters": {}}'
    )
    assert parse_everywhere(Llama3JsonParser(), text) == (
        "",
        [
            call("get_weather", city="São Paulo", days=3),
            call("get_time", timezone="America/Sao_Paulo"),
            call("ping"),
        ],
    )


def test_llama3_calls_on_separate_lines_and_content_around() -> None:
    text = (
        "Sure, let me check.\n<|python_tag|>"
        '{"name": "lookup", "parameters": {"q": "naïve \\"quoted\\" {x}"}}\n'
        '{"name": "lookup", "arguments": {"q": "日本"}}\n'
        "I have asked for both."
    )
    assert parse_everywhere(Llama3JsonParser(), text) == (
        "Sure, let me check.\nI have asked for both.",
        [call("lookup", q='naïve "quoted" {x}'), call("lookup", q="日本")],
    )


@pytest.mark.parametrize(
    "text",
    [
        '{"answer": 42, "reason": "a JSON answer of a model asked for JSON"}',
        '  {"name": "Ada Lovelace", "born": 1815}',  # a JSON answer with a "name"
        '{"name": "Ada Lovelace"}',
        "{curly} braces start this answer.",
        'Functions look like {"name": "f", "parameters": {}} when they are not at the start.',
        '<|python_tag|>brave_search.call(query="current weather in Menlo Park")',
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Pa',
        '{"name": "get_weather", "parameters": "city=Paris"}',
        "Plain text.\n",
    ],
)
def test_llama3_text_that_is_not_a_call_is_unchanged(text: str) -> None:
    assert parse_everywhere(Llama3JsonParser(), text) == (text, [])


def test_llama32_call_with_type_key() -> None:
    text = '{"type": "function", "name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert parse_everywhere(Llama3JsonParser(), text) == ("", [call("get_weather", city="Oslo")])


def test_llama3_second_call_malformed() -> None:
    text = '{"name": "a", "parameters": {"x": 1}}; {"name": "b", "parameters": {"x": }}'
    assert parse_everywhere(Llama3JsonParser(), text) == (
        '{"name": "b", "parameters": {"x": }}',
        [call("a", x=1)],
    )


# ---- Mistral -----------------------------------------------------------------------------------------


def test_mistral_v03_array() -> None:
    text = (
        '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, France", "format": "celsius"}}, '
        '{"name": "get_current_weather", "arguments": {"location": "Zürich, Switzerland", "format": "celsius"}, "id": "a1b2c3d4e"}]'
    )
    out = MistralParser().parse(text)
    assert all(re.fullmatch(r"[A-Za-z0-9]{9}", c.id) for c in out.calls)
    assert parse_everywhere(MistralParser(), text) == (
        "",
        [
            call("get_current_weather", location="Paris, France", format="celsius"),
            call("get_current_weather", location="Zürich, Switzerland", format="celsius"),
        ],
    )


def test_mistral_v11_calls_with_content_before() -> None:
    text = (
        "I'll read both files first."
        '[TOOL_CALLS]read_file[ARGS]{"path": "src/main.py", "range": [1, 200]}'
        '[TOOL_CALLS]read_file[CALL_ID]x7Kp2Qa9Z[ARGS]{"path": "docs/Ünïcode.md"}'
        "[TOOL_CALLS]list_dir[ARGS]{}"
    )
    assert parse_everywhere(MistralParser(), text) == (
        "I'll read both files first.",
        [
            call("read_file", path="src/main.py", range=[1, 200]),
            call("read_file", path="docs/Ünïcode.md"),
            call("list_dir"),
        ],
    )


@pytest.mark.parametrize(
    "text",
    [
        "[TOOL_CALLS] Sorry, I cannot call a tool for that.",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}',  # cut off
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, 17]',
        "[TOOL_CALLS] []",
        '[TOOL_CALLS]get_weather[ARGS]["Paris"]',
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Par',
        "[TOOL_CALLS]get_weather[ARG",
        "[TOOL_CALLS]get_weather",
        "[TOOL_CALLS]",
        "[TOOL_CALL",
        "Text with [brackets] and [TOOL] markers.",
    ],
)
def test_mistral_malformed_is_content(text: str) -> None:
    assert parse_everywhere(MistralParser(), text) == (text, [])


def test_mistral_bad_marker_then_good_call() -> None:
    text = '[TOOL_CALLS] oops [TOOL_CALLS]f[ARGS]{"a": "b"}'
    assert parse_everywhere(MistralParser(), text) == ("[TOOL_CALLS] oops", [call("f", a="b")])


# ---- pythonic ----------------------------------------------------------------------------------------


def test_pythonic_llama32_list() -> None:
    text = "[get_weather(city='San Francisco', metric='celsius'), get_time(timezone=\"America/Los_Angeles\")]"
    assert parse_everywhere(PythonicParser(), text) == (
        "",
        [
            call("get_weather", city="San Francisco", metric="celsius"),
            call("get_time", timezone="America/Los_Angeles"),
        ],
    )


def test_pythonic_literals() -> None:
    text = (
        '[create_event(title="Réunion (équipe) ]", when={"start": "09:00", "days": (1, 2)}, '
        "attendees=['ana', \"bo\"], priority=-2, ratio=+0.5, remote=True, room=None, public=false, note=null, "
        '''body="""multi
line "quoted" text""", ok=''), tools.ping()]'''
    )
    assert parse_everywhere(PythonicParser(), text) == (
        "",
        [
            call(
                "create_event",
                title="Réunion (équipe) ]",
                when={"start": "09:00", "days": [1, 2]},
                attendees=["ana", "bo"],
                priority=-2,
                ratio=0.5,
                remote=True,
                room=None,
                public=False,
                note=None,
                body='multi\nline "quoted" text',
                ok="",
            ),
            call("tools.ping"),
        ],
    )


def test_pythonic_llama4_tags_and_content() -> None:
    text = (
        'Let me check the weather. <|python_start|>get_weather(location="Paris, France")<|python_end|> '
        "and then <|python_start|>[get_time(tz='CET'), get_date()]<|python_end|>"
    )
    assert parse_everywhere(PythonicParser(), text) == (
        "Let me check the weather. and then",
        [call("get_weather", location="Paris, France"), call("get_time", tz="CET"), call("get_date")],
    )


@pytest.mark.parametrize(
    "text",
    [
        "[1] The first footnote, and [2] the second.",
        '[get_weather("Paris")]',  # positional
        "[get_weather(city=CITY)]",  # a name, not a literal
        "[get_weather(city='Pa' + 'ris')]",
        "[get_weather(**opts)]",
        "[__import__('os').system('true')]",
        "[get_weather(city='Paris')",  # cut off
        "[f(a=1)] after is fine but [g(b=2)] later is text",
        "[f(a={1: 2})]",
        "[f(a=1e999)]",
        "[f(a=b'bytes')]",
        "<|python_start|>[f(a=1)]",
        "<|python_start|>not python<|python_end|>",
        "Sure: [f(a=1)]",  # a list opens calls only at the start
    ],
)
def test_pythonic_non_calls_are_content(text: str) -> None:
    content, calls = parse_everywhere(PythonicParser(), text)
    if text.startswith("[f(a=1)] after"):
        assert (content, calls) == ("after is fine but [g(b=2)] later is text", [call("f", a=1)])
    else:
        assert (content, calls) == (text, [])


# ---- every format: generic properties ----------------------------------------------------------------

PARSERS = [HermesParser(), Llama3JsonParser(), MistralParser(), PythonicParser()]


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.name)
@pytest.mark.parametrize(
    "text",
    [
        "Hello! How can I help you today?",
        "  \n spaced \t\n",
        "Unicode: 日本語, emoji 🎉, combining é, RTL שלום.",
        "<tool_call> [TOOL_CALLS] <|python_tag|> <|python_start|> mid-text markers",
    ],
)
def test_no_exception_and_text_kept(parser: ToolCallParser, text: str) -> None:
    content, _ = parse_everywhere(parser, text)
    if "markers" not in text:
        assert content == text


@pytest.mark.parametrize("parser", PARSERS, ids=lambda p: p.name)
def test_random_garbage_never_raises_and_keeps_every_character(parser: ToolCallParser) -> None:
    rng = random.Random(7)
    alphabet = ['{', '}', '[', ']', '(', ')', '"', "'", "\\", ";", ",", ":", " ", "\n", "a", "=", "1", "é",
                "<tool_call>", "</tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", "<|python_start|>",
                "<|python_end|>", '"name"', '"arguments"', '"parameters"']  # fmt: skip
    for _ in range(150):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        whole = parser.parse(text)
        assert summary(ParsedOutput.from_deltas(run(parser, list(text)))) == summary(whole)
        if not whole.calls:
            assert whole.content == text


def test_the_stream_check_catches_a_parser_that_does_not_hold_back() -> None:
    """The equivalence check itself must fail on a stream that releases a tag's start too early."""

    class Eager(BufferedStream):
        def step(self, final: bool) -> bool:
            i = self.buf.find("<tool_call>")
            end = self.buf.find("</tool_call>")
            if i >= 0 and end > i:
                self.content(self.buf[:i])
                self.call("f", "{}")
                self.buf = self.buf[end + len("</tool_call>") :]
                return True
            if i < 0:  # wrong: "<tool_" is released as content
                self.content(self.buf)
                self.buf = ""
            return False

    class EagerParser(BufferedParser):
        name = "eager"

        def stream(self) -> BufferedStream:
            return Eager(self.id_factory)

    with pytest.raises(AssertionError):
        parse_everywhere(EagerParser(), "a <tool_call>{}</tool_call> b")


# ---- registry and detection --------------------------------------------------------------------------


def test_registry_names_and_lookup() -> None:
    assert tool_parser_names()[:4] == ["hermes", "llama3_json", "mistral", "pythonic"]
    for name in BUILTIN_TOOL_PARSERS:
        parser = get_tool_parser(name)
        assert parser.name == name and isinstance(parser, ToolCallParser)
    with pytest.raises(PluginError, match=r"no tool call parser named 'nope'.*hermes"):
        get_tool_parser("nope")


QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more "
    "functions to assist with the user query.\\n\\nYou are provided with function signatures within "
    '<tools></tools> XML tags:\\n<tools>" }}\n ... {{- "\\n</tools>\\n\\nFor each function call, return a '
    "json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}'
)
LLAMA31_TEMPLATE = (
    '{%- if builtin_tools is defined or tools is not none %}\n    {{- "Environment: ipython\\n" }}\n{%- endif %}'
    "... {{- '<|python_tag|>' + tool_call.name + '.call(' }} ... {%- elif message.role == \"tool\" or "
    'message.role == "ipython" %}\n    {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}'
)
MISTRAL_TEMPLATE = (
    "{%- elif message.tool_calls is defined and message.tool_calls is not none %}\n"
    '        {{- "[TOOL_CALLS] [" }}\n        {%- for tool_call in message.tool_calls %}'
)
LLAMA4_TEMPLATE = "{%- if message.tool_calls %}{{- '<|python_start|>' }} ... {{- '<|python_end|>' }}"
LLAMA32_PYTHONIC_TEMPLATE = (
    '{{- "If you decide to invoke any of the function(s), you MUST put it in the format of '
    '[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\\n" }}'
)


@pytest.mark.parametrize(
    ("template", "tokens", "expected"),
    [
        (QWEN25_TEMPLATE, (), "hermes"),
        (LLAMA31_TEMPLATE, (), "llama3_json"),
        (MISTRAL_TEMPLATE, (), "mistral"),
        (LLAMA4_TEMPLATE, (), "pythonic"),
        (LLAMA32_PYTHONIC_TEMPLATE + LLAMA31_TEMPLATE, (), "pythonic"),
        ("{{ messages }}", ("<s>", "[INST]", "[TOOL_CALLS]"), "mistral"),
        (None, ("<|begin_of_text|>", "<|python_tag|>"), "llama3_json"),
        (None, ("<|im_start|>", "<tool_call>", "</tool_call>"), "hermes"),
        ("{{ messages }}", ("<s>", "</s>"), None),
        (None, (), None),
    ],
)
def test_detect_tool_parser(template: str | None, tokens: tuple[str, ...], expected: str | None) -> None:
    assert detect_tool_parser(template, tokens) == expected


PLUGIN_MODULE = "tgi_fake_tool_parser_mod"
PLUGIN_SOURCE = """\
from router.toolcalls.base import BufferedParser, BufferedStream


class ShoutStream(BufferedStream):
    def step(self, final):
        if self.buf.startswith("CALL "):
            self.call(self.buf[5:].strip(), "{}")
        else:
            self.content(self.buf)
        self.buf = ""
        return False


class ShoutParser(BufferedParser):
    name = "shout"

    def stream(self):
        return ShoutStream(self.id_factory)


def not_a_parser():
    return 42
"""


@pytest.fixture
def fake_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    entry_points = (
        "[text_generation.tool_parsers]\n"
        f"shout = {PLUGIN_MODULE}:ShoutParser\n"
        f"broken = {PLUGIN_MODULE}:Missing\n"
        f"wrong = {PLUGIN_MODULE}:not_a_parser\n"
        f"hermes = {PLUGIN_MODULE}:ShoutParser\n"
    )
    yield from installed(
        tmp_path, monkeypatch, "tgi-fake-tool-parser", "0.1", entry_points, PLUGIN_MODULE, PLUGIN_SOURCE
    )


def test_plugin_parsers(fake_plugin: Path) -> None:
    assert tool_parser_names() == ["hermes", "llama3_json", "mistral", "pythonic", "broken", "shout", "wrong"]
    parser = get_tool_parser("shout")
    assert summary(parser.parse("CALL ring")) == ("", [("ring", {})])
    assert isinstance(get_tool_parser("hermes"), HermesParser)  # the built-in wins
    with pytest.raises(PluginError, match=r"'broken' .*tgi-fake-tool-parser 0.1.*AttributeError"):
        get_tool_parser("broken")
    with pytest.raises(PluginError, match=r"'wrong' .*not a ToolCallParser"):
        get_tool_parser("wrong")
