"""Chat prompts: TGICHAT_* wrapping, the model's template as transformers renders it, message checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.chat import ChatError, ChatPrompter, ChatWrapping, load_chat_template
from router.openai_params import parse_messages
from router.tokenizer import Tokenizer

pytestmark = pytest.mark.timeout(60)

LLAMA2 = {
    "TGICHAT_USER_PRE": " [INST] ",
    "TGICHAT_USER_POST": " [/INST] ",
    "TGICHAT_SYS_PRE": " [INST] <<SYS>> ",
    "TGICHAT_SYS_POST": " <</SYS>> [/INST] ",
}
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Capital of France?"},
]


def normalize_messages(messages: object) -> list[dict]:
    """OpenAI messages as the chat template gets them."""
    return [m.to_template() for m in parse_messages(messages)]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Tokenizer:
    return Tokenizer(tiny_model_dir)


def test_wrapping_is_read_only_when_a_variable_is_set() -> None:
    assert ChatWrapping.from_env({"PATH": "/bin"}) is None
    assert ChatWrapping.from_env({"TGICHAT_ASS_PRE": ""}) == ChatWrapping()


def test_llama2_wrapping_renders_exactly() -> None:
    wrapping = ChatWrapping.from_env(LLAMA2)
    assert wrapping is not None
    text = wrapping.render(normalize_messages(CONVERSATION), add_generation_prompt=True, continue_final=False)
    assert text == (
        " [INST] <<SYS>> You are terse. <</SYS>> [/INST] "
        " [INST] Hi! [/INST] "
        "Hello."
        " [INST] Capital of France? [/INST] "
    )
    with_ass = ChatWrapping.from_env({**LLAMA2, "TGICHAT_ASS_PRE": "<a>", "TGICHAT_ASS_POST": "</a>"})
    assert with_ass is not None
    assert (
        with_ass.render(normalize_messages(CONVERSATION[1:3]), True, False)
        == " [INST] Hi! [/INST] <a>Hello.</a><a>"
    )
    assert (
        with_ass.render(normalize_messages(CONVERSATION[1:3]), True, True) == " [INST] Hi! [/INST] <a>Hello."
    )


def test_wrapping_wins_over_the_template_and_keeps_bos(tokenizer: Tokenizer) -> None:
    prompter = ChatPrompter(tokenizer, None, ChatWrapping.from_env(LLAMA2))
    text, add_special = prompter.render(normalize_messages(CONVERSATION))
    assert text.startswith(" [INST] <<SYS>>") and add_special is True


def test_template_renders_as_transformers_does(tokenizer: Tokenizer) -> None:
    prompter = ChatPrompter(tokenizer, None, None)
    messages = normalize_messages(CONVERSATION)
    text, add_special = prompter.render(messages)
    assert add_special is False  # the template already holds the special tokens: no second BOS
    assert text == tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    continued, _ = prompter.render(normalize_messages(CONVERSATION[:3]), continue_final_message=True)
    assert continued.endswith("Hello.")


def test_override_template_and_kwargs(tokenizer: Tokenizer) -> None:
    template = "{% for m in messages %}[{{ m.role }}|{{ m.content }}|{{ flavour }}]{% endfor %}"
    prompter = ChatPrompter(tokenizer, template, None)
    text, _ = prompter.render(normalize_messages(CONVERSATION[1:2]), template_kwargs={"flavour": "x"})
    assert text == "[user|Hi!|x]"


def test_template_errors_are_400s(tokenizer: Tokenizer) -> None:
    prompter = ChatPrompter(tokenizer, "{{ raise_exception('no system messages') }}", None)
    with pytest.raises(ChatError, match="no system messages"):
        prompter.render(normalize_messages(CONVERSATION))


def test_a_model_without_template_or_wrapping_gets_told_how_to_fix_it(tokenizer: Tokenizer) -> None:
    prompter = ChatPrompter(tokenizer, None, None)
    prompter.template = None
    assert not prompter.available
    with pytest.raises(ChatError, match="--chat-template") as error:
        prompter.render(normalize_messages(CONVERSATION))
    assert "TGICHAT_USER_PRE" in error.value.detail


def test_messages_are_checked() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert normalize_messages(parts) == [{"role": "user", "content": "ab"}]
    assert normalize_messages([{"role": "developer", "content": "x"}])[0]["role"] == "system"
    assert (
        normalize_messages([{"role": "tool", "content": "42", "tool_call_id": "c1"}])[0]["tool_call_id"]
        == "c1"
    )
    bad = [
        ([], "non-empty"),
        ([{"role": "robot", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "image_url"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}], "messages[0].tool_calls[0]"),
        ([{"role": "user", "content": "", "tool_calls": []}], "only assistant messages"),
        ([{"role": "tool", "content": "42"}], "messages[0].tool_call_id"),
        (
            [
                {
                    "role": "assistant",
                    "tool_calls": [
                        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
                    ],
                }
            ],
            "arguments",
        ),
    ]
    for messages, field in bad:
        with pytest.raises(ChatError) as error:
            normalize_messages(messages)
        assert field in error.value.detail


def test_assistant_calls_reach_the_template_with_arguments_as_objects() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
    messages = normalize_messages([{"role": "assistant", "content": None, "tool_calls": [call]}])
    assert messages == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
            ],
        }
    ]


def test_chat_template_flag_takes_a_file_or_a_string(tmp_path: Path) -> None:
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0].content }}")
    assert load_chat_template(str(path)) == "{{ messages[0].content }}"
    assert load_chat_template("{{ x }}") == "{{ x }}"
    assert load_chat_template(None) is None
