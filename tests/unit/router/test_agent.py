"""router/agent.py: rendering with tools (a tool-aware template, the generic fallback), the grammar that
forces calls (any path through it is a valid call), and the answer read back as reasoning, content and
tool calls, whole and streamed at every split."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import jsonschema
import llguidance
import pytest

from common import grammar
from router.agent import (
    Agent,
    ChatMessage,
    FunctionTool,
    OutputPlan,
    ReasoningDelta,
    ToolChoice,
    Turn,
    check_tools,
)
from router.call_grammar import MAX_CALLS
from router.chat import ChatPrompter, ChatWrapping
from router.errors import ValidationError
from router.reasoning import get_reasoning_parser
from router.tokenizer import Tokenizer
from router.toolcalls import ContentDelta, ToolCall, ToolCallDelta, get_tool_parser

pytestmark = pytest.mark.timeout(120)

# Qwen2.5's way with tools, trimmed: tools in the system turn, calls as <tool_call> blocks, results in
# <tool_response> blocks of a user turn.
QWEN_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{{ messages[0].content if messages[0].role == 'system' else 'Hi.' }}"
    "\n\n# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n"
    'For each call, return <tool_call>{"name": <name>, "arguments": <args>}</tool_call><|im_end|>\n'
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- elif message.role == 'assistant' %}<|im_start|>assistant\n{{ message.content }}"
    '{%- for call in message.tool_calls %}\n<tool_call>\n{"name": "{{ call.function.name }}", '
    '"arguments": {{ call.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n'
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
WEATHER = FunctionTool(
    "get_weather",
    "The weather in a city",
    {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 6},
            "unit": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["city", "unit"],
        "additionalProperties": False,  # a random walk through extra properties could be endless
    },
)
TIME = FunctionTool(
    "get_time",
    None,
    {
        "type": "object",
        "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
        "additionalProperties": False,
    },
)
CALL = ToolCall("call_1", "get_weather", '{"city":"Paris","unit":"celsius"}')
CONVERSATION = [
    ChatMessage("system", "You are terse."),
    ChatMessage("user", "Weather in Paris?"),
    ChatMessage("assistant", "", tool_calls=(CALL,)),
    ChatMessage("tool", "18 C", tool_call_id="call_1"),
    ChatMessage("tool", "sunny", tool_call_id="call_1"),
]


def agent(tokenizer: Tokenizer, template: str | None = None, lazy_calls: bool = False, **flags: str) -> Agent:
    return Agent(ChatPrompter(tokenizer, template, None), tokenizer, lazy_calls=lazy_calls, **flags)


def test_a_tool_aware_template_renders_tools_calls_and_results(tokenizer: Tokenizer) -> None:
    qwen = agent(tokenizer, QWEN_TEMPLATE)
    assert qwen.template_tools and qwen.tool_parser_name == "hermes"
    text, add_special = qwen.render(CONVERSATION, Turn(tools=(WEATHER, TIME)))
    assert add_special is False
    assert json.dumps(WEATHER.to_template()) in text and '"name": "get_time"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert "<tool_response>\n18 C\n</tool_response>" in text and "<tool_response>\nsunny\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    # tool_choice none: the template still gets the tools (the model must not call)
    none, _ = qwen.render(CONVERSATION, Turn(tools=(WEATHER,), choice=ToolChoice("none")))
    assert "# Tools" in none


def test_the_generic_rendering_for_a_template_without_tools(tokenizer: Tokenizer) -> None:
    chatml = agent(tokenizer)  # the tiny model's ChatML template never mentions tools
    assert not chatml.template_tools and chatml.tool_parser_name == "hermes"
    text, _ = chatml.render(CONVERSATION, Turn(tools=(WEATHER,)))
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nYou are terse.\n\nYou can call the following functions.")
    assert '<tool_call>{"name": "<function name>"' in system and '"name": "get_weather"' in system
    assert (
        '<|im_start|>assistant\n<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", '
        '"unit": "celsius"}}</tool_call><|im_end|>' in text
    )
    assert "<|im_start|>user\n<tool_response>\n18 C\n</tool_response>\n<tool_response>\nsunny\n" in text
    # No system message: one is added. tool_choice none: no tools offered.
    text, _ = chatml.render(CONVERSATION[1:2], Turn(tools=(WEATHER,)))
    assert text.startswith("<|im_start|>system\nYou can call")
    text, _ = chatml.render(CONVERSATION[1:2], Turn(tools=(WEATHER,), choice=ToolChoice("none")))
    assert "get_weather" not in text
    # TGICHAT_* wrapping has no template: the generic rendering too
    wrapped = Agent(ChatPrompter(tokenizer, None, ChatWrapping(user_pre="[U]", sys_pre="[S]")), tokenizer)
    text, _ = wrapped.render(CONVERSATION[1:2], Turn(tools=(WEATHER,)))
    assert text.startswith("[S]You can call") and "[U]Weather in Paris?" in text


def test_tools_are_checked() -> None:
    check_tools((WEATHER, TIME))
    for tools, match in [
        ((FunctionTool("bad name"),), "letters"),
        ((WEATHER, WEATHER), "twice"),
        ((FunctionTool("f", None, {"type": "array"}),), "object"),
        ((FunctionTool("f", None, {"type": "object", "properties": {"x": {"type": "nope"}}}),), "schema"),
    ]:
        with pytest.raises(ValidationError, match=match) as error:
            check_tools(tools)
        assert error.value.param == "tools"


def walk(ll_tokenizer: llguidance.LLTokenizer, argument: str, seed: int, prefix: str = "") -> str:
    """A random path through the grammar (each next token drawn among those it allows, as a random model
    under constrained decoding draws them) until only end of sequence is allowed; the text it makes."""
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar.to_llguidance(argument), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    rng = random.Random(seed)
    ids: list[int] = ll_tokenizer.tokenize_str(prefix) if prefix else []
    assert matcher.consume_tokens(ids)
    for _ in range(400):
        if matcher.is_accepting():
            break
        mask = matcher.compute_logit_bias()
        allowed = [i for i in range(ll_tokenizer.vocab_size) if mask[i]]
        token = rng.choice(allowed)
        assert matcher.consume_token(token), matcher.get_error()
        ids.append(token)
    assert matcher.is_accepting()
    return ll_tokenizer.decode_str(ids)


def assert_valid_calls(plan: OutputPlan, text: str, tools: tuple[FunctionTool, ...], most: int) -> None:
    answer = plan.parse(text)
    assert answer.content == "" and 1 <= len(answer.calls) <= most, text
    by_name = {t.name: t for t in tools}
    for call in answer.calls:
        jsonschema.validate(json.loads(call.arguments), by_name[call.name].parameters)


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "mistral", "pythonic"])
def test_forced_calls_are_valid_on_every_path(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer, parser: str
) -> None:
    forced = agent(tokenizer, tool_call_parser=parser)
    tools = (WEATHER, TIME)
    for turn, names, most in [
        (Turn(tools, ToolChoice("required")), {"get_weather", "get_time"}, 99),
        (Turn(tools, ToolChoice("function", "get_time")), {"get_time"}, 1),
        (Turn(tools, ToolChoice("required"), parallel_tool_calls=False), {"get_weather", "get_time"}, 1),
    ]:
        plan = forced.plan(turn, "prompt")
        assert plan.grammar is not None and grammar.check(plan.grammar) == ""
        for seed in range(4):
            text = walk(ll_tokenizer, plan.grammar, seed)
            assert_valid_calls(plan, text, tools, most)
            assert {c.name for c in plan.parse(text).calls} <= names


def test_auto_is_free_and_response_format_constrains_the_content(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer
) -> None:
    chatml = agent(tokenizer)  # shards without the grammar processor: no lazy grammar
    plan = chatml.plan(Turn((WEATHER,)), "prompt")
    assert plan.grammar is None and plan.tool_parser is not None and plan.parses
    plain = chatml.plan(Turn(), "prompt")
    assert plain == OutputPlan() and not plain.parses  # nothing to read: the text is the content
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}  # fmt: skip
    constraint = grammar.canonical("json", schema)
    assert chatml.plan(Turn(constraint=constraint), "prompt").grammar == constraint
    # auto with a response_format: a call, or content that follows the schema
    plan = chatml.plan(Turn((WEATHER,), constraint=constraint), "prompt")
    assert plan.grammar is not None
    for seed in range(6):
        answer = plan.parse(walk(ll_tokenizer, plan.grammar, seed))
        if answer.calls:
            assert answer.content == "" and answer.calls[0].name == "get_weather"
        else:
            jsonschema.validate(json.loads(answer.content), schema)
    # tool_choice none: no parsing for calls, no grammar
    plan = chatml.plan(Turn((WEATHER,), ToolChoice("none")), "prompt")
    assert plan.grammar is None and plan.tool_parser is None


def matcher_after(ll_tokenizer: llguidance.LLTokenizer, argument: str, text: str) -> llguidance.LLMatcher:
    """A matcher of ``argument`` that has consumed ``text`` (asserted allowed)."""
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar.to_llguidance(argument), log_level=0)
    assert matcher.consume_tokens(ll_tokenizer.tokenize_str(text)), matcher.get_error()
    return matcher


def allows(ll_tokenizer: llguidance.LLTokenizer, argument: str, text: str) -> bool:
    """Whether the grammar allows ``text`` as the start of an answer."""
    matcher = llguidance.LLMatcher(ll_tokenizer, grammar.to_llguidance(argument), log_level=0)
    return bool(matcher.consume_tokens(ll_tokenizer.tokenize_str(text)))


def only_eos_after(ll_tokenizer: llguidance.LLTokenizer, argument: str, text: str, eos: int) -> bool:
    matcher = matcher_after(ll_tokenizer, argument, text)
    mask = matcher.compute_logit_bias()
    return matcher.is_accepting() and [i for i in range(ll_tokenizer.vocab_size) if mask[i]] == [eos]


CALLED = (
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>'
)


def test_auto_is_lazy_a_call_once_opened_follows_the_schema(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer
) -> None:
    lazy = agent(tokenizer, lazy_calls=True)
    plan = lazy.plan(Turn((WEATHER, TIME)), "prompt")
    assert plan.grammar is not None and plan.grammar_field == "tools" and plan.tool_parser is not None
    argument = plan.grammar
    # free until the opener: any text, and the answer may end anywhere in it
    for text in ["", "It is sunny in Oslo.", 'A <tool in text, {"name": 1}\n\n']:
        assert matcher_after(ll_tokenizer, argument, text).is_accepting(), text
    # once opened, the call is forced: a known name, arguments that follow its schema, the closing tag
    for bad in [
        'x <tool_call>\n{"name": "get_wind", ',
        'x <tool_call>\n{"name": "get_weather", "arguments": {"city": 3',
        'x <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "kelvin"',
        'x <tool_call>\n{"name": "get_time", "arguments": {"hour": 24',
        "x <tool_call>hello",
    ]:
        assert not allows(ll_tokenizer, argument, bad), bad
    assert not matcher_after(ll_tokenizer, argument, "Let me check. <tool_call>").is_accepting()
    for seed in range(4):  # any path after the opener is a valid call; text may follow it
        text = walk(ll_tokenizer, argument, seed, prefix="Let me check. <tool_call>")
        answer = plan.parse(text)
        assert answer.content == "Let me check." and len(answer.calls) == 1, text
        assert_valid_calls(plan, text[text.index("<tool") :], (WEATHER, TIME), 1)
    after = f"Sure.\n{CALLED}\nAnd the time:\n{CALLED.replace('Oslo', 'Rome')}\nDone."
    answer = plan.parse(after)
    assert matcher_after(ll_tokenizer, argument, after).is_accepting()
    assert [json.loads(c.arguments)["city"] for c in answer.calls] == ["Oslo", "Rome"]
    # the generic rendering's example writes no newlines around the object: allowed too
    assert matcher_after(ll_tokenizer, argument, CALLED.replace("\n", "")).is_accepting()


def test_auto_allows_as_many_calls_as_are_kept(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer
) -> None:
    lazy = agent(tokenizer, lazy_calls=True)
    single = lazy.plan(Turn((WEATHER,), parallel_tool_calls=False), "prompt")
    assert single.grammar is not None and single.max_calls == 1
    # after the one call kept, the opener cannot be written again (other text can)
    assert matcher_after(ll_tokenizer, single.grammar, f"{CALLED}\nThat is all, <tool").is_accepting()
    assert not allows(ll_tokenizer, single.grammar, f"{CALLED}\n<tool_call>")
    bounded = lazy.plan(Turn((WEATHER,), max_calls=2), "prompt")
    assert bounded.max_calls == 2
    assert allows(ll_tokenizer, bounded.grammar or "", f"{CALLED}{CALLED}")
    assert not allows(ll_tokenizer, bounded.grammar or "", f"{CALLED}{CALLED}<tool_call>")
    unbounded = lazy.plan(Turn((WEATHER,)), "prompt")
    assert unbounded.max_calls is None
    assert allows(ll_tokenizer, unbounded.grammar or "", CALLED * MAX_CALLS)
    assert not allows(ll_tokenizer, unbounded.grammar or "", CALLED * MAX_CALLS + "<tool_call>")


@pytest.mark.parametrize("parser", ["llama3_json", "mistral"])
def test_auto_list_formats_take_one_opener(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer, parser: str
) -> None:
    """Llama 3's and Mistral's calls follow one opener as a list, of the calls kept at most, which ends the
    answer."""
    lazy = agent(tokenizer, lazy_calls=True, tool_call_parser=parser)
    obj = '{"name": "get_time", "%s": {}}' % ("parameters" if parser == "llama3_json" else "arguments")
    opener, sep, head, close = {
        "llama3_json": ("<|python_tag|>", "; ", "", ""),
        "mistral": ("[TOOL_CALLS]", ", ", "[", "]"),
    }[parser]
    plan = lazy.plan(Turn((WEATHER, TIME), max_calls=2), "prompt")
    argument = plan.grammar or ""
    two = f"Sure. {opener}{head}{obj}{sep}{obj}{close}"
    assert only_eos_after(ll_tokenizer, argument, two, tokenizer.eos_token_id)
    assert not allows(ll_tokenizer, argument, f"Sure. {opener}{head}{obj}{sep}{obj}{sep}")
    assert matcher_after(ll_tokenizer, argument, "No call: [1, 2]; {} and a python tag").is_accepting()
    assert not allows(ll_tokenizer, argument, f'Sure. {opener}{head}{{"name": "get_wind"')
    assert len(plan.parse(two).calls) == 2


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "mistral"])
def test_forced_parallel_calls_end_after_the_limit(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer, parser: str
) -> None:
    """tool_choice required with parallel calls: a model that keeps calling gets end of sequence only
    after ``MAX_CALLS`` calls (or the request's own bound)."""
    forced = agent(tokenizer, tool_call_parser=parser)
    obj = '{"name": "get_time", "%s": {}}' % ("parameters" if parser == "llama3_json" else "arguments")
    head, call, sep, close = {
        "hermes": ("", f"<tool_call>\n{obj}\n</tool_call>", "\n", ""),
        "llama3_json": ("", obj, "; ", ""),
        "mistral": ("[TOOL_CALLS][", obj, ", ", "]"),
    }[parser]
    eos = tokenizer.eos_token_id
    for turn, limit in [
        (Turn((WEATHER, TIME), ToolChoice("required")), MAX_CALLS),
        (Turn((WEATHER, TIME), ToolChoice("required"), max_calls=3), 3),
    ]:
        plan = forced.plan(turn, "prompt")
        argument = plan.grammar or ""
        assert allows(ll_tokenizer, argument, head + sep.join([call] * (limit - 1)) + sep)
        assert not allows(ll_tokenizer, argument, head + sep.join([call] * limit) + sep)
        whole = head + sep.join([call] * limit) + close
        assert only_eos_after(ll_tokenizer, argument, whole, eos), parser
        assert len(plan.parse(whole).calls) == limit


def test_auto_stays_free_where_a_grammar_cannot_follow(tokenizer: Tokenizer) -> None:
    turn = Turn((WEATHER,))
    # the pythonic format cannot write a name that is not an identifier
    dashed = Turn((FunctionTool("get-weather", None, WEATHER.parameters),))
    assert agent(tokenizer, lazy_calls=True, tool_call_parser="pythonic").plan(dashed, "p").grammar is None
    harmony = agent(tokenizer, THINK_TEMPLATE, lazy_calls=True, reasoning_parser="gpt_oss")
    assert harmony.plan(turn, "p").grammar is None
    # with a response_format, auto allows calls or that content (the forced calls' rules), lazy or not
    constraint = grammar.canonical("json_object")
    assert agent(tokenizer, lazy_calls=True).plan(Turn((WEATHER,), constraint=constraint), "p").grammar == (
        agent(tokenizer).plan(Turn((WEATHER,), constraint=constraint), "p").grammar
    )


def test_strict_tools_need_a_grammar_on_the_call(tokenizer: Tokenizer) -> None:
    strict = replace(WEATHER, strict=True)
    for lazy_calls, choice in [(True, ToolChoice("auto")), (False, ToolChoice("required"))]:
        plan = agent(tokenizer, lazy_calls=lazy_calls).plan(Turn((TIME, strict), choice), "p")
        assert plan.grammar is not None  # the call is constrained: strict is honoured
    harmony = agent(tokenizer, THINK_TEMPLATE, lazy_calls=True, reasoning_parser="gpt_oss")
    for free in [agent(tokenizer), harmony]:
        with pytest.raises(ValidationError, match=r"`tools\[1\].strict`") as error:
            free.plan(Turn((TIME, strict)), "p")
        assert error.value.param == "tools"
        assert free.plan(Turn((TIME, strict), ToolChoice("none")), "p").grammar is None  # no calls: no matter


def test_lazy_calls_after_the_reasoning(tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer) -> None:
    thinker = agent(tokenizer, THINK_TEMPLATE, lazy_calls=True)
    prompt, _ = thinker.render([ChatMessage("user", "Weather?")], Turn())
    plan = thinker.plan(Turn((WEATHER,)), prompt)
    argument = plan.grammar or ""
    # the reasoning may write the opener freely (it is not a call); the answer's call is forced
    assert matcher_after(
        ll_tokenizer, argument, "I could use <tool_call> here.</think>\n\nIt is sunny."
    ).is_accepting()
    assert not allows(ll_tokenizer, argument, 'ok</think>\n\n<tool_call>\n{"name": "get_time"')
    text = walk(ll_tokenizer, argument, 0, prefix="Call it.</think>\n\n<tool_call>")
    answer = plan.parse(text)
    assert answer.reasoning == "Call it." and [c.name for c in answer.calls] == ["get_weather"]


def with_special_token(
    tmp_path: Path, tiny_model_dir: Path, marker: str
) -> tuple[Tokenizer, llguidance.LLTokenizer, int]:
    """The tiny model's tokenizer with ``marker`` added as a special token (saved in ``tmp_path``), its
    llguidance tokenizer, and the marker's id."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    hf.add_special_tokens({"additional_special_tokens": [marker]})
    hf.save_pretrained(tmp_path)
    tok = Tokenizer(tmp_path)
    ll = llguidance.LLTokenizer((tmp_path / "tokenizer.json").read_text(), eos_token=[tok.eos_token_id])
    return tok, ll, tok.hf.convert_tokens_to_ids(marker)


def spelled_is_text(ll: llguidance.LLTokenizer, argument: str, marker: int, pieces: tuple[str, str]) -> bool:
    """Whether the grammar takes the marker spelled out (in two pieces, so that the text is not tokenized
    into the special token) as free text; then that a fresh matcher takes the token itself after "Sure."."""
    matcher = llguidance.LLMatcher(ll, grammar.to_llguidance(argument), log_level=0)
    spelled = ll.tokenize_str(pieces[0]) + ll.tokenize_str(pieces[1])
    if marker in spelled or not matcher.consume_tokens(spelled) or not matcher.is_accepting():
        return False
    matcher = llguidance.LLMatcher(ll, grammar.to_llguidance(argument), log_level=0)
    return bool(matcher.consume_tokens([*ll.tokenize_str("Sure."), marker]))


def test_lazy_opener_that_is_a_special_token(tmp_path: Path, tiny_model_dir: Path) -> None:
    tok, ll, marker = with_special_token(tmp_path, tiny_model_dir, "[TOOL_CALLS]")
    plan = agent(tok, tool_call_parser="mistral", lazy_calls=True).plan(Turn((WEATHER, TIME)), "prompt")
    argument = plan.grammar or ""
    assert f"<[{marker}]>" in grammar.parse(argument)[1]
    # the token opens the call; the text "[TOOL_CALLS]" spelled out is only text
    assert spelled_is_text(ll, argument, marker, ("We have [TOOL_", "CALLS] as text."))
    matcher = llguidance.LLMatcher(ll, grammar.to_llguidance(argument), log_level=0)
    assert matcher.consume_tokens([*ll.tokenize_str("Sure."), marker])
    assert not matcher.consume_tokens(ll.tokenize_str('[{"name": "get_weather", "arguments": {"city": 5'))
    matcher = llguidance.LLMatcher(ll, grammar.to_llguidance(argument), log_level=0)
    text = '[{"name": "get_time", "arguments": {"hour": 7}}]'
    assert matcher.consume_tokens([*ll.tokenize_str("Sure."), marker, *ll.tokenize_str(text)])
    assert matcher.is_accepting()
    assert [c.name for c in plan.parse("Sure.[TOOL_CALLS]" + text).calls] == ["get_time"]


def test_constraints_apply_after_the_reasoning(
    tokenizer: Tokenizer, ll_tokenizer: llguidance.LLTokenizer
) -> None:
    thinker = agent(tokenizer, THINK_TEMPLATE)
    assert thinker.reasoning_parser_name == "think"
    prompt, _ = thinker.render([ChatMessage("user", "Weather?")], Turn())
    turn = Turn((WEATHER,), ToolChoice("required"))
    plan = thinker.plan(turn, prompt)
    assert plan.in_reasoning and plan.grammar is not None
    text = walk(ll_tokenizer, plan.grammar, 0, prefix="Paris, I guess.\n</think>\n\n")
    answer = plan.parse(text)
    assert answer.reasoning == "Paris, I guess."
    assert_valid_calls(plan, text, (WEATHER,), 99)
    # the prompt did not open it: the reasoning is optional, and constrained content follows it
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 99}}, "required": ["n"],
              "additionalProperties": False}  # fmt: skip
    plan = thinker.plan(Turn(constraint=grammar.canonical("json", schema)), "no open tag")
    assert not plan.in_reasoning and plan.grammar is not None
    answer = plan.parse(walk(ll_tokenizer, plan.grammar, 1, prefix="<think>hmm</think>"))
    assert answer.reasoning == "hmm"
    jsonschema.validate(json.loads(answer.content), schema)
    answer = plan.parse(walk(ll_tokenizer, plan.grammar, 2, prefix="{"))
    assert answer.reasoning == ""
    jsonschema.validate(json.loads(answer.content), schema)
    # a reasoning format the grammar cannot follow: refused, naming the field
    harmony = agent(tokenizer, THINK_TEMPLATE, reasoning_parser="gpt_oss")
    with pytest.raises(ValidationError) as error:
        harmony.plan(turn, prompt)
    assert error.value.param == "tool_choice"
    assert agent(tokenizer, THINK_TEMPLATE, reasoning_parser="none").reasoning_parser is None


def test_the_stream_equals_the_whole_answer_at_every_split(tokenizer: Tokenizer) -> None:
    text = (
        '<think>Let me see.</think>\n\nSure.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
        '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    plan = OutputPlan(tool_parser=get_tool_parser("hermes"), reasoning_parser=get_reasoning_parser("think"))
    whole = plan.parse(text)
    assert whole.reasoning == "Let me see." and whole.content == "Sure."
    assert [(c.name, c.arguments) for c in whole.calls] == [
        ("get_weather", '{"city":"Oslo"}'),
        ("get_time", "{}"),
    ]
    for split in range(len(text) + 1):
        stream = plan.stream()
        deltas = stream.feed(text[:split]) + stream.feed(text[split:]) + stream.finish()
        assert "".join(d.text for d in deltas if isinstance(d, ReasoningDelta)) == whole.reasoning
        assert "".join(d.text for d in deltas if isinstance(d, ContentDelta)) == whole.content
        calls = [d for d in deltas if isinstance(d, ToolCallDelta)]
        # OpenAI's delta.tool_calls: index, id and name first, then argument fragments
        assert [(d.index, d.name) for d in calls if d.id is not None] == [(0, "get_weather"), (1, "get_time")]
        assert calls[0].to_openai() == {
            "index": 0, "id": calls[0].id, "type": "function", "function": {"name": "get_weather", "arguments": ""},
        }  # fmt: skip
        assert calls[1].to_openai() == {"index": 0, "function": {"arguments": '{"city":"Oslo"}'}}
        assert stream.calls == 2
    # parallel_tool_calls false: the first call only
    single = OutputPlan(tool_parser=get_tool_parser("hermes"), reasoning_parser=get_reasoning_parser("think"),
                        max_calls=1)  # fmt: skip
    assert [c.name for c in single.parse(text).calls] == ["get_weather"]


def test_markers_that_are_special_tokens_are_kept(tmp_path: Path, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    hf.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]", "<think>", "</think>"]})
    hf.save_pretrained(tmp_path)
    tok = Tokenizer(tmp_path)
    mistral = agent(tok, THINK_TEMPLATE, tool_call_parser="mistral")
    ids = {tok.hf.convert_tokens_to_ids(t) for t in ("[TOOL_CALLS]", "<think>", "</think>")}
    plan = mistral.plan(Turn((WEATHER,), ToolChoice("required")), "prompt")
    assert plan.keep_special_ids == ids
    assert f"<[{tok.hf.convert_tokens_to_ids('[TOOL_CALLS]')}]>" in grammar.parse(plan.grammar or "")[1]
    assert mistral.plan(Turn(), "prompt").keep_special_ids == ids - {
        tok.hf.convert_tokens_to_ids("[TOOL_CALLS]")
    }
