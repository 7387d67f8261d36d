"""deploy/kubernetes's container commands, started for real on loopback (tests/unit/deploy checks the
manifests themselves): each distinct server command serves, answers its probes' /health and a request,
drains on SIGTERM and leaves nothing behind; the LeaderWorkerSet's leader and worker commands form one
server of two nodes, as LeaderWorkerSet's variables make them.

What changes to run them here, and only that: the model is the tiny one (MODEL_ID); the HTTP port, the
master port and the listening address (--port, --master-port, --hostname 127.0.0.1) are free ones on
loopback; the volumes' paths (/data, /tmp) lie under the test's directory; LWS_LEADER_ADDRESS is
127.0.0.1; --num-shard is 1 (each node here is one CPU process)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import requests

from tests.deploy_manifests import Pod, loopback_command, pods

from .harness import Launched, free_port

pytestmark = pytest.mark.timeout(300)


def distinct_servers() -> list[Pod]:
    """One pod of each distinct server command (the GPU replicas run the single GPU pod's command)."""
    seen, out = set(), []
    for pod in pods():
        key = (tuple(pod.container["command"]), tuple(pod.container["args"]))
        if pod.role == "server" and key not in seen:
            seen.add(key)
            out.append(pod)
    return out


def started(pod: Pod, tmp: Path, model_dir: Path, lws: dict[str, str], changes: dict[str, str]) -> Launched:
    args, env = loopback_command(pod.container, lws, changes, tmp, model_dir)
    uds = str(tmp / "tgi")
    port = int(changes.get("--port", "0")) or free_port()
    return Launched(args, env={**env, "SHARD_UDS_PATH": uds}, port=port, uds=uds).start_as_written(tmp)


def health_path(pod: Pod) -> str:
    return pod.container["startupProbe"]["httpGet"]["path"]


def generate(server: Launched) -> None:
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4}}
    response = requests.post(f"{server.url}/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text


def stopped(server: Launched, tmp: Path) -> None:
    assert server.stop(signal.SIGTERM) == 0, server.log()[-3000:]
    assert server.leftovers() == []
    assert not list(tmp.glob("tgi*")), "the private socket directory outlived the launcher"


@pytest.mark.parametrize("pod", distinct_servers(), ids=lambda p: p.file)
def test_the_server_command_serves_on_loopback(pod: Pod, tiny_model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    server = started(pod, tmp_path, tiny_model_dir, {}, {"--port": str(port), "--hostname": "127.0.0.1"})
    try:
        server.wait_healthy(120)
        assert requests.get(f"{server.url}{health_path(pod)}", timeout=10).status_code == 200
        generate(server)
    finally:
        stopped(server, tmp_path)


def test_the_leader_worker_set_commands_serve_as_one_server(tiny_model_dir: Path, tmp_path: Path) -> None:
    leader, worker = sorted((p for p in pods() if p.role in ("leader", "worker")), key=lambda p: p.role)
    port, master_port = free_port(), free_port()
    changes = {
        "--port": str(port),
        "--hostname": "127.0.0.1",
        "--master-port": str(master_port),
        "--num-shard": "1",
    }
    lws = {"LWS_LEADER_ADDRESS": "127.0.0.1", "LWS_GROUP_SIZE": "2"}
    (tmp_path / "leader").mkdir()
    (tmp_path / "worker").mkdir()
    node0 = started(leader, tmp_path / "leader", tiny_model_dir, {**lws, "LWS_WORKER_INDEX": "0"}, changes)
    node1 = started(worker, tmp_path / "worker", tiny_model_dir, {**lws, "LWS_WORKER_INDEX": "1"}, changes)
    try:
        node0.wait_healthy(180)
        assert requests.get(f"{node0.url}/info", timeout=10).json()["num_shard"] == 2  # both nodes' ranks
        generate(node0)
        assert "Node 1 of 2 serving ranks [1]" in node1.log()
    finally:
        # Kubernetes stops the group: the leader drains and stops the worker's ranks; the worker exits 0.
        stopped(node0, tmp_path / "leader")
        assert node1.wait_exit(60) == 0, node1.log()[-3000:]
        assert node1.leftovers() == []
