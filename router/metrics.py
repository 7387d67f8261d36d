"""Prometheus metrics with TGI's ``tgi_*`` names, in a registry of the router's own; beside them, what the
Kubernetes Gateway API Inference Extension's endpoint picker reads (its model-server protocol), under the
names its default configuration expects: vLLM's (docs/deployment.md, Gateway metrics)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The endpoint picker's default metric names (its flags --total-queued-requests-metric,
# --total-running-requests-metric, --kv-cache-usage-percentage-metric, --lora-info-metric); the KV cache's
# older name is the default of the pickers released before vLLM renamed it.
GATEWAY_WAITING = "vllm:num_requests_waiting"
GATEWAY_RUNNING = "vllm:num_requests_running"
GATEWAY_KV_CACHE = "vllm:kv_cache_usage_perc"
GATEWAY_KV_CACHE_OLD = "vllm:gpu_cache_usage_perc"
GATEWAY_LORA = "vllm:lora_requests_info"

DURATION_BUCKETS = tuple(1.5e-4 * 1.5**i for i in range(35))


def _linear(maximum: int, count: int = 100) -> tuple[float, ...]:
    step = max(maximum / count, 1.0)
    return tuple(step * (i + 1) for i in range(count))


class Metrics:
    def __init__(
        self, max_input_length: int, max_total_tokens: int, model_name: str, max_lora: int = 0
    ) -> None:
        """``max_lora``: the most LoRA adapters the shards hold on the device at once (--max-loras, else
        every adapter loaded)."""
        r = self.registry = CollectorRegistry()
        self.request_count = Counter("tgi_request_count", "Requests received", registry=r)
        self.request_success = Counter("tgi_request_success", "Requests that succeeded", registry=r)
        self.request_failure = Counter("tgi_request_failure", "Requests that failed", ["err"], registry=r)
        self.request_duration = Histogram(
            "tgi_request_duration", "End-to-end request seconds", buckets=DURATION_BUCKETS, registry=r
        )
        self.request_validation_duration = Histogram(
            "tgi_request_validation_duration", "Validation seconds", buckets=DURATION_BUCKETS, registry=r
        )
        self.request_queue_duration = Histogram(
            "tgi_request_queue_duration", "Seconds waiting in the queue", buckets=DURATION_BUCKETS, registry=r
        )
        self.request_inference_duration = Histogram(
            "tgi_request_inference_duration",
            "Seconds from batching to end",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.request_mean_time_per_token_duration = Histogram(
            "tgi_request_mean_time_per_token_duration",
            "Mean seconds per generated token",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.request_generated_tokens = Histogram(
            "tgi_request_generated_tokens", "Generated tokens", buckets=_linear(max_total_tokens), registry=r
        )
        self.request_input_length = Histogram(
            "tgi_request_input_length", "Prompt tokens", buckets=_linear(max_input_length), registry=r
        )
        self.request_max_new_tokens = Histogram(
            "tgi_request_max_new_tokens",
            "Requested max_new_tokens",
            buckets=_linear(max_total_tokens),
            registry=r,
        )
        self.batch_inference_count = Counter(
            "tgi_batch_inference_count", "Batch steps", ["method"], registry=r
        )
        self.batch_inference_success = Counter(
            "tgi_batch_inference_success", "Batch steps that succeeded", ["method"], registry=r
        )
        self.batch_inference_failure = Counter(
            "tgi_batch_inference_failure", "Batch steps that failed", ["method"], registry=r
        )
        self.batch_inference_duration = Histogram(
            "tgi_batch_inference_duration",
            "Shard seconds per step (admission, the engine's step, endings)",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.batch_forward_duration = Histogram(
            "tgi_batch_forward_duration",
            "Seconds of the engine's step (forward and sampling) within tgi_batch_inference_duration",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.batch_next_size = Histogram(
            "tgi_batch_next_size",
            "Requests handed to the engine in a step",
            buckets=tuple(range(1, 1025)),
            registry=r,
        )
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting", registry=r)
        self.batch_current_size = Gauge("tgi_batch_current_size", "Requests in the running batch", registry=r)
        self.batch_current_max_tokens = Gauge(
            "tgi_batch_current_max_tokens",
            "Tokens the running requests may grow to (prompt + max_new_tokens each)",
            registry=r,
        )
        # Reported by backends with a paged KV cache after every step.
        self.kv_cache_tokens = Gauge("tgi_kv_cache_tokens", "KV cache size in tokens", registry=r)
        self.kv_cache_preemptions = Gauge(
            "tgi_kv_cache_preemptions",
            "Running sequences preempted (blocks freed, tokens recomputed later) since start",
            registry=r,
        )
        self.kv_cache_used_tokens = Gauge("tgi_kv_cache_used_tokens", "KV cache tokens in use", registry=r)
        self.prefix_cache_queries = Gauge(
            "tgi_prefix_cache_queries", "Prompt blocks looked up in the prefix cache", registry=r
        )
        self.prefix_cache_hits = Gauge(
            "tgi_prefix_cache_hits", "Prompt blocks found in the prefix cache", registry=r
        )
        self.speculative_drafted = Gauge(
            "tgi_speculative_drafted_tokens",
            "Draft tokens fed to the model (speculative decoding)",
            registry=r,
        )
        self.speculative_accepted = Gauge(
            "tgi_speculative_accepted_tokens",
            "Draft tokens the model accepted (speculative decoding)",
            registry=r,
        )
        # --max-loras: adapters copied to the device and evicted from it (least recently used), since start.
        self.lora_loads, self.lora_evictions = (
            Gauge(f"tgi_lora_{what}", f"LoRA adapters {done} since start (--max-loras)", registry=r)
            for what, done in (("loads", "copied to the device"), ("evictions", "evicted from the device"))
        )

        # The gateway's metrics (model-server protocol), after every step. ``token_budget`` is the
        # running batch's token budget (--max-batch-total-tokens, or what warm-up found): the KV cache
        # utilisation of backends that report no KV pool of their own.
        self.token_budget = 0
        labels = ["model_name"]
        self.gateway_waiting = Gauge(
            GATEWAY_WAITING, "Requests waiting to run (the shard's queue)", labels, registry=r
        ).labels(model_name)
        self.gateway_running = Gauge(
            GATEWAY_RUNNING, "Requests running (in the engine's batch)", labels, registry=r
        ).labels(model_name)
        self.gateway_kv_cache = Gauge(
            GATEWAY_KV_CACHE,
            "Fraction of the KV cache in use, 0 to 1 (backends without a KV pool: the share of the token "
            "budget the live requests reserve)",
            labels,
            registry=r,
        ).labels(model_name)
        self.gateway_kv_cache_old = Gauge(
            GATEWAY_KV_CACHE_OLD, f"The same as {GATEWAY_KV_CACHE} (its older name)", labels, registry=r
        ).labels(model_name)
        self.max_lora = max_lora
        # Sequences submitted per LoRA adapter (labels: the adapters the shards hold, a bounded set).
        self.lora_requests = Counter(
            "tgi_lora_requests", "Sequences submitted per LoRA adapter", ["adapter"], registry=r
        )
        self.gateway_lora_info = Gauge(
            GATEWAY_LORA,
            "LoRA adapters of the running and of the waiting requests (comma-separated), and how many can "
            "be loaded; the value is the time of the last update",
            ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
            registry=r,
        )
        self.observe_lora([], [])
        for gauge in (
            self.gateway_waiting,
            self.gateway_running,
            self.gateway_kv_cache,
            self.gateway_kv_cache_old,
        ):
            gauge.set(0)

    def observe_gateway(self, out) -> None:
        """Copies a step's proto StepOutput (its waiting and running requests, its KV cache) into the
        gateway's gauges."""
        self.gateway_waiting.set(out.waiting)
        self.gateway_running.set(out.running)
        cache = out.cache if out.HasField("cache") else None
        if cache is not None and cache.tokens_total:
            usage = cache.tokens_used / cache.tokens_total
        else:  # the engines that admit by TGI's token budget (transformers, ct2) report no KV pool
            usage = out.max_tokens / self.token_budget if self.token_budget else 0.0
        usage = min(usage, 1.0)
        self.gateway_kv_cache.set(usage)
        self.gateway_kv_cache_old.set(usage)
        self.observe_lora(list(out.running_adapters), list(out.waiting_adapters))

    def observe_lora(self, running: list[str], waiting: list[str]) -> None:
        """The gateway's one ``lora_requests_info`` series: the adapters running and waiting now."""
        self.gateway_lora_info.clear()
        labels = (",".join(running), ",".join(waiting), str(self.max_lora))
        self.gateway_lora_info.labels(*labels).set(time.time())

    def observe_cache(self, cache) -> None:
        """Copies a step's proto CacheStats into the gauges."""
        self.kv_cache_tokens.set(cache.tokens_total)
        self.kv_cache_preemptions.set(cache.preemptions)
        self.kv_cache_used_tokens.set(cache.tokens_used)
        self.prefix_cache_queries.set(cache.prefix_queries)
        self.prefix_cache_hits.set(cache.prefix_hits)
        self.speculative_drafted.set(cache.speculative_drafted)
        self.speculative_accepted.set(cache.speculative_accepted)
        self.lora_loads.set(cache.lora_loads)
        self.lora_evictions.set(cache.lora_evictions)

    def render(self) -> bytes:
        return generate_latest(self.registry)
