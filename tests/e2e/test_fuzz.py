"""Malformed requests on the real launcher: every one gets a 4xx that names what is wrong, never a 5xx, a
traceback, a file path or a memory address; the server stays healthy and its memory flat.

Cases are generated deterministically (``random.Random(SEED)``): mutations of valid bodies, wrong types,
boundary numbers, NaN/Infinity, huge integers, lone surrogates, invalid UTF-8, deep nesting, strings near
the payload limit, wrong content types, on every POST route. Each test prints its figures (``pytest -s``).
"""

from __future__ import annotations

import collections
import copy
import json
import random
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import requests

from .conftest import stop_and_check
from .harness import Launched

pytestmark = pytest.mark.timeout(300)

SEED = 1234
WARMUP_SEED = 4321
CASES_PER_ROUTE = 300
WARMUP_PER_ROUTE = 50
WORKERS = 8
MAX_INPUT = 96
MAX_TOTAL = 128
PAYLOAD_LIMIT = 2_000_000
SERVER_ARGS = [
    "--max-input-length", str(MAX_INPUT),
    "--max-total-tokens", str(MAX_TOTAL),
    "--max-batch-prefill-tokens", "512",
]  # fmt: skip

TGI_ROUTES = ("/generate", "/generate_stream", "/")
CHAT_ROUTES = ("/v1/chat/completions", "/chat/completions")
COMPLETION_ROUTES = ("/v1/completions", "/completions")
RESPONSES_ROUTES = ("/v1/responses",)
MESSAGES_ROUTES = ("/v1/messages", "/v1/messages/count_tokens")
ROUTES = (*TGI_ROUTES, *CHAT_ROUTES, *COMPLETION_ROUTES, "/tokenize", *RESPONSES_ROUTES, *MESSAGES_ROUTES)

TGI_PARAMETERS = (
    "best_of", "temperature", "repetition_penalty", "frequency_penalty", "presence_penalty", "top_k", "top_p",
    "typical_p", "do_sample", "max_new_tokens", "return_full_text", "stop", "truncate", "watermark", "details",
    "decoder_input_details", "seed", "top_n_tokens", "ignore_eos_token", "ignore_eos", "grammar", "adapter_id",
)  # fmt: skip
OPENAI_FIELDS = (
    "model", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "max_tokens", "max_completion_tokens", "n", "stop", "stream", "stream_options",
    "logit_bias", "stop_token_ids", "min_tokens", "ignore_eos", "skip_special_tokens", "user",
    "response_format", "tools", "tool_choice", "modalities",
)  # fmt: skip
CHAT_FIELDS = (*OPENAI_FIELDS, "messages", "logprobs", "top_logprobs", "add_generation_prompt",
               "continue_final_message", "chat_template_kwargs", "parallel_tool_calls", "metadata", "store",
               "service_tier", "reasoning_effort")  # fmt: skip
COMPLETION_FIELDS = (*OPENAI_FIELDS, "prompt", "echo", "logprobs", "best_of", "suffix")
TOKENIZE_FIELDS = ("prompt", "messages", "model", "add_special_tokens", "add_generation_prompt",
                   "continue_final_message")  # fmt: skip
RESPONSES_FIELDS = ("model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "max_tool_calls",
                    "text", "max_output_tokens", "temperature", "top_p", "stream", "store", "previous_response_id",
                    "metadata", "user", "reasoning", "include", "truncation", "background")  # fmt: skip
MESSAGES_FIELDS = ("model", "max_tokens", "messages", "system", "stop_sequences", "stream", "temperature", "top_p",
                   "top_k", "tools", "tool_choice", "metadata", "thinking", "service_tier")  # fmt: skip

NAN, INF = float("nan"), float("inf")
LARGE_INTEGERS = (2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**200,
                  -(2**63) - 1, -(2**64))  # fmt: skip
BOUNDARY_NUMBERS = (0, -1, 1, 2, 4, 5, 6, *LARGE_INTEGERS, 1e308, -1e308, 5e-324, 1e-300, 0.5, 1.0, 1.5, 2.0, -0.0,
                    NAN, INF, -INF)  # fmt: skip
# Fields that take numbers: they get boundary values in otherwise valid bodies.
NUMERIC = ("best_of", "temperature", "repetition_penalty", "frequency_penalty", "presence_penalty", "top_k",
           "top_p", "typical_p", "max_new_tokens", "truncate", "seed", "top_n_tokens", "min_p", "max_tokens",
           "max_completion_tokens", "n", "min_tokens", "logprobs", "top_logprobs", "max_output_tokens",
           "max_tool_calls")  # fmt: skip
WEIRD = (
    *BOUNDARY_NUMBERS, "NaN", "Infinity", "-Infinity", "", "a", "0", "1e308", True, False, None, [], {}, [1, 2],
    ["a"], [["a"]], [[[1]]], {"a": 1}, {"type": "text"}, "\ud800", "\udfff", "x\ud83d", "\udc00y", "é🤗東京",
    "\u0000", " " * 50, "a" * 3000, [""], ["a"] * 12, [2**64], [-1], [1.5], ["\ud800"],
)  # fmt: skip
INVALID_UTF8 = (b"\xff", b"\xfe", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xf0\x28\x8c\xbc", b"\xed\xa0\x80",
                b"\xc0\xaf", b"\xf8\x88\x80\x80\x80")  # fmt: skip
CONTENT_TYPES = ("text/plain", "", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/jsonx", "application/json; charset=latin-1", "application/json; charset=utf-8")  # fmt: skip

FORBIDDEN = re.compile(r"Traceback|/work/|File \"|0x[0-9a-fA-F]{6,}|site-packages")


def valid_body(route: str) -> dict:
    if route in TGI_ROUTES:
        body: dict = {"inputs": "Hello world", "parameters": {"max_new_tokens": 2}}
        if route == "/":
            body["stream"] = False
        return body
    if route in CHAT_ROUTES:
        return {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
    if route in COMPLETION_ROUTES:
        return {"prompt": "Hello", "max_tokens": 2}
    if route in RESPONSES_ROUTES:
        return {"input": "Hello", "max_output_tokens": 2}
    if route in MESSAGES_ROUTES:
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}]}
        if route == "/v1/messages":
            body["max_tokens"] = 2
        return body
    return {"prompt": "Hello"}


def fields(route: str) -> tuple[str, ...]:
    if route in TGI_ROUTES:
        return TGI_PARAMETERS
    if route in CHAT_ROUTES:
        return CHAT_FIELDS
    if route in COMPLETION_ROUTES:
        return COMPLETION_FIELDS
    if route in RESPONSES_ROUTES:
        return RESPONSES_FIELDS
    if route in MESSAGES_ROUTES:
        return MESSAGES_FIELDS
    return TOKENIZE_FIELDS


def nested(rng: random.Random) -> object:
    """Arrays and objects nested up to 400 deep (deeper bodies are written as text in mutate_bytes)."""
    value: object = rng.choice(("a", 1, None))
    for _ in range(rng.choice((5, 20, 33, 100, 400))):
        value = [value] if rng.random() < 0.7 else {"k": value}
    return value


def weird(rng: random.Random) -> object:
    kind = rng.random()
    if kind < 0.1:
        return nested(rng)
    if kind < 0.2:
        return rng.choice(BOUNDARY_NUMBERS) * rng.choice((1, -1))
    if kind < 0.25:
        return [rng.choice(WEIRD) for _ in range(rng.randint(0, 8))]
    if kind < 0.3:
        return {rng.choice(("a", "\ud800", "role", "")): rng.choice(WEIRD)}
    if kind < 0.35:
        return "".join(chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(1, 40)))
    return rng.choice(WEIRD)


def mutate_object(rng: random.Random, route: str, body: dict) -> None:
    """One change to a parsed body: a field set to something odd, removed, or added."""
    target = body["parameters"] if route in TGI_ROUTES and isinstance(body.get("parameters"), dict) else body
    kind = rng.random()
    if kind < 0.25:  # a boundary number where a number belongs, the rest left valid
        numeric = [f for f in fields(route) if f in NUMERIC]
        if numeric:
            target[rng.choice(numeric)] = rng.choice(BOUNDARY_NUMBERS)
    elif kind < 0.55:
        name = rng.choice(fields(route))
        target[name] = odd_tools(rng) if name == "tools" and rng.random() < 0.5 else weird(rng)
    elif kind < 0.65:
        if body:
            del body[rng.choice(list(body))]
    elif kind < 0.7:
        target[rng.choice(("unknown", "Inputs", "\ud800", "", "parameters", "stream"))] = weird(rng)
    elif kind < 0.85:  # the prompt itself
        if route in CHAT_ROUTES or route in MESSAGES_ROUTES or (route == "/tokenize" and rng.random() < 0.5):
            body.pop("prompt", None)
            message = {"role": "user", "content": "Hello"}
            message[rng.choice(("role", "content", "name", "tool_calls", "tool_call_id"))] = weird(rng)
            if rng.random() < 0.2:  # an assistant's call with an odd part
                call: dict = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                where = rng.choice((call, call["function"]))
                where[rng.choice(("id", "type", "function", "name", "arguments"))] = weird(rng)
                message.update(role="assistant", tool_calls=[call])
            if rng.random() < 0.3:
                message["content"] = [{"type": rng.choice(("text", "image_url", None)), "text": weird(rng)}]
            body["messages"] = rng.choice(([message], [message] * rng.randint(2, 5), message, []))
        elif route in RESPONSES_ROUTES:
            body["input"] = odd_input(rng)
        else:
            key = "inputs" if route in TGI_ROUTES else "prompt"
            body[key] = weird(rng)
    elif kind < 0.92:  # limits: stop sequences, prompt lengths, counts
        choice = rng.random()
        if choice < 0.4:
            target["stop"] = ["." * rng.randint(0, 3) for _ in range(rng.randint(0, 12))]
        else:
            prompt = "hello " * rng.choice((MAX_INPUT - 10, MAX_INPUT, MAX_INPUT + 1, 500, 3000))
            key = "inputs" if route in TGI_ROUTES else "prompt"
            if route in CHAT_ROUTES or route in MESSAGES_ROUTES:
                body["messages"] = [{"role": "user", "content": prompt}]
            else:
                body[key] = prompt if rng.random() < 0.8 else [prompt] * rng.randint(2, 200)
    else:
        if route == "/":
            body["stream"] = weird(rng)
        else:
            body.clear()
            body.update(
                copy.deepcopy(rng.choice(({}, {"parameters": {}}, {"inputs": None}, {"prompt": None})))
            )


def odd_tools(rng: random.Random) -> list:
    """A valid function tool with one part set to something odd."""
    tool: dict = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    where = rng.choice((tool, tool["function"], tool["function"]["parameters"]))
    where[rng.choice(("type", "function", "name", "description", "parameters", "strict", "properties"))] = (
        weird(rng)
    )
    return [tool] * rng.randint(1, 3)


def odd_input(rng: random.Random) -> list:
    """Valid Responses input items (a message, a call, its output) with one part set to something odd."""
    part = {"type": "input_text", "text": "Hello"}
    message = {"type": "message", "role": "user", "content": [part]}
    call = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "c", "output": "1"}
    where = rng.choice((part, message, call, output))
    where[rng.choice(("type", "role", "content", "text", "call_id", "name", "arguments", "output", "id"))] = (
        weird(rng)
    )
    return rng.choice(([message, call, output], [message], [call, output, message], [output]))


def dumps(value: object) -> bytes:
    # allow_nan writes NaN/Infinity; ensure_ascii writes lone surrogates as \ud800 escapes.
    return json.dumps(value, allow_nan=True).encode()


def mutate_bytes(rng: random.Random, raw: bytes) -> bytes:
    kind = rng.random()
    if kind < 0.2:
        return raw[: rng.randint(0, max(len(raw) - 1, 0))]
    if kind < 0.45:
        at = raw.find(b'"', rng.randint(0, max(len(raw) - 1, 0)))
        at = at + 1 if at >= 0 else len(raw) // 2
        return raw[:at] + rng.choice(INVALID_UTF8) + raw[at:]
    if kind < 0.6:
        at = rng.randint(0, max(len(raw) - 1, 0))
        return raw[:at] + bytes([rng.randint(0, 255)]) + raw[at + 1 :]
    if kind < 0.7:
        return rng.choice((b"", b"null", b"[]", b"1", b'"text"', b"NaN", b"-Infinity", b"true", b"{", b"}",
                           b"\xef\xbb\xbf{}", b'{"a":1}{"b":2}', b"[" * 100_000, b'{"a":' * 50_000))  # fmt: skip
    if kind < 0.8:  # a number too long to convert
        return raw.replace(b"2", b"2" + b"9" * rng.choice((20, 400, 5000)), 1)
    if kind < 0.9:  # NaN / Infinity written where a number was
        return raw.replace(b"2", rng.choice((b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999")), 1)
    return raw + rng.choice((b",", b"]", b" garbage", b"\x00"))


def huge(route: str, size: int) -> bytes:
    """A valid body of exactly ``size`` bytes whose prompt fills it (far over the token limits)."""
    body = valid_body(route)
    chat = route in CHAT_ROUTES or route in MESSAGES_ROUTES
    if chat:
        body["messages"][0]["content"] = ""
    else:
        body["inputs" if route in TGI_ROUTES else "prompt"] = ""
    filler = size - len(dumps(body))
    text = ("hello world " * (filler // 12 + 1))[:filler]
    if chat:
        body["messages"][0]["content"] = text
    else:
        body["inputs" if route in TGI_ROUTES else "prompt"] = text
    raw = dumps(body)
    assert len(raw) == size
    return raw


# Bodies just over the payload limit (413, nothing read) join the fuzz cases. Those just under it (prompts
# far over the token limits) take seconds each to tokenize and ~200 MB for a while, which the allocator hands
# back when it pleases: they have their own test, after the memory readings.
HUGE = [(route, PAYLOAD_LIMIT + 1 + i * 997) for i, route in enumerate(ROUTES)]
WARMUP_HUGE = [("/generate", PAYLOAD_LIMIT + 1), ("/v1/chat/completions", PAYLOAD_LIMIT * 2)]
UNDER_LIMIT = [("/generate", PAYLOAD_LIMIT), ("/generate_stream", PAYLOAD_LIMIT - 1), ("/", PAYLOAD_LIMIT - 100),
               ("/v1/chat/completions", PAYLOAD_LIMIT), ("/completions", PAYLOAD_LIMIT - 1000)]  # fmt: skip


def make_cases(seed: int, per_route: int, big: list[tuple[str, int]]) -> list[tuple[str, bytes, str]]:
    rng = random.Random(seed)
    cases = [(route, huge(route, size), "application/json") for route, size in big]
    for route in ROUTES:
        for _ in range(per_route):
            content_type = "application/json"
            body = valid_body(route)
            for _ in range(rng.choice((1, 1, 1, 2, 3))):
                mutate_object(rng, route, body)
            raw = dumps(body)
            kind = rng.random()
            if kind < 0.3:
                raw = mutate_bytes(rng, raw)
            elif kind < 0.35:
                content_type = rng.choice(CONTENT_TYPES)
            cases.append((route, raw, content_type))
    rng.shuffle(cases)
    return cases


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    server = Launched(["--model-id", str(tiny_model_dir), *SERVER_ARGS])
    server.start(tmp_path_factory.mktemp("fuzz"))
    try:
        server.wait_healthy(120)
        yield server
    finally:
        stop_and_check(server)


def router_process(server: Launched) -> psutil.Process:
    return next(p for p in server.children() if "-m router" in " ".join(p.cmdline()))


def settled_rss(process: psutil.Process) -> int:
    """Resident memory once the last requests' buffers are gone (two equal readings 0.5 s apart)."""
    last = process.memory_info().rss
    for _ in range(10):
        time.sleep(0.5)
        rss = process.memory_info().rss
        if abs(rss - last) < 2**20:
            return rss
        last = rss
    return last


def send_all(server: Launched, cases: list[tuple[str, bytes, str]]) -> tuple[collections.Counter, list[str]]:
    """Sends every case from WORKERS threads; returns the status counts and what went wrong."""
    local = threading.local()
    problems: list[str] = []

    def one(case: tuple[str, bytes, str]) -> int | str:
        route, raw, content_type = case
        if not hasattr(local, "session"):
            local.session = requests.Session()
        headers = {"Content-Type": content_type} if content_type else {}
        try:
            response = local.session.post(server.url + route, data=raw, headers=headers, timeout=120)
        except requests.RequestException as e:
            problems.append(f"{route} {raw[:120]!r}: {type(e).__name__}")
            local.session = requests.Session()
            return "error"
        text = response.text
        if response.status_code >= 500 or FORBIDDEN.search(text):
            problems.append(f"{response.status_code} {route} {raw[:160]!r} -> {text[:300]}")
        elif response.status_code >= 400:
            body = response.json()  # every refusal is JSON with a message
            message = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
            if not message:
                problems.append(f"{response.status_code} without a message: {route} {raw[:160]!r}")
        return response.status_code

    with ThreadPoolExecutor(WORKERS) as pool:
        statuses = collections.Counter(pool.map(one, cases))
    return statuses, problems


def test_fuzz_every_post_route(server: Launched) -> None:
    cases = make_cases(SEED, CASES_PER_ROUTE, HUGE)
    assert len(cases) >= 2000
    router = router_process(server)

    started = time.monotonic()
    warmup, problems = send_all(server, make_cases(WARMUP_SEED, WARMUP_PER_ROUTE, WARMUP_HUGE))
    # Then ordinary cases only; the same round runs again before the second reading.
    plain = make_cases(WARMUP_SEED + 1, WARMUP_PER_ROUTE, [])
    warmup2, more = send_all(server, plain)
    warmup.update(warmup2)
    problems += more
    rss_before = settled_rss(router)
    statuses, more = send_all(server, cases)
    problems += more
    _, more = send_all(server, plain)  # the same round again: both readings are taken in the same state
    problems += more
    rss_after = settled_rss(router)
    elapsed = time.monotonic() - started

    growth = (rss_after - rss_before) / rss_before * 100
    per_route = collections.Counter(route for route, _, _ in cases)
    print(
        f"\n{len(cases)} fuzz cases ({dict(per_route)}) after {sum(warmup.values())} warm-up ones, {elapsed:.1f} s"
    )
    print(
        f"status counts: {dict(sorted(statuses.items(), key=str))}; warm-up: {dict(sorted(warmup.items(), key=str))}"
    )
    print(f"router RSS {rss_before / 2**20:.1f} MiB -> {rss_after / 2**20:.1f} MiB: {growth:+.2f}%")
    assert not problems, "\n".join(problems[:20])
    assert not [s for s in statuses if not isinstance(s, int) or s >= 500]
    assert growth < 5.0

    # Healthy afterwards, and still generating.
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
    response = requests.post(
        f"{server.url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}, timeout=60
    )
    assert response.status_code == 200 and isinstance(response.json()["generated_text"], str)
    assert router.is_running() and router.status() != psutil.STATUS_ZOMBIE


def test_bodies_just_under_the_payload_limit(server: Launched) -> None:
    """2 MB prompts: read, tokenized, and refused for their token count (both numbers in the message)."""

    def one(case: tuple[str, int]) -> tuple[int, str]:
        route, size = case
        raw = huge(route, size)
        response = requests.post(server.url + route, data=raw, headers={"Content-Type": "application/json"})
        return response.status_code, response.text

    started = time.monotonic()
    with ThreadPoolExecutor(len(UNDER_LIMIT)) as pool:
        results = list(pool.map(one, UNDER_LIMIT))
    print(f"{len(results)} bodies of ~{PAYLOAD_LIMIT} bytes in {time.monotonic() - started:.1f} s:")
    for (route, _), (status, text) in zip(UNDER_LIMIT, results, strict=True):
        print(f"  {route} -> {status} {text[:150]}")
        assert status in (400, 422) and not FORBIDDEN.search(text)
        assert f"must be <= {MAX_TOTAL}. Given: " in text and "`inputs` tokens" in text
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200


# The tiny model's tokenizer makes 4 tokens of "hello ": 1200 tokens (over --max-total-tokens 128) and 108
# (over --max-input-length 96, under 128 with one new token).
LONG_PROMPT = "hello " * 300
MID_PROMPT = "hello " * 27
# (route, raw body, content type, status, words the message must hold)
NAMED = [
    ("/generate", b'{"inputs": "hi", "parameters": {"temperature": NaN}}', None, 422, ["`parameters.temperature`"]),
    ("/generate", b'{"inputs": "hi", "parameters": {"top_p": Infinity}}', None, 422, ["`parameters.top_p`"]),
    ("/generate", b'{"inputs": "hi", "parameters": {"top_p": 1e999}}', None, 422, ["`parameters.top_p`", "finite"]),
    ("/generate", b'{"inputs": "\\ud800"}', None, 422, ["`inputs`", "surrogate"]),
    ("/generate_stream", b'{"inputs": "hi", "parameters": {"stop": ["\\udfff"]}}', None, 422, ["`parameters.stop[0]`"]),
    ("/", b'{"inputs": "hi", "stream": "yes"}', None, 422, ["`stream`"]),
    ("/generate", b'{"inputs": "\xff\xfe"}', None, 400, ["UTF-8"]),
    ("/generate", b"[" * 100_000, None, 400, ["nested too deeply"]),
    ("/generate", json.dumps({"inputs": nested(random.Random(0))}).encode(), None, 422, ["`inputs"]),
    ("/generate", b"not json", None, 400, ["JSON"]),
    ("/generate", b"[]", None, 422, ["JSON object"]),
    ("/generate", b'{"inputs": "hi"}', "text/plain", 415, ["Content-Type"]),
    ("/generate", b'{"inputs": ""}', None, 422, ["`inputs`", "empty"]),
    ("/generate", b'{"inputs": [["a"]]}', None, 422, ["`inputs`", "string"]),
    ("/generate", b'{"inputs": "hi", "parameters": {"seed": %d}}' % 2**200, None, 422, ["`seed`"]),
    ("/generate", b'{"inputs": "hi", "parameters": {"max_new_tokens": 1e308}}', None, 422, ["`max_new_tokens`"]),
    ("/generate", b'{"inputs": "hi", "parameters": {"max_new_tokens": %d}}' % 2**64, None, 422, ["`max_new_tokens`"]),
    ("/generate", b'{"inputs": "hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}', None, 422, ["`stop`", "4"]),
    ("/generate", json.dumps({"inputs": LONG_PROMPT}).encode(), None, 422, ["`inputs`", f"<= {MAX_TOTAL}", "Given: 1200"]),
    ("/generate", json.dumps({"inputs": MID_PROMPT, "parameters": {"max_new_tokens": 1}}).encode(), None, 422,
     ["`inputs`", f"less than {MAX_INPUT} tokens", "Given: 108"]),
    ("/v1/completions", json.dumps({"prompt": MID_PROMPT, "max_tokens": 1}).encode(), None, 400,
     [f"less than {MAX_INPUT} tokens", "Given: 108"]),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', None, 400,
     ["`messages[0].content`"]),
    ("/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', None, 400,
     ["`temperature`"]),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"\xc2\xb2": 1}}', None,
     400, ["`logit_bias`"]),
    ("/v1/completions", json.dumps({"prompt": ["a"] * 200, "max_tokens": 1}).encode(), None, 400, ["`prompt`"]),
    ("/completions", b'{"prompt": "", "max_tokens": 1}', None, 400, ["`prompt`", "empty"]),
    ("/completions", b'{"prompt": [%d], "max_tokens": 1}' % 2**200, None, 400, ["`prompt`"]),
    ("/tokenize", b'{"prompt": "\\ud800"}', None, 400, ["`prompt`"]),
    ("/tokenize", b'{"prompt": 5}', None, 400, ["`prompt`"]),
    # Served: a top_k beyond the vocabulary keeps every token (it used to crash the batching loop).
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_k": %d, "max_tokens": 2}'
     % 2**200, None, 200, []),
]  # fmt: skip


@pytest.mark.parametrize(("route", "raw", "content_type", "status", "words"), NAMED)
def test_malformed_requests_name_the_field(
    server: Launched, route: str, raw: bytes, content_type: str | None, status: int, words: list[str]
) -> None:
    response = requests.post(
        server.url + route, data=raw, headers={"Content-Type": content_type or "application/json"}, timeout=60
    )
    text = response.text
    print(f"{route} -> {response.status_code} {text[:160]}")
    assert response.status_code == status, text
    body = response.json()
    if status >= 400:
        message = body["error"]["message"] if isinstance(body["error"], dict) else body["error"]
        for word in words:
            assert word in message, message
    assert requests.get(f"{server.url}/health", timeout=30).status_code == 200
