"""The HTTP edge on the real launcher: the API key on every route, 413 over --payload-limit, CORS.

Two servers: A (API key, --payload-limit 1000, one named CORS origin) and B (API key,
--metrics-require-auth, CORS for any origin). The default (no CORS at all) is checked on the router's own
middlewares in-process. Each test prints the figure it checks (``pytest -s``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from aiohttp import test_utils, web

from router import middleware
from router.app import create_app
from router.config import RouterConfig

from .conftest import stop_and_check
from .harness import Launched

pytestmark = pytest.mark.timeout(300)

KEY = "tgi-test-key-7f3a9c"
ORIGIN = "https://app.example"
PAYLOAD_LIMIT = 1000

GENERATE = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
COMPLETION = {"prompt": "Hello", "max_tokens": 2}
MESSAGES = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
# Every route the app serves, with a valid request for it.
ROUTES: dict[tuple[str, str], dict | None] = {
    ("POST", "/generate"): GENERATE,
    ("POST", "/generate_stream"): GENERATE,
    ("POST", "/"): GENERATE,
    ("GET", "/health"): None,
    ("GET", "/info"): None,
    ("GET", "/metrics"): None,
    ("GET", "/docs"): None,
    ("GET", "/docs/assets/swagger-ui.css"): None,
    ("GET", "/docs/assets/swagger-ui-bundle.js"): None,
    ("GET", "/openapi.json"): None,
    ("GET", "/api-doc/openapi.json"): None,
    ("GET", "/v1/models"): None,
    ("POST", "/v1/chat/completions"): CHAT,
    ("POST", "/v1/completions"): COMPLETION,
    ("POST", "/chat/completions"): CHAT,
    ("POST", "/completions"): COMPLETION,
    ("POST", "/tokenize"): {"prompt": "Hello"},
    ("GET", "/version"): None,
    ("POST", "/v1/messages"): MESSAGES,
    ("POST", "/v1/messages/count_tokens"): {"model": "tiny", "messages": MESSAGES["messages"]},
    ("POST", "/v1/responses"): {"input": "Hello", "max_output_tokens": 2},
    # No stored response has this id: past the key check, the route answers 404.
    ("GET", "/v1/responses/{response_id}"): None,
    ("DELETE", "/v1/responses/{response_id}"): None,
    ("GET", "/v1/responses/{response_id}/input_items"): None,
    ("POST", "/v1/responses/{response_id}/cancel"): None,
    # Off on these servers (no --enable-lora-runtime-updates): past the key check, a 404 naming the flag.
    ("POST", "/v1/load_lora_adapter"): {"lora_name": "x", "lora_path": "/tmp"},
    ("POST", "/v1/unload_lora_adapter"): {"lora_name": "x"},
}
OPENAI_PATHS = {"/v1/models", "/v1/chat/completions", "/v1/completions", "/chat/completions", "/completions",
                "/tokenize", "/version", "/v1/responses", "/v1/responses/{response_id}",
                "/v1/responses/{response_id}/input_items", "/v1/responses/{response_id}/cancel",
                "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}  # fmt: skip


def _server(tiny_model_dir: Path, log_dir: Path, *args: str) -> Iterator[Launched]:
    # The key goes in the environment only: a command line is readable by every user of the machine.
    server = Launched(["--model-id", str(tiny_model_dir), *args], env={"API_KEY": KEY})
    server.start(log_dir)
    try:
        server.wait_healthy(120)
        yield server
    finally:
        stop_and_check(server)


@pytest.fixture(scope="module")
def server_a(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    args = ["--payload-limit", str(PAYLOAD_LIMIT), "--cors-allow-origin", ORIGIN]
    yield from _server(tiny_model_dir, tmp_path_factory.mktemp("auth-a"), *args)


@pytest.fixture(scope="module")
def server_b(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launched]:
    args = ["--metrics-require-auth", "--cors-allow-origin", "*"]
    yield from _server(tiny_model_dir, tmp_path_factory.mktemp("auth-b"), *args)


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def call(server: Launched, method: str, path: str, headers: dict[str, str] | None = None,
         body: dict | None = None) -> requests.Response:  # fmt: skip
    url = server.url + path.replace("{response_id}", "resp_unknown")
    return requests.request(method, url, json=body, headers=headers or {}, timeout=60)


def check_401(response: requests.Response, path: str) -> None:
    assert response.status_code == 401, (path, response.status_code, response.text)
    assert response.headers.get("WWW-Authenticate") == "Bearer", path
    body = response.json()  # always JSON
    if path.startswith("/v1/messages"):  # Anthropic's shape
        assert body["type"] == "error" and body["error"]["type"] == "authentication_error", body
        assert "API key" in body["error"]["message"]
    elif path in OPENAI_PATHS:
        error = body["error"]
        assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key", body
        assert error["param"] is None and "API key" in error["message"]
    else:
        assert body["error_type"] == "authentication" and "API key" in body["error"], body
    assert KEY not in response.text


def test_the_route_list_is_complete(tiny_model_dir: Path) -> None:
    """The matrix below covers every route the app registers (a new route must join it)."""
    app = create_app(RouterConfig(tokenizer_name=str(tiny_model_dir), model_id="tiny"))
    served = {(r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD"}
    print(f"{len(served)} routes")
    assert served == set(ROUTES)


def auth_matrix(server: Launched, open_paths: set[str]) -> dict[str, int]:
    counts = {"no key": 0, "wrong key": 0, "right key": 0}
    for (method, path), body in ROUTES.items():
        for label, headers in (
            ("no key", {}),
            ("wrong key", bearer("not-the-key")),
            ("wrong key", {"Authorization": KEY}),  # no scheme
            ("wrong key", bearer(KEY + "x")),
            ("wrong key", {"Authorization": "Basic " + KEY}),
        ):
            response = call(server, method, path, headers, body)
            if path in open_paths:
                assert response.status_code == 200, (label, path, response.status_code)
            else:
                check_401(response, path)
                counts[label] += 1
        response = call(server, method, path, bearer(), body)
        expected = 404 if "{" in path or "lora_adapter" in path else 200
        assert response.status_code == expected, (path, response.status_code, response.text[:300])
        counts["right key"] += 1
    return counts


def test_auth_matrix(server_a: Launched) -> None:
    counts = auth_matrix(server_a, {"/health", "/metrics"})
    print(f"401s without the key / with wrong keys, 200s with it: {counts}")
    # Unknown paths and methods answer 401 too without the key (nothing about the routes leaks).
    check_401(call(server_a, "GET", "/no-such-route"), "/no-such-route")
    check_401(call(server_a, "GET", "/generate"), "/generate")
    assert call(server_a, "GET", "/generate", bearer()).status_code == 405
    # The scheme is case-insensitive, as RFC 7235 says.
    assert call(server_a, "GET", "/info", {"Authorization": f"bearer {KEY}"}).status_code == 200


def test_metrics_require_auth(server_b: Launched) -> None:
    counts = auth_matrix(server_b, {"/health"})
    print(f"with --metrics-require-auth: {counts}")
    assert call(server_b, "GET", "/metrics", bearer()).text.startswith("#")


def test_the_key_is_on_no_command_line(server_a: Launched, server_b: Launched) -> None:
    processes = 0
    for server in (server_a, server_b):
        launcher = psutil.Process(server.process.pid)
        for process in [launcher, *server.children()]:
            command = " ".join(process.cmdline())
            assert KEY not in command, command
            processes += 1
            if "-m shard" in command:
                assert "API_KEY" not in process.environ()  # the shards never get it
    print(f"{processes} command lines checked")


def test_payload_limit_by_content_length(server_a: Launched) -> None:
    big = {"inputs": "x" * (PAYLOAD_LIMIT * 5), "parameters": {"max_new_tokens": 2}}
    response = call(server_a, "POST", "/generate", bearer(), big)
    assert response.status_code == 413, response.text
    body = response.json()
    assert body["error_type"] == "payload_too_large" and str(PAYLOAD_LIMIT) in body["error"]
    response = call(server_a, "POST", "/v1/completions", bearer(), {"prompt": "x" * PAYLOAD_LIMIT * 5})
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "payload_too_large" and str(PAYLOAD_LIMIT) in error["message"]
    # Just under the limit is served.
    ok = {"inputs": "Hello " * 100, "parameters": {"max_new_tokens": 2}}
    assert len(json.dumps(ok)) < PAYLOAD_LIMIT
    assert call(server_a, "POST", "/generate", bearer(), ok).status_code == 200
    # Without the key, the key is asked for first.
    assert call(server_a, "POST", "/generate", {}, big).status_code == 401
    print(f"413 over {PAYLOAD_LIMIT} bytes: {body['error']}")


def test_payload_limit_chunked(server_a: Launched) -> None:
    def chunks():  # no Content-Length: Transfer-Encoding: chunked
        yield b'{"inputs": "'
        for _ in range(50):
            yield b"x" * 100
        yield b'"}'

    statuses = {}
    for path in ("/generate", "/v1/chat/completions", "/tokenize"):
        response = requests.post(
            server_a.url + path,
            data=chunks(),
            headers={**bearer(), "Content-Type": "application/json"},
            timeout=60,
        )
        assert response.status_code == 413, (path, response.text)
        text = response.text
        assert str(PAYLOAD_LIMIT) in text and response.headers["Content-Type"].startswith("application/json")
        statuses[path] = response.status_code
    print(f"chunked bodies over the limit: {statuses}")
    assert requests.get(server_a.url + "/health", timeout=10).status_code == 200


def test_cors_named_origin(server_a: Launched) -> None:
    response = call(server_a, "GET", "/info", {**bearer(), "Origin": ORIGIN})
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Origin" in response.headers["Vary"]
    assert "Access-Control-Allow-Credentials" not in response.headers
    # Another origin gets no CORS headers.
    response = call(server_a, "GET", "/info", {**bearer(), "Origin": "https://evil.example"})
    assert response.status_code == 200
    assert not [h for h in response.headers if h.lower().startswith("access-control-")]
    # A preflight carries no key: it is answered before the key is asked for.
    preflight = requests.options(
        server_a.url + "/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=10,
    )
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    # A preflight from an origin not allowed gets nothing to go on.
    refused = requests.options(
        server_a.url + "/generate",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert refused.status_code == 401 and "Access-Control-Allow-Origin" not in refused.headers
    # The browser can read a 401 (so the page can tell the user) and a stream.
    assert call(server_a, "GET", "/info", {"Origin": ORIGIN}).headers["Access-Control-Allow-Origin"] == ORIGIN
    stream = call(server_a, "POST", "/generate_stream", {**bearer(), "Origin": ORIGIN}, GENERATE)
    assert stream.status_code == 200 and stream.headers["Access-Control-Allow-Origin"] == ORIGIN
    print(f"preflight: {preflight.status_code} {dict(preflight.headers)}")


def test_cors_any_origin_never_with_credentials(server_b: Launched) -> None:
    for path, headers in (("/info", bearer()), ("/health", {}), ("/info", {})):
        response = call(server_b, "GET", path, {**headers, "Origin": "https://anywhere.example"})
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in response.headers
    preflight = requests.options(
        server_b.url + "/generate",
        headers={"Origin": "https://anywhere.example", "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert preflight.status_code == 204 and preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Credentials" not in preflight.headers
    print(f"'*': {preflight.headers['Access-Control-Allow-Origin']}, no credentials")


async def test_no_cors_headers_by_default() -> None:
    """The router's middlewares with the default configuration (no --cors-allow-origin, no key)."""
    config = RouterConfig(tokenizer_name="unused", model_id="unused")

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application(middlewares=middleware.middlewares(config), client_max_size=config.payload_limit)
    app.router.add_get("/info", info)
    app.router.add_post("/generate", info)
    async with test_utils.TestClient(test_utils.TestServer(app)) as client:
        response = await client.get("/info", headers={"Origin": ORIGIN})
        assert response.status == 200
        assert not [h for h in response.headers if h.lower().startswith("access-control-")]
        preflight = await client.options(
            "/generate", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
        )
        assert preflight.status == 405 and "Access-Control-Allow-Origin" not in preflight.headers
        assert (await preflight.json())["error_type"] == "http"
        print(f"default: GET {response.status} without CORS headers, preflight {preflight.status}")
