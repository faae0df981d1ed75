"""Prometheus metrics, one registry per `Metrics` object.

The engine and the HTTP layer share one instance (created in `create_app`) and report through
its small methods; nothing here is module-global, so several apps (tests) never collide.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Generation on CPU takes seconds to minutes, on GPU milliseconds to seconds.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(
            "fasb_requests", "HTTP requests answered", ["endpoint", "status"], registry=reg
        )
        self.prompt_tokens = Counter("fasb_prompt_tokens", "Prompt tokens processed", registry=reg)
        self.generation_tokens = Counter(
            "fasb_generation_tokens", "Tokens generated, kept or not", registry=reg
        )
        self.discarded_tokens = Counter(
            "fasb_discarded_tokens", "Generated tokens thrown away by backtracking", registry=reg
        )
        self.steering_checks = Counter("fasb_steering_checks", "FASB probe checks made", registry=reg)
        self.steering_backtracks = Counter("fasb_steering_backtracks", "FASB backtracks made", registry=reg)
        self.retracted_tokens = Counter(
            "fasb_retracted_tokens", "Tokens dropped by FASB backtracks", registry=reg
        )
        self.request_latency = Histogram(
            "fasb_request_latency_seconds", "Time from request to last byte", buckets=_LATENCY_BUCKETS, registry=reg
        )
        self.time_to_first_token = Histogram(
            "fasb_time_to_first_token_seconds", "Time from request to first streamed text", buckets=_TTFT_BUCKETS,
            registry=reg,
        )
        self.prefix_cache_hit_tokens = Counter(
            "fasb_prefix_cache_hit_tokens",
            "Prompt tokens read from the prefix cache (hit rate: over fasb_prompt_tokens)",
            registry=reg,
        )
        self.prefix_cache_blocks = Gauge("fasb_prefix_cache_blocks", "Prefix cache blocks in use", registry=reg)
        self.prefix_cache_capacity = Gauge(
            "fasb_prefix_cache_capacity_blocks", "Prefix cache blocks the memory budget holds", registry=reg
        )
        self.prefix_cache_evicted = Counter(
            "fasb_prefix_cache_evicted_blocks", "Prefix cache blocks dropped to make room (least recently used)",
            registry=reg,
        )
        self._evicted_seen = 0
        self.kv_cache_bytes = Gauge("fasb_kv_cache_bytes", "Bytes the runner's KV cache holds", registry=reg)
        self.queue_waiting = Gauge("fasb_queue_waiting", "Requests waiting for a batch slot", registry=reg)
        self.queue_running = Gauge("fasb_queue_running", "Requests being decoded", registry=reg)

    # -- engine side
    def observe_tokens(self, prompt: int = 0, generated: int = 0, discarded: int = 0, cached: int = 0) -> None:
        self.prompt_tokens.inc(prompt)
        self.prefix_cache_hit_tokens.inc(cached)
        self.generation_tokens.inc(generated)
        self.discarded_tokens.inc(discarded)

    def observe_check(self, n: int = 1) -> None:
        self.steering_checks.inc(n)

    def observe_backtrack(self, retracted_tokens: int) -> None:
        self.steering_backtracks.inc()
        self.retracted_tokens.inc(retracted_tokens)

    def set_queue(self, waiting: int, running: int) -> None:
        self.queue_waiting.set(waiting)
        self.queue_running.set(running)

    def set_prefix_cache(self, blocks: int, capacity: int, evicted_total: int) -> None:
        self.prefix_cache_blocks.set(blocks)
        self.prefix_cache_capacity.set(capacity)
        if evicted_total > self._evicted_seen:  # called from the engine's worker thread only
            self.prefix_cache_evicted.inc(evicted_total - self._evicted_seen)
            self._evicted_seen = evicted_total

    # -- HTTP side
    def set_kv_cache(self, nbytes: int) -> None:
        self.kv_cache_bytes.set(nbytes)

    def observe_request(self, endpoint: str, status: int, latency_s: float) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.request_latency.observe(latency_s)

    def observe_time_to_first_token(self, seconds: float) -> None:
        self.time_to_first_token.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
