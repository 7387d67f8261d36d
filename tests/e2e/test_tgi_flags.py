"""TGI v0.9.4's own documented command lines, run for real on a tiny model (tests/unit/launcher/
test_tgi_flags.py checks every flag's declaration): each starts and serves, or is refused with a one-line
error naming its flag.

The lines come from TGI v0.9.4's README ("Get started": ``--model-id $model --num-shard $num_shard`` after
the Docker image, whose PORT environment variable sets the port; the Makefile's ``run-*`` targets with
``--port 8080``; ``--disable-custom-kernels`` for machines without its CUDA kernels; the issue template's
``--env``), TGI's ngrok flags and ``--quantize gptq`` (``--quantize bitsandbytes`` runs in
tests/e2e/test_quantize.py). ``$model`` is the tiny model's directory;
the port is a free one, and the hostname comes from HOSTNAME=127.0.0.1 (loopback), as the environment
variables of TGI's Docker image would set them."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import requests

from .harness import Launched, free_port, run_launcher

pytestmark = pytest.mark.timeout(300)


def serve_once(server: Launched) -> None:
    try:
        server.wait_healthy(120)
        response = requests.post(
            f"{server.url}/generate",
            json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}},
            timeout=60,
        )
        assert response.status_code == 200, response.text
    finally:
        code = server.stop(signal.SIGTERM)
    assert code == 0, server.log()[-3000:]
    assert server.leftovers() == []


@pytest.mark.parametrize(
    ("line", "port_in"),
    [
        ("--model-id $model --num-shard $num_shard", "env"),  # README, Docker (PORT set by the image)
        ("--model-id $model --port $port", "args"),  # Makefile run-* targets
        ("-p $port -e --model-id $model", "args"),  # short flags: the port, the environment
        ("--model-id $model --disable-custom-kernels", "env"),  # README: no custom kernels here
    ],
)
def test_documented_command_lines_serve(
    line: str, port_in: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    args = [
        {"$model": str(tiny_model_dir), "$num_shard": "1", "$port": str(port)}.get(word, word)
        for word in line.split()
    ]
    uds = str(tmp_path / "tgi")
    env = {
        "SHARD_UDS_PATH": uds,
        "HOSTNAME": "127.0.0.1",
        **({"PORT": str(port)} if port_in == "env" else {}),
    }
    server = Launched(args, env=env, port=port, uds=uds).start_as_written(tmp_path)
    serve_once(server)
    log = server.log()
    assert list(tmp_path.glob("tgi*")) == []  # the sockets' private directory is gone
    if "-e" in args:
        for row in ("Server version:", "Torch:", "CUDA available:", "nvidia-smi:"):
            assert row in log, row
    if "--disable-custom-kernels" in args:
        assert "Custom kernels off (--disable-custom-kernels)" in log


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--ngrok", "--ngrok-authtoken", "token", "--ngrok-edge", "edge"],
            {},
            "`--ngrok` is not supported: this server opens no tunnel",
        ),
        (
            [],
            {"NGROK": "true", "NGROK_AUTHTOKEN": "token", "NGROK_EDGE": "edge"},
            "`--ngrok` is not supported",
        ),
        (["--quantize", "gptq"], {}, "`--quantize gptq` is not supported"),
        (
            ["--tool-call-parser", "nope"],
            {},
            "`--tool-call-parser nope` is not a known parser. Known: auto, hermes",
        ),
    ],
)
def test_refusals_are_one_line_naming_the_flag(
    args: list[str], env: dict[str, str], message: str, tiny_model_dir: Path
) -> None:
    result = run_launcher("--model-id", str(tiny_model_dir), *args, env=env)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "token" not in errors[0].replace("authtoken", "")


def test_help_lists_the_short_flags() -> None:
    result = run_launcher("--help")
    assert result.returncode == 0
    assert "-p, --port" in result.stdout and "-e, --env" in result.stdout
