"""Tool calling, reasoning and the request fields of issue 18 on the real server, through the official clients
(the openai SDK, huggingface_hub's InferenceClient): the default model has no tool-aware template, so it
gets the generic rendering and the hermes parser (one test starts it with the pythonic parser); forced
calls are valid by constrained decoding."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pydantic
import pytest
import requests

from router.agent import FunctionTool, tools_preamble
from router.call_grammar import MAX_CALLS
from router.toolcalls import get_tool_parser

from .conftest import DEFAULT_MODEL_START_TIMEOUT_S, stop_and_check
from .harness import Launched

pytestmark = pytest.mark.timeout(600)

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER_SCHEMA},
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a timezone",
            "parameters": {
                "type": "object",
                "properties": {"tz": {"type": "string", "maxLength": 20}},
                "required": ["tz"],
                "additionalProperties": False,
            },
        },
    },
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def assert_valid(calls: list, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_and_named_calls_are_valid(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="tgi", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert_valid(choice.message.tool_calls, {"get_weather", "get_time"})
    named = client.chat.completions.create(
        model="tgi", messages=ASK, tools=TOOLS, max_tokens=80, temperature=0.8, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, parallel_tool_calls=False,
    )  # fmt: skip
    calls = named.choices[0].message.tool_calls
    assert len(calls) == 1 and named.choices[0].finish_reason == "tool_calls"
    assert_valid(calls, {"get_time"})


def test_streamed_calls_arrive_as_tool_call_deltas(client: openai.OpenAI) -> None:
    kwargs = {"model": "tgi", "messages": ASK, "tools": TOOLS, "max_tokens": 80, "temperature": 0,
              "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}  # fmt: skip
    whole = client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    first = deltas[0]
    assert first.index == 0 and first.id.startswith("call_") and first.function.name == "get_weather"
    arguments = "".join(d.function.arguments or "" for d in deltas if d.index == 0)
    assert arguments == whole[0].function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    assert not any(c.choices[0].delta.content for c in chunks)


def test_auto_answers_or_calls(client: openai.OpenAI) -> None:
    """A small model under ``auto`` may or may not call: either shape is right, a 5xx never is."""
    for stream in (False, True):
        kwargs = {"model": "tgi", "messages": ASK, "tools": TOOLS, "max_tokens": 60, "temperature": 0}
        if stream:
            chunks = list(client.chat.completions.create(**kwargs, stream=True))
            finish = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
            assert finish in (["stop"], ["length"], ["tool_calls"])
            continue
        choice = client.chat.completions.create(**kwargs).choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            assert_valid(choice.message.tool_calls, {"get_weather", "get_time"})
        else:
            assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    none = client.chat.completions.create(
        model="tgi", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=20, temperature=0
    ).choices[0]
    assert none.message.tool_calls is None and none.finish_reason in ("stop", "length")


def test_auto_calls_are_valid_once_opened(client: openai.OpenAI, default_server: Launched) -> None:
    """Under ``auto`` the lazy grammar forces a call once the model writes ``<tool_call>``. The default model
    does not call of itself, so ``logit_bias`` pushes the opener's pieces (any text the grammar allows):
    once it has written them, what follows is a call the schema allows; with ``parallel_tool_calls`` false
    it is the only one, and the opener can no longer be written after it."""
    tokenized = requests.post(
        f"{default_server.url}/tokenize",
        json={"prompt": "<tool_call>", "add_special_tokens": False},
        timeout=60,
    ).json()
    assert "".join(tokenized["token_strs"]) == "<tool_call>" and len(tokenized["tokens"]) > 1
    choice = client.chat.completions.create(
        model="tgi", messages=ASK, tools=TOOLS, max_tokens=80, temperature=0, parallel_tool_calls=False,
        logit_bias={str(i): 100 for i in tokenized["tokens"]},
    ).choices[0]  # fmt: skip
    assert choice.message.tool_calls and len(choice.message.tool_calls) == 1, choice.message.content
    assert_valid(choice.message.tool_calls, {"get_weather", "get_time"})
    assert "<tool_call>" not in (choice.message.content or "")  # the pieces, but never the opener again


def test_required_parallel_calls_end(client: openai.OpenAI) -> None:
    """``required`` with parallel calls: a small model that would repeat calls until its tokens run out
    ends after ``MAX_CALLS`` calls at most (the grammar then allows only the end)."""
    choice = client.chat.completions.create(
        model="tgi",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=400,
        temperature=1.0,
        seed=0,
    ).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert 1 <= len(choice.message.tool_calls) <= MAX_CALLS
    assert_valid(choice.message.tool_calls, {"get_weather", "get_time"})


@pytest.fixture(scope="module")
def pythonic_server(
    default_server: Launched, test_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Launched]:
    """The default model with the pythonic parser (after ``default_server``, which converted it)."""
    args = [
        "--huggingface-hub-cache",
        str(test_cache / "hub"),
        "--tool-call-parser",
        "pythonic",
        "--dtype",
        "float32",
    ]
    server = Launched(args).start(tmp_path_factory.mktemp("pythonic"))
    try:
        server.wait_healthy(DEFAULT_MODEL_START_TIMEOUT_S)
        yield server
    finally:
        stop_and_check(server)


def test_pythonic_auto_calls_are_constrained_once_started(pythonic_server: Launched) -> None:
    """Under ``auto`` with the pythonic parser the answer is free until it starts as a call list; then the
    calls are forced. ``logit_bias`` pushes the pieces of ``[weather(`` (a tool named so that its name is one
    token: the model writes the pieces in order): the answer starts the list, and what follows is a valid
    call, parsed into ``tool_calls``, streamed and not. The same prompt and bias through ``/v1/completions``
    (no grammar) shows what the model writes unconstrained: ``[weather(weather(...``, no call."""
    url = pythonic_server.url
    tools = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                               "parameters": WEATHER_SCHEMA}}]  # fmt: skip
    head = requests.post(f"{url}/tokenize", json={"prompt": "[weather(", "add_special_tokens": False},
                         timeout=60).json()  # fmt: skip
    assert head["token_strs"] == ["[", "weather", "("]
    bias = {str(i): 100 for i in head["tokens"]}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    kwargs = {"model": "tgi", "messages": ASK, "tools": tools, "max_tokens": 60, "temperature": 0,
              "logit_bias": bias}  # fmt: skip
    choice = client.chat.completions.create(**kwargs).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas if d.id] == ["weather"]
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    # the same prompt (the generic rendering's system message), the same bias, no grammar
    function = FunctionTool("weather", "Weather in a city", WEATHER_SCHEMA)
    messages = [{"role": "system", "content": tools_preamble("pythonic", (function,))}, *ASK]
    prompt = requests.post(f"{url}/tokenize", json={"messages": messages}, timeout=60).json()["tokens"]
    free = client.completions.create(model="tgi", prompt=prompt, max_tokens=60, temperature=0,
                                     logit_bias=bias).choices[0].text  # fmt: skip
    assert free.startswith("[weather("), free
    assert get_tool_parser("pythonic").parse(free).calls == [], f"a call unconstrained: {free!r}"


def test_a_tool_result_round_trip(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model="tgi", messages=ASK, tools=TOOLS, max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ).choices[0].message  # fmt: skip
    messages = [
        *ASK,
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": '{"temperature": 18}'},
    ]
    answer = client.chat.completions.create(
        model="tgi", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=30, temperature=0
    )
    assert answer.choices[0].message.content and answer.usage.prompt_tokens > 50


def test_structured_outputs_still_parse(client: openai.OpenAI) -> None:
    class City(pydantic.BaseModel):
        name: str
        country: str

    parsed = client.beta.chat.completions.parse(
        model="tgi", messages=[{"role": "user", "content": "Name a city in France."}], response_format=City,
        max_tokens=60, temperature=0,
    )  # fmt: skip
    assert isinstance(parsed.choices[0].message.parsed, City)


def test_huggingface_hub_client_with_tools(default_server: Launched) -> None:
    from huggingface_hub import InferenceClient

    hf = InferenceClient(base_url=default_server.url)
    output = hf.chat_completion(ASK, tools=TOOLS, tool_choice="required", max_tokens=80, temperature=0)
    calls = output.choices[0].message.tool_calls
    assert calls and calls[0].function.name in SCHEMAS
    arguments = calls[0].function.arguments
    jsonschema.validate(json.loads(arguments) if isinstance(arguments, str) else arguments,
                        SCHEMAS[calls[0].function.name])  # fmt: skip
    assert hf.chat_completion(ASK, max_tokens=5).choices[0].message.content
    # TGI's own route through the same client (issue 18: text_generation keeps working)
    text = hf.text_generation("The capital of France is", max_new_tokens=5)
    assert isinstance(text, str) and text
    detailed = hf.text_generation("The capital of France is", max_new_tokens=5, details=True, seed=1)
    assert detailed.generated_text and detailed.details.generated_tokens == len(detailed.details.tokens) <= 5


def test_fields_are_honoured_or_refused(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="dummy", messages=ASK, max_tokens=3, service_tier="auto", metadata={"team": "a"}, user="u1",
        store=False,
    )  # fmt: skip
    assert response.service_tier == "default" and response.metadata == {"team": "a"}
    assert response.model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the served name, whatever was asked
    for kwargs, param in [
        ({"store": True}, "store"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"service_tier": "gold"}, "service_tier"),
        ({"reasoning_effort": "max"}, "reasoning_effort"),
        ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options"),
    ]:
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="tgi", messages=ASK, max_tokens=3, **kwargs)
        assert error.value.body["param"] == param, (kwargs, error.value.body)
        assert error.value.body["type"] == "invalid_request_error"


def test_continuous_usage_stats_for_guidellm(default_server: Launched) -> None:
    body = {"messages": ASK, "max_tokens": 5, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    with requests.post(f"{default_server.url}/v1/chat/completions", json=body, stream=True, timeout=60) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith(b"data: ")]
    chunks = [json.loads(line) for line in lines[:-1]]
    assert lines[-1] == b"[DONE]" and all(c["usage"] is not None for c in chunks)
    generated = [c["usage"]["completion_tokens"] for c in chunks if c["choices"]]
    assert generated == sorted(generated) and generated[-1] == 5
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


THINK_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)


def test_reasoning_comes_back_apart(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A tiny random model whose template opens <think>: its whole answer is reasoning (it never closes
    it), streamed and not; --strict-model-name gives back the 404."""
    args = ["--model-id", str(tiny_model_dir), "--chat-template", THINK_TEMPLATE, "--strict-model-name"]
    server = Launched(args).start(tmp_path)
    try:
        server.wait_healthy(120)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        kwargs = {"model": str(tiny_model_dir), "messages": ASK, "max_tokens": 8, "temperature": 0,
                  "extra_body": {"ignore_eos": True}}  # fmt: skip
        message = client.chat.completions.create(**kwargs).choices[0].message
        reasoning = message.model_extra["reasoning_content"]
        assert reasoning and message.content == ""
        chunks = list(client.chat.completions.create(**kwargs, stream=True))
        streamed = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks)
        assert streamed == reasoning
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(**{**kwargs, "model": "dummy"})
    finally:
        stop_and_check(server)
