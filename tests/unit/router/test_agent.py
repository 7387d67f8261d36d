"""router/agent.py: rendering with tools (a tool-aware template, the generic fallback), the grammar that
forces calls (any path through it is a valid call), and the answer read back as reasoning, content and
tool calls, whole and streamed at every split."""

from __future__ import annotations

import json
import random
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


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def ll_tokenizer(tiny_model_dir: Path, tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(
        (tiny_model_dir / "tokenizer.json").read_text(), eos_token=[tokenizer.eos_token_id]
    )


def agent(tokenizer: Tokenizer, template: str | None = None, **flags: str) -> Agent:
    return Agent(ChatPrompter(tokenizer, template, None), tokenizer, **flags)


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
    chatml = agent(tokenizer)
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
