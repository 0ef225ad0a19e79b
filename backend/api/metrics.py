"""Prometheus metrics of one server process, on a registry of its own.

Each :func:`backend.api.app.create_app` builds its own registry, so several apps in one process
(tests) never clash. Under gunicorn with several workers, every worker keeps its own numbers and
a scrape sees the worker that answered; run one worker per GPU, or scrape each worker's port.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 100.0)


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    predictions: Counter
    prediction_failures: Counter
    webhooks: Counter
    events_processed: Counter
    model_loaded: Gauge

    @classmethod
    def create(cls) -> Metrics:
        registry = CollectorRegistry(auto_describe=True)
        return cls(
            registry=registry,
            requests=Counter(
                "sonoseg_http_requests",
                "HTTP requests by endpoint and status.",
                ["endpoint", "status"],
                registry=registry,
            ),
            latency=Histogram(
                "sonoseg_http_request_seconds",
                "Time to answer a request, by endpoint.",
                ["endpoint"],
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            predictions=Counter(
                "sonoseg_predictions", "Task predictions served, by model version kind.", ["kind"], registry=registry
            ),
            prediction_failures=Counter(
                "sonoseg_prediction_task_failures",
                "Tasks answered with an empty result because their image failed.",
                registry=registry,
            ),
            webhooks=Counter(
                "sonoseg_webhooks",
                "Webhook deliveries by action and outcome.",
                ["action", "outcome"],
                registry=registry,
            ),
            events_processed=Counter(
                "sonoseg_webhook_events_processed",
                "Recorded webhook events processed in the background, by result.",
                ["result"],
                registry=registry,
            ),
            model_loaded=Gauge(
                "sonoseg_serving_models", "Models loaded and serving in this process.", registry=registry
            ),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
