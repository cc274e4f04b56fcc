"""The webhooks service's Prometheus metrics, in the service's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "webhook_events_total",
            "Stream entries the dispatcher handled, by result",
            ["result"],  # dispatched | rejected
            registry=registry,
        )
        self.deliveries_created = Counter(
            "webhook_deliveries_created_total",
            "Deliveries recorded for matching subscriptions",
            registry=registry,
        )
        self.attempts = Counter(
            "webhook_delivery_attempts_total",
            "Delivery attempts, by outcome",
            ["outcome"],  # delivered | retry | dead | gone | cancelled
            registry=registry,
        )
        self.latency = Histogram(
            "webhook_delivery_duration_seconds",
            "Time from sending a delivery to its receiver's answer (or failure)",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30),
        )
        self.queue_due = Gauge(
            "webhook_queue_due",
            "Pending deliveries whose next attempt is due",
            registry=registry,
        )
        self.queue_pending = Gauge(
            "webhook_queue_pending",
            "Pending deliveries, due or waiting for a retry",
            registry=registry,
        )
        self.in_flight = Gauge(
            "webhook_in_flight",
            "Deliveries being sent by this process",
            registry=registry,
        )
        self.disabled = Counter(
            "webhook_subscriptions_disabled_total",
            "Subscriptions disabled by the service, by reason",
            ["reason"],  # gone | failing | grant_revoked
            registry=registry,
        )
        self.dead_letters = Counter(
            "stream_dead_letters_total",
            "Stream entries set aside because no consumer can handle them",
            ["stream"],  # connect:events | connect:revocations
            registry=registry,
        )
        self.restarts = Counter(
            "webhook_background_restarts_total",
            "Background loops restarted after they failed, by loop",
            ["loop"],
            registry=registry,
        )
        self.stream_lag = Gauge(
            "webhook_stream_lag",
            "Stream entries the dispatchers' consumer group has not read yet (XINFO GROUPS lag)",
            ["stream"],
            registry=registry,
        )
        self.stream_pending = Gauge(
            "webhook_stream_pending",
            "Stream entries read by a dispatcher and not yet acknowledged",
            ["stream"],
            registry=registry,
        )
