"""The server's Prometheus metrics (prometheus_client, one registry per app): requests, tokens in and out,
prefix reuse, queue depth, active slots, time to first token and per-token latency."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, exposition, generate_latest

CONTENT_TYPE = exposition.CONTENT_TYPE_LATEST
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self, slots: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("babyllama_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("babyllama_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.prefilled = Counter("babyllama_prefill_tokens", "prompt tokens prefilled (not found in a slot's cache)",
                                 registry=r)
        self.prefix_reused = Counter("babyllama_prefix_reused_tokens",
                                     "prompt tokens whose keys and values were reused from a slot's cache", registry=r)
        self.generated = Counter("babyllama_generated_tokens", "tokens generated", registry=r)
        self.cancelled = Counter("babyllama_cancelled_requests",
                                 "requests ended before their answer was complete, each once (client gone, time "
                                 "limit, shutdown, error)", ["reason"], registry=r)
        self.queue_depth = Gauge("babyllama_queue_depth", "sequences waiting for a slot", registry=r)
        self.active_slots = Gauge("babyllama_active_slots", "slots generating now", registry=r)
        Gauge("babyllama_slots", "slots (sequences generated at once)", registry=r).set(slots)
        self.ttft = Histogram("babyllama_time_to_first_token_seconds", "from arrival to the first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.token_latency = Histogram("babyllama_time_per_output_token_seconds",
                                       "between consecutive tokens of one sequence", buckets=TOKEN_BUCKETS,
                                       registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
