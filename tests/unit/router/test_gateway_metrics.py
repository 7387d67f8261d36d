"""The gateway's metrics (the Gateway API Inference Extension's model-server protocol, under vLLM's names):
what each step's output sets them to (tests/e2e/test_gateway_metrics.py reads them under load)."""

from __future__ import annotations

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proto import pb
from router.metrics import Metrics


def samples(metrics: Metrics) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def value(metrics: Metrics, name: str) -> float:
    (labels, v), *rest = samples(metrics)[name]
    assert not rest and labels == {"model_name": "org/model"}, (name, labels, rest)
    return v


def test_before_any_step_nothing_waits_or_runs_and_no_adapter_is_loaded() -> None:
    started = time.time()
    metrics = Metrics(16, 32, "org/model")
    for name in ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc"):  # fmt: skip
        assert value(metrics, name) == 0.0, name
    (labels, stamp), *rest = samples(metrics)["vllm:lora_requests_info"]
    assert not rest
    assert labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "0"}
    assert started - 1 <= stamp <= time.time() + 1


def test_a_paged_step_reports_its_queue_and_its_kv_pool() -> None:
    metrics = Metrics(16, 32, "org/model")
    metrics.token_budget = 1000
    out = pb.StepOutput(waiting=3, running=5, max_tokens=900)
    out.cache.CopyFrom(pb.CacheStats(tokens_total=512, tokens_used=128))
    before = samples(metrics)["vllm:lora_requests_info"][0][1]
    time.sleep(0.01)
    metrics.observe_gateway(out)
    assert value(metrics, "vllm:num_requests_waiting") == 3
    assert value(metrics, "vllm:num_requests_running") == 5
    # The pool's share in use, whatever the token budget says.
    assert value(metrics, "vllm:kv_cache_usage_perc") == pytest.approx(0.25)
    assert value(metrics, "vllm:gpu_cache_usage_perc") == pytest.approx(0.25)
    assert samples(metrics)["vllm:lora_requests_info"][0][1] > before  # the time of the last update
    metrics.observe_gateway(pb.StepOutput(waiting=0, running=0, cache=pb.CacheStats(tokens_total=512)))
    assert [value(metrics, n) for n in ("vllm:num_requests_waiting", "vllm:num_requests_running",
                                         "vllm:kv_cache_usage_perc")] == [0, 0, 0]  # fmt: skip


def test_a_backend_without_a_kv_pool_reports_the_token_budget_it_fills() -> None:
    """transformers and ct2 admit by TGI's token budget: what the live requests reserve of it."""
    metrics = Metrics(16, 32, "org/model")
    metrics.token_budget = 1000
    metrics.observe_gateway(pb.StepOutput(waiting=1, running=2, max_tokens=250))
    assert value(metrics, "vllm:kv_cache_usage_perc") == pytest.approx(0.25)
    metrics.observe_gateway(pb.StepOutput(waiting=9, running=2, max_tokens=4000))  # waiting ones count too
    assert value(metrics, "vllm:kv_cache_usage_perc") == 1.0


def test_lora_requests_info_names_the_running_and_waiting_adapters() -> None:
    """One series, relabelled each step: the adapters of the running and of the waiting requests
    (comma-separated), and the adapters the shards hold as max_lora."""
    metrics = Metrics(16, 32, "org/model", max_lora=3)
    metrics.observe_gateway(
        pb.StepOutput(running=3, waiting=1, running_adapters=["sql", "fr"], waiting_adapters=["de"])
    )
    (labels, _), *rest = samples(metrics)["vllm:lora_requests_info"]
    assert not rest
    assert labels == {"running_lora_adapters": "sql,fr", "waiting_lora_adapters": "de", "max_lora": "3"}
    out = pb.StepOutput()
    out.cache.CopyFrom(pb.CacheStats(lora_loads=7, lora_evictions=5))
    metrics.observe_cache(out.cache)
    assert samples(metrics)["tgi_lora_loads"] == [({}, 7.0)] and samples(metrics)["tgi_lora_evictions"] == [
        ({}, 5.0)
    ]
    metrics.lora_requests.labels("sql").inc()
    assert samples(metrics)["tgi_lora_requests_total"] == [({"adapter": "sql"}, 1.0)]
    metrics.observe_gateway(pb.StepOutput(running=1, running_adapters=["fr"]))
    (labels, _), *rest = samples(metrics)["vllm:lora_requests_info"]
    assert not rest and labels == {
        "running_lora_adapters": "fr",
        "waiting_lora_adapters": "",
        "max_lora": "3",
    }
