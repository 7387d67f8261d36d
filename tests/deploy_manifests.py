"""deploy/kubernetes's manifests as the tests read them: the documents, each pod template's server
container, and its command made runnable on loopback (tests/unit/deploy checks the manifests,
tests/e2e/test_deploy.py runs their commands)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MANIFESTS = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
# What LeaderWorkerSet gives every pod of a group (its leader's address, the group's size, the pod's index).
LWS_VARIABLES = ("LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX")
_REFERENCE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def documents() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every document of every manifest."""
    out = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        out.extend((path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None)
    return out


@dataclass(frozen=True)
class Pod:
    """One pod template of a workload: where it is, its role, its template (metadata and spec)."""

    file: str
    workload: str
    role: str  # "server" (a Deployment's), "leader" or "worker" (a LeaderWorkerSet's)
    template: dict[str, Any]

    @property
    def spec(self) -> dict[str, Any]:
        return self.template["spec"]

    @property
    def container(self) -> dict[str, Any]:
        (container,) = [c for c in self.spec["containers"] if c["name"] == "server"]
        return container

    @property
    def labels(self) -> dict[str, str]:
        return self.template["metadata"]["labels"]


def pods() -> list[Pod]:
    out = []
    for file, doc in documents():
        name = doc["metadata"]["name"]
        if doc["kind"] == "Deployment":
            out.append(Pod(file, name, "server", doc["spec"]["template"]))
        elif doc["kind"] == "LeaderWorkerSet":
            group = doc["spec"]["leaderWorkerTemplate"]
            out.append(Pod(file, name, "leader", group["leaderTemplate"]))
            out.append(Pod(file, name, "worker", group["workerTemplate"]))
    return out


def expand(value: str, variables: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion of a command's arguments (an unknown name stays as written)."""
    return _REFERENCE.sub(lambda m: variables.get(m.group(1), m.group(0)), value)


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's plain environment variables (those from secrets are left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def flag_value(args: list[str], flag: str) -> str | None:
    """The value after ``flag`` in a command's arguments (None when it is not there)."""
    return args[args.index(flag) + 1] if flag in args else None


def loopback_command(
    container: dict[str, Any], lws: dict[str, str], changes: dict[str, str], tmp: Path, model_dir: Path
) -> tuple[list[str], dict[str, str]]:
    """The container's command and environment, made to run here: ``$(VAR)``s expanded (with ``lws`` for
    LeaderWorkerSet's variables), the flags in ``changes`` given other values (ports, the loopback
    address), the volumes' paths (/data, /tmp) moved under ``tmp``, and the model the tiny one. Returns the
    arguments after the launcher's name and the environment to add."""
    env = {}
    for name, value in container_env(container).items():
        for mount in ("/data", "/tmp"):
            if value == mount or value.startswith(mount + "/"):
                value = str(tmp / mount.strip("/")) + value[len(mount) :]
        env[name] = value
    env["MODEL_ID"] = str(model_dir)
    assert container["command"] == ["text-generation-launcher"], container["command"]
    args = [expand(a, {**env, **lws}) for a in container["args"]]
    for flag, value in changes.items():
        if flag in args:
            args[args.index(flag) + 1] = value
    return args, env
