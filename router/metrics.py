"""Prometheus metrics with TGI's ``tgi_*`` names, in a registry of the router's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

DURATION_BUCKETS = tuple(1.5e-4 * 1.5**i for i in range(35))


def _linear(maximum: int, count: int = 100) -> tuple[float, ...]:
    step = max(maximum / count, 1.0)
    return tuple(step * (i + 1) for i in range(count))


class Metrics:
    def __init__(self, max_input_length: int, max_total_tokens: int) -> None:
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

    def observe_cache(self, cache) -> None:
        """Copies a step's proto CacheStats into the gauges."""
        self.kv_cache_tokens.set(cache.tokens_total)
        self.kv_cache_preemptions.set(cache.preemptions)
        self.kv_cache_used_tokens.set(cache.tokens_used)
        self.prefix_cache_queries.set(cache.prefix_queries)
        self.prefix_cache_hits.set(cache.prefix_hits)
        self.speculative_drafted.set(cache.speculative_drafted)
        self.speculative_accepted.set(cache.speculative_accepted)

    def render(self) -> bytes:
        return generate_latest(self.registry)
