"""Prometheus metrics of one server (its own registry, exposed at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class Metrics:
    """Counters, gauges and histograms; gauges of the queues are read from the scheduler when scraped."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, batch_size: int, max_queue: int, model: str, plan_hash: str):
        disable_created_metrics()  # the *_created series double every counter for no use here (process-wide)
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "planc_requests", "HTTP requests answered, by endpoint and status code (499: client went away).",
            ["endpoint", "status"], registry=registry,
        )
        self.rejected = Counter(
            "planc_rejected_requests", "Requests refused with 429 because batch_size sequences ran and the queue was full.",
            registry=registry,
        )
        self.prompt_tokens = Counter("planc_prompt_tokens", "Prompt tokens of admitted requests.", registry=registry)
        self.generated_tokens = Counter("planc_generation_tokens", "Tokens generated.", registry=registry)
        self.in_flight = Gauge("planc_sequences_in_flight", "Sequences being decoded (at most batch_size).",
                               registry=registry)
        self.queued = Gauge("planc_requests_queued", "Requests waiting for a slot (at most max_queue).",
                            registry=registry)
        Gauge("planc_batch_size", "The plan's workload.batch_size: sequences in flight at most.",
              registry=registry).set(batch_size)
        Gauge("planc_max_queue", "Requests that may wait for a slot before 429.", registry=registry).set(max_queue)
        Gauge("planc_plan_info", "The plan being served.", ["model", "plan_hash"],
              registry=registry).labels(model, plan_hash).set(1)
        self.latency = Histogram("planc_request_duration_seconds", "From admission to the last token.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.first_token = Histogram("planc_time_to_first_token_seconds", "From admission to the first token.",
                                     buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_wait = Histogram("planc_queue_wait_seconds", "From admission to the start of the prefill.",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.decode_rows = Histogram(
            "planc_decode_step_sequences", "Sequences advanced together by one decode step.",
            buckets=tuple(sorted({1, 2, 4, 8, 16, 32, 64, 128, batch_size})), registry=registry,
        )

    def watch(self, counts) -> None:
        """Read the in-flight and queued gauges from `counts()` -> (in flight, queued) at each scrape."""
        self.in_flight.set_function(lambda: counts()[0])
        self.queued.set_function(lambda: counts()[1])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
