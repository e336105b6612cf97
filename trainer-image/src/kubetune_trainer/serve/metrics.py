"""Prometheus metrics of the server, in their own registry (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: a request on a 2-core CPU takes from ~0.1 s (a few tokens) to minutes (1k tokens).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
# Per generated token: ~5 ms alone on a 2-core CPU at INT4, tens of ms in a full batch.
INTER_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "kubetune_requests",
            "HTTP requests to the completion endpoints",
            ["endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "kubetune_request_errors", "Requests answered with an error", ["code"], registry=r
        )
        # By the served model a request named: the base or one of its LoRA adapters, so a
        # server shared by several fine-tunes reports each one's use.
        self.prompt_tokens = Counter(
            "kubetune_prompt_tokens", "Prompt tokens processed", ["model"], registry=r
        )
        self.generated_tokens = Counter(
            "kubetune_generated_tokens", "Tokens generated", ["model"], registry=r
        )
        self.latency = Histogram(
            "kubetune_request_latency_seconds",
            "Time from request to last byte",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "kubetune_time_to_first_token_seconds",
            "Time from request to the first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.inter_token = Histogram(
            "kubetune_inter_token_latency_seconds",
            "Time between a request's generated tokens, per token after the first",
            buckets=INTER_TOKEN_BUCKETS,
            registry=r,
        )
        self.kv_cache = Gauge(
            "kubetune_kv_cache_usage_ratio",
            "Share of the KV cache (max-concurrency sequences of the full context) in use",
            registry=r,
        )
        self.running = Gauge("kubetune_requests_running", "Requests generating now", registry=r)
        self.waiting = Gauge(
            "kubetune_requests_waiting", "Requests queued for a worker", registry=r
        )

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def tokens(self, model: str, prompt: int, generated: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt)
        self.generated_tokens.labels(model).inc(generated)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def between_tokens(self, seconds: float, tokens: int) -> None:
        """`tokens` generated in `seconds` since the last ones: each took seconds / tokens."""
        for _ in range(tokens):
            self.inter_token.observe(seconds / tokens)

    def set_load(self, running: int, waiting: int, kv_cache_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(max(0, waiting))
        self.kv_cache.set(kv_cache_usage)

    def render(self) -> bytes:
        return generate_latest(self.registry)
