"""Prometheus metrics of the server, in their own registry (no process-global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Seconds: a request on a 2-core CPU takes from ~0.1 s (a few tokens) to minutes (1k tokens).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


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
        self.prompt_tokens = Counter(
            "kubetune_prompt_tokens", "Prompt tokens processed", registry=r
        )
        self.generated_tokens = Counter("kubetune_generated_tokens", "Tokens generated", registry=r)
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
        self.running = Gauge("kubetune_requests_running", "Requests generating now", registry=r)
        self.waiting = Gauge(
            "kubetune_requests_waiting", "Requests queued for a worker", registry=r
        )

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def error(self, code: str) -> None:
        self.errors.labels(code).inc()

    def tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generated_tokens.inc(generated)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def set_load(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(max(0, waiting))

    def render(self) -> bytes:
        return generate_latest(self.registry)
