"""Plugins end to end: the example plugin (examples/ban-word-plugin) installed into this virtualenv with
pip, listed, enabled with --plugin on the default model, then uninstalled; a missing plugin stops the
start with an error naming it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .conftest import DEFAULT_MODEL_START_TIMEOUT_S, stop_and_check
from .harness import FLOAT32, REPO, Launched

pytestmark = pytest.mark.timeout(900)

PLUGIN_DIR = REPO / "examples" / "ban-word-plugin"
DISTRIBUTION = "tgi-ban-word-plugin"
WORD = "Paris"
ENV = {"BAN_WORD": WORD}
# Greedy answers of the default model that say the word (see the baseline test).
PROMPTS = ["What is the capital of France?", "Tell me about Paris.", "Where is the Eiffel Tower?"]


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def run_launcher(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launcher", *args],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **ENV},
        capture_output=True,
        text=True,
        timeout=180,
    )


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def installed() -> bool:
    return (
        subprocess.run(
            [sys.executable, "-m", "pip", "show", "-q", DISTRIBUTION], capture_output=True, timeout=120
        ).returncode
        == 0
    )


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The example plugin installed in this virtualenv for the module's tests; always uninstalled after.
    It is built from a copy of its folder, so that the build leaves nothing in the repository."""
    assert not installed(), f"{DISTRIBUTION} is already installed: uninstall it first"
    source = tmp_path_factory.mktemp("plugin") / PLUGIN_DIR.name
    shutil.copytree(PLUGIN_DIR, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    try:
        pip("install", "-q", "--no-deps", "--no-build-isolation", "--no-index", str(source))
        assert installed()
        yield
    finally:
        if installed():
            pip("uninstall", "-y", "-q", DISTRIBUTION)


@pytest.fixture(scope="module")
def uninstalled(plugin: None) -> None:
    """The plugin installed once (by ``plugin``) and uninstalled again."""
    pip("uninstall", "-y", "-q", DISTRIBUTION)
    assert not installed()


def generate(server: Launched, inputs: str, **parameters: object) -> str:
    response = requests.post(
        f"{server.url}/generate", json={"inputs": inputs, "parameters": parameters}, timeout=300
    )
    assert response.status_code == 200, response.text
    return response.json()["generated_text"]


def chat_completion(server: Launched, text: str) -> str:
    response = requests.post(
        f"{server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": text}], "temperature": 0, "max_tokens": 40},
        timeout=300,
    )
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def tokens_containing(model_dir: Path, word: str) -> int:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    return sum(word.lower() in tokenizer.decode([i], skip_special_tokens=False).lower() for i in range(size))


def test_list_plugins_shows_the_builtins_and_the_installed_plugin(plugin: None) -> None:
    result = run_launcher("--list-plugins")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    by_key = {(row[0], row[1]): " ".join(row[2:]) for row in rows if len(row) >= 3}
    for group, name in [("logits_processors", "ban-word"), ("router_extensions", "ban-word")]:
        assert by_key[(group, name)].startswith(f"{DISTRIBUTION} 0.1.0"), result.stdout
        assert "optional (--plugin)" in by_key[(group, name)]
    for group, name in [
        ("logits_processors", "watermark"),
        ("backends", "paged"),
        ("backends", "transformers"),
    ]:
        assert by_key[(group, name)].startswith("text-generation-server"), result.stdout
        assert by_key[(group, name)].endswith("built-in"), result.stdout
    assert "grammar" in result.stdout
    enabled = run_launcher("--list-plugins", "--plugin", "ban-word")
    assert enabled.returncode == 0, enabled.stderr
    assert "ban-word" in enabled.stdout and "enabled" in enabled.stdout


def test_an_unknown_plugin_stops_the_start_with_its_name(plugin: None) -> None:
    result = run_launcher("--plugin", "no-such-plugin")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "no-such-plugin" in errors[0], result.stderr
    assert "ban-word" in errors[0]  # what could have been meant


def test_the_banned_word_is_never_generated(
    plugin: None, default_server: Launched, default_model_dir: Path, test_cache: Path, tmp_path: Path
) -> None:
    # Without the plugin, the default model's greedy answers say the word.
    baseline = {text: generate(default_server, chat(text), max_new_tokens=40) for text in PROMPTS}
    assert all(WORD in answer for answer in baseline.values()), baseline
    assert requests.get(f"{default_server.url}/ban-word", timeout=10).status_code == 404

    server = Launched(  # in default_server's dtype: the two servers' tokens are compared
        ["--huggingface-hub-cache", str(test_cache / "hub"), "--plugin", "ban-word", *FLOAT32], env=ENV
    )
    server.start(tmp_path)
    try:
        server.wait_healthy(DEFAULT_MODEL_START_TIMEOUT_S)
        for text in PROMPTS:
            answer = generate(server, chat(text), max_new_tokens=40)
            assert WORD.lower() not in answer.lower(), (text, answer)
            assert answer != baseline[text]
            assert answer.strip()  # it still answers something
            assert WORD.lower() not in chat_completion(server, text).lower()
        # Sampling cannot spell it either, token by token.
        for seed in range(4):
            answer = generate(
                server, chat(PROMPTS[1]), max_new_tokens=40, do_sample=True, temperature=1.2, seed=seed
            )
            assert WORD.lower() not in answer.lower(), (seed, answer)
        # Other prompts are not touched.
        plain = "The three primary colors are"
        expected = generate(default_server, plain, max_new_tokens=20)
        assert generate(server, plain, max_new_tokens=20) == expected

        response = requests.get(f"{server.url}/ban-word", timeout=10)
        assert response.status_code == 200, response.text
        assert response.json() == {"word": WORD, "banned_tokens": tokens_containing(default_model_dir, WORD)}
        assert response.json()["banned_tokens"] > 0
        assert "Plugin ban-word" in server.log()
    finally:
        stop_and_check(server)


def test_after_uninstalling_the_server_runs_and_the_plugin_is_refused(
    uninstalled: None, test_cache: Path, tmp_path: Path
) -> None:
    listed = run_launcher("--list-plugins")
    assert listed.returncode == 0 and "ban-word" not in listed.stdout
    assert "watermark" in listed.stdout

    refused = run_launcher("--plugin", "ban-word")
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "ban-word" in errors[0], refused.stderr

    server = Launched(["--huggingface-hub-cache", str(test_cache / "hub")], env=ENV)
    server.start(tmp_path)
    try:
        server.wait_healthy(DEFAULT_MODEL_START_TIMEOUT_S)
        assert WORD in generate(server, chat(PROMPTS[0]), max_new_tokens=20)
        assert requests.get(f"{server.url}/ban-word", timeout=10).status_code == 404
    finally:
        stop_and_check(server)
