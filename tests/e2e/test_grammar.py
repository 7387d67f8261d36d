"""Constrained decoding through the real server on the default model: TGI's `grammar` and OpenAI's
`response_format` on every generation route, streaming and not, in the same batches as unconstrained
requests (which must give their solo greedy output)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import pytest
import requests

from .harness import Launched

pytestmark = pytest.mark.timeout(600)

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["name", "age", "languages"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "status": {"enum": ["pending", "shipped", "delivered"]},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["sku", "quantity"],
                "additionalProperties": False,
            },
        },
        "gift": {"type": "boolean"},
    },
    "required": ["status", "items", "gift"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "maxLength": 30},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
    },
    "required": ["location", "unit", "days"],
    "additionalProperties": False,
}
PHONE = r"\(\d{3}\) \d{3}-\d{4}"
ANY_OBJECT = {"type": "object"}

MAX_NEW = 200
PLAIN_PROMPTS = ["The three primary colors are", "Once upon a time, in a small village,"]


def chat_prompt(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def check(text: str, kind: str, value: Any) -> None:
    if kind == "regex":
        assert re.fullmatch(value, text), text
        return
    parsed = json.loads(text)
    jsonschema.validate(parsed, value)


def post(server: Launched, path: str, body: dict[str, Any]) -> requests.Response:
    response = requests.post(f"{server.url}{path}", json=body, timeout=300, stream=bool(body.get("stream")))
    assert response.status_code == 200, response.text
    return response


def sse(response: requests.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data != b"[DONE]":
                events.append(json.loads(data))
    return events


# Each case: (name, kind, value for check(), a function sending it and returning (text, finish reason)).


def tgi_generate(server: Launched, grammar: dict[str, Any], prompt: str) -> tuple[str, str]:
    parameters = {"max_new_tokens": MAX_NEW, "details": True, "grammar": grammar}
    body = post(server, "/generate", {"inputs": chat_prompt(prompt), "parameters": parameters}).json()
    return body["generated_text"], body["details"]["finish_reason"]


def tgi_stream(server: Launched, grammar: dict[str, Any], prompt: str) -> tuple[str, str]:
    parameters = {"max_new_tokens": MAX_NEW, "details": True, "grammar": grammar}
    events = sse(post(server, "/generate_stream", {"inputs": chat_prompt(prompt), "parameters": parameters}))
    assert all("error" not in e for e in events), events[-1]
    text = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
    assert text == events[-1]["generated_text"]
    return text, events[-1]["details"]["finish_reason"]


def chat(server: Launched, response_format: dict[str, Any], prompt: str, stream: bool) -> tuple[str, str]:
    body = {
        "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_NEW, "temperature": 0,
        "response_format": response_format, "stream": stream,
    }  # fmt: skip
    response = post(server, "/v1/chat/completions", body)
    if not stream:
        choice = response.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    chunks = sse(response)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    return text, [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]


def completion(
    server: Launched, response_format: dict[str, Any], prompt: str, stream: bool
) -> tuple[str, str]:
    body = {
        "prompt": chat_prompt(prompt), "max_tokens": MAX_NEW, "temperature": 0,
        "response_format": response_format, "stream": stream,
    }  # fmt: skip
    response = post(server, "/v1/completions", body)
    if not stream:
        choice = response.json()["choices"][0]
        return choice["text"], choice["finish_reason"]
    chunks = sse(response)
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    return text, [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]


def schema_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


Case = tuple[str, str, Any, str, Callable[[Launched], tuple[str, str]]]
CASES: list[Case] = [
    ("generate json", "json", PERSON, "eos_token",
     lambda s: tgi_generate(s, {"type": "json", "value": PERSON}, "Describe a famous scientist as JSON.")),
    ("generate regex", "regex", PHONE, "eos_token",
     lambda s: tgi_generate(s, {"type": "regex", "value": PHONE}, "What is the White House's phone number?")),
    ("stream json_schema", "json", ORDER, "eos_token",
     lambda s: tgi_stream(s, {"type": "json_schema", "value": {"name": "o", "schema": ORDER}},
                          "Write a JSON order for two books.")),
    ("stream regex", "regex", PHONE, "eos_token",
     lambda s: tgi_stream(s, {"type": "regex", "value": PHONE}, "Give me a phone number in New York.")),
    ("chat json_schema", "json", WEATHER, "stop",
     lambda s: chat(s, schema_format("weather", WEATHER), "Weather in Paris for 3 days, as JSON.", False)),
    ("chat stream json_schema", "json", PERSON, "stop",
     lambda s: chat(s, schema_format("person", PERSON), "Describe a chef as JSON.", True)),
    ("chat json_object", "json", ANY_OBJECT, "stop",
     lambda s: chat(s, {"type": "json_object"}, 'Answer as a JSON object with the key "capital": what is the capital of France?', False)),
    ("completion json_schema", "json", ORDER, "stop",
     lambda s: completion(s, schema_format("order", ORDER), "Write a JSON order for shoes.", False)),
    ("completion stream json_object", "json", ANY_OBJECT, "stop",
     lambda s: completion(s, {"type": "json_object"}, 'Reply with the JSON object {"ok": true} and nothing else.', True)),
]  # fmt: skip


def plain(server: Launched, prompt: str) -> list[int]:
    parameters = {"max_new_tokens": 40, "details": True, "ignore_eos_token": True}
    body = post(server, "/generate", {"inputs": prompt, "parameters": parameters}).json()
    return [t["id"] for t in body["details"]["tokens"]]


def test_constrained_outputs_validate_and_leave_batch_mates_alone(default_server: Launched) -> None:
    solo = [plain(default_server, p) for p in PLAIN_PROMPTS]
    jobs: list[Callable[[], Any]] = [lambda case=case: case[4](default_server) for case in CASES]
    jobs += [lambda p=p: plain(default_server, p) for p in PLAIN_PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as pool:  # constrained and unconstrained requests share batches
        results = list(pool.map(lambda job: job(), jobs))
    failures = []
    for (name, kind, value, reason, _), (text, finish) in zip(CASES, results, strict=False):
        print(f"\n{name}: {finish} {text}")
        try:
            assert finish == reason, f"finish reason {finish}"
            check(text, kind, value)
        except (AssertionError, ValueError, jsonschema.ValidationError) as e:
            failures.append(f"{name}: {e}: {text!r}")
    assert not failures, "\n".join(failures)
    assert results[len(CASES) :] == solo  # unconstrained batch-mates: their solo greedy output


def test_bad_constraints_are_4xx_naming_the_field(default_server: Launched) -> None:
    url = default_server.url
    bad = {"type": "json", "value": {"type": "object", "not": {}}}
    response = requests.post(
        f"{url}/generate", json={"inputs": "Hi", "parameters": {"grammar": bad}}, timeout=60
    )
    assert response.status_code == 422 and "`grammar`" in response.json()["error"], response.text
    body = {"messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_schema"}}
    response = requests.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
    body = {"prompt": "Hi", "response_format": {"type": "regex", "value": "a"}}
    response = requests.post(f"{url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"
