"""deploy/kubernetes: every manifest is valid against the Kubernetes API's schemas (kubernetes-validate,
offline), the LeaderWorkerSet against its API's shape with its pod templates as Kubernetes pod templates;
and what they say agrees with the server: their commands are launcher command lines that pass its rules,
the probes ask /health on the port the server listens on, the grace period covers the drain, nothing runs
as root. tests/e2e/test_deploy.py runs their commands."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest
import typer

from common.flags import values_to_fields
from launcher.cli import app
from launcher.config import LauncherConfig
from launcher.supervisor import ROUTER_EXIT_MARGIN_S, SHARD_GRACE_S
from tests.deploy_manifests import (
    LWS_VARIABLES,
    MANIFESTS,
    Pod,
    container_env,
    documents,
    expand,
    flag_value,
    pods,
)

# The oldest Kubernetes these manifests are meant for, and the newest whose schemas the validator has.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# The part of the LeaderWorkerSet API (leaderworkerset.x-k8s.io/v1) these manifests use; a field it does not
# have (a typo) is refused. Its pod templates are checked as Kubernetes pod templates.
LWS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"},
        "kind": {"const": "LeaderWorkerSet"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["leaderWorkerTemplate"],
            "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "leaderWorkerTemplate": {
                    "type": "object",
                    "required": ["workerTemplate"],
                    "additionalProperties": False,
                    "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "None"]},
                        "leaderTemplate": {"type": "object"},
                        "workerTemplate": {"type": "object"},
                    },
                },
            },
        },
    },
}
MIN_STARTUP_S = 20 * 60  # loading (and a first download) of a large model


def builtin_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(f, d) for f, d in documents() if d["kind"] != "LeaderWorkerSet"]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_for_kubernetes(version: str) -> None:
    files = {f for f, _ in documents()}
    assert files == {"cpu.yaml", "gpu.yaml", "replicas.yaml", "multinode.yaml"}
    for _, doc in builtin_documents():
        kubernetes_validate.validate(doc, version, strict=True)  # raises, naming the field
    for pod in pods():  # the LeaderWorkerSet's pod templates too
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "t"},
            "template": pod.template,
        }
        kubernetes_validate.validate(template, version, strict=True)


def test_the_validators_refuse_a_wrong_field() -> None:
    """The checks above can fail: a misspelt probe, or a misspelt LeaderWorkerSet field, is refused."""
    deployment = copy.deepcopy(
        next(d for f, d in documents() if f == "cpu.yaml" and d["kind"] == "Deployment")
    )
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinessProb"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)
    lws = copy.deepcopy(next(d for _, d in documents() if d["kind"] == "LeaderWorkerSet"))
    lws["spec"]["leaderWorkerTemplate"]["sizes"] = 2
    with pytest.raises(jsonschema.ValidationError, match="sizes"):
        jsonschema.validate(lws, LWS_SCHEMA)


def test_the_leader_worker_set_has_its_api_shape() -> None:
    (lws,) = [d for _, d in documents() if d["kind"] == "LeaderWorkerSet"]
    jsonschema.validate(lws, LWS_SCHEMA)
    group = lws["spec"]["leaderWorkerTemplate"]
    assert group["size"] == 2 and group["restartPolicy"] == "RecreateGroupOnPodRestart"


def command() -> click.Command:
    return typer.main.get_command(app)


def launcher_config(pod: Pod, lws_index: int = 0) -> LauncherConfig:
    """The config the pod's command makes, with its environment and LeaderWorkerSet's variables."""
    container = pod.container
    assert container["command"] == ["text-generation-launcher"]
    lws = {"LWS_LEADER_ADDRESS": "tgi-multinode-0.tgi-multinode", "LWS_GROUP_SIZE": "2",
           "LWS_WORKER_INDEX": str(lws_index)}  # fmt: skip
    args = [expand(a, {**container_env(container), **lws}) for a in container["args"]]
    assert not any("$(" in a for a in args), args  # every reference is one the pod has
    with pytest.MonkeyPatch.context() as env:
        for name, value in container_env(container).items():
            env.setenv(name, value)
        ctx = command().make_context("text-generation-launcher", args)
    values = dict(ctx.params)
    values.pop("list_plugins")
    return LauncherConfig(**values_to_fields(LauncherConfig, values))


@pytest.mark.parametrize("pod", pods(), ids=lambda p: f"{p.file}:{p.role}")
def test_each_command_is_a_launcher_command_line_its_rules_accept(pod: Pod) -> None:
    config = launcher_config(pod, lws_index=1 if pod.role == "worker" else 0)
    config.validate()
    assert config.json_output
    assert config.huggingface_hub_cache == Path("/data/hub")  # on the cache volume
    mounts = {m["mountPath"]: m["name"] for m in pod.container["volumeMounts"]}
    assert mounts["/data"] == "cache" and "/tmp" in mounts  # the weights; the private socket directory
    if pod.role == "worker":
        return
    assert config.hostname == "0.0.0.0"
    (port,) = [p for p in pod.container["ports"] if p["name"] == "http"]
    assert port["containerPort"] == config.port


@pytest.mark.parametrize("pod", [p for p in pods() if p.role != "worker"], ids=lambda p: p.file)
def test_probes_ask_health_on_the_servers_port_and_wait_for_loading(pod: Pod) -> None:
    container = pod.container
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == ("/health", "http"), probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= MIN_STARTUP_S
    # Readiness drops a draining server at once (its /health answers 503 from SIGTERM on).
    assert (
        container["readinessProbe"]["failureThreshold"] * container["readinessProbe"]["periodSeconds"] <= 10
    )


@pytest.mark.parametrize("pod", pods(), ids=lambda p: f"{p.file}:{p.role}")
def test_the_grace_period_covers_the_drain(pod: Pod) -> None:
    """Kubernetes sends SIGTERM, then SIGKILL after terminationGracePeriodSeconds: by then the router has
    drained (--graceful-termination-timeout) and exited, and the shards have stopped."""
    grace = pod.spec["terminationGracePeriodSeconds"]
    if pod.role != "worker":
        config = launcher_config(pod)
        assert grace >= config.graceful_termination_timeout + ROUTER_EXIT_MARGIN_S + SHARD_GRACE_S
        return
    # A worker has no router, but its ranks serve the leader's drain: its SIGTERM waits that long (preStop).
    (leader,) = [p for p in pods() if p.workload == pod.workload and p.role == "leader"]
    drain = launcher_config(leader).graceful_termination_timeout + ROUTER_EXIT_MARGIN_S
    sleep, seconds = pod.container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep == "sleep" and int(seconds) >= drain and grace >= int(seconds) + SHARD_GRACE_S


@pytest.mark.parametrize("pod", pods(), ids=lambda p: f"{p.file}:{p.role}")
def test_nothing_runs_as_root(pod: Pod) -> None:
    context = pod.spec["securityContext"]
    assert context["runAsNonRoot"] and context["runAsUser"] != 0
    container = pod.container["securityContext"]
    assert container["allowPrivilegeEscalation"] is False and container["capabilities"]["drop"] == ["ALL"]
    assert container["readOnlyRootFilesystem"] is True


def test_gpu_pods_ask_for_as_many_gpus_as_they_run_shards() -> None:
    for pod in pods():
        gpus = pod.container["resources"].get("limits", {}).get("nvidia.com/gpu")
        if pod.file == "cpu.yaml":
            assert gpus is None
            continue
        assert gpus == launcher_config(pod).num_shard, pod.file
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod.spec["volumes"])  # /dev/shm


def test_services_reach_the_servers_http_port() -> None:
    for file, doc in builtin_documents():
        if doc["kind"] != "Service":
            continue
        selected = [
            p for p in pods() if p.file == file and doc["spec"]["selector"].items() <= p.labels.items()
        ]
        assert [p.role for p in selected] in (["server"], ["leader"]), (file, selected)  # never a worker
        assert doc["spec"]["ports"][0]["targetPort"] == "http"


def test_multi_node_ranks_come_from_leader_worker_set() -> None:
    leader, worker = sorted((p for p in pods() if p.file == "multinode.yaml"), key=lambda p: p.role)
    for pod in (leader, worker):
        args = pod.container["args"]
        assert flag_value(args, "--master-addr") == "$(LWS_LEADER_ADDRESS)"
        assert flag_value(args, "--nnodes") == "$(LWS_GROUP_SIZE)"
    assert flag_value(leader.container["args"], "--node-rank") == "0"
    assert flag_value(worker.container["args"], "--node-rank") == "$(LWS_WORKER_INDEX)"
    lead, work = launcher_config(leader), launcher_config(worker, lws_index=1)
    assert (lead.node_rank, work.node_rank, lead.nnodes, work.nnodes) == (0, 1, 2, 2)
    assert lead.master_addr == work.master_addr == "tgi-multinode-0.tgi-multinode"
    for name in ("model_id", "num_shard", "master_port", "huggingface_hub_cache"):
        assert getattr(lead, name) == getattr(work, name), name
    # Only LeaderWorkerSet's own variables are referenced.
    references = {
        m for a in leader.container["args"] + worker.container["args"] for m in re.findall(r"\$\((\w+)\)", a)
    }
    assert references <= set(LWS_VARIABLES)


def test_the_dockerfile_builds_cpu_or_cuda_images_that_run_as_a_user_with_a_health_check() -> None:
    text = (MANIFESTS.parents[1] / "Dockerfile").read_text()
    assert re.search(r"^ARG DEVICE=cuda$", text, re.M)
    assert "cpu) pip install" in text and "cuda) pip install" in text and "DEVICE must be cpu or cuda" in text
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and not user[-1].startswith(("0", "root"))
    health = re.search(r"^HEALTHCHECK .*\n(?:.*\\\n)*.*CMD .*/health", text, re.M)
    assert health, "no HEALTHCHECK on /health"
