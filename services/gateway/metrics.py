"""The gateway's own Prometheus metrics, in the service's registry (served at /metrics)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # `route` is the route table's prefix (bounded by the file), never the raw path.
        self.calls = Counter(
            "gateway_requests_total",
            "Calls answered, by route table entry and status",
            ["route", "status"],
            registry=registry,
        )
        self.rejections = Counter(
            "gateway_token_rejections_total",
            "Protected calls refused, by the check that refused them",
            ["reason"],
            registry=registry,
        )
        self.upstream_latency = Histogram(
            "gateway_upstream_duration_seconds",
            "Time from sending a call upstream to its response headers",
            ["upstream"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors_total",
            "Upstream calls that failed, by upstream and kind (timeout, connect, protocol)",
            ["upstream", "kind"],
            registry=registry,
        )
        self.audit_dropped = Counter(
            "gateway_audit_dropped_total",
            "Audit records no call waited on, dropped because the buffer was full",
            registry=registry,
        )
        self.audit_refused = Counter(
            "gateway_audit_refused_total",
            "Calls refused (503; a tool error for a tool's call within /mcp) because the audit "
            "buffer could not take their record",
            registry=registry,
        )
        # Read at each scrape (app.py sets its function), nothing per call.
        self.audit_unconfirmed = Gauge(
            "gateway_audit_unconfirmed",
            "Audit records on connect:audit that identity has not stored yet, kept here to be "
            "appended again if Redis loses them",
            registry=registry,
        )
        self.audit_unconfirmed_dropped = Counter(
            "gateway_audit_unconfirmed_dropped_total",
            "Kept audit records given up (identity's consumer away past the bound)",
            registry=registry,
        )
        self.audit_buffer_used = Gauge(
            "gateway_audit_buffer_used",
            "Audit records waiting to be written plus places held by calls in progress; at "
            "GATEWAY_AUDIT_BUFFER, protected calls are refused",
            registry=registry,
        )
        # Read at each scrape (app.py sets its function).
        self.revocation_lease = Gauge(
            "gateway_revocation_lease_live",
            '1 while this gateway holds a live revocation lease (it may answer "not revoked" '
            "from its own set); 0 sends every protected call's check to Redis",
            registry=registry,
        )
        self.jwks_fetches = Counter(
            "gateway_jwks_fetches_total",
            "JWKS documents fetched from identity",
            registry=registry,
        )

        self._call_children: dict[tuple[str, int], Any] = {}
        self._latency_children: dict[str, Any] = {}

    def call(self, route: str, status: int) -> None:
        """Count one answered call; the labelled child is looked up once per (route, status)."""
        child = self._call_children.get((route, status))
        if child is None:
            child = self._call_children[(route, status)] = self.calls.labels(route, str(status))
        child.inc()

    def upstream_answered(self, upstream: str, seconds: float) -> None:
        """Observe one upstream latency; the labelled child is looked up once per upstream."""
        child = self._latency_children.get(upstream)
        if child is None:
            child = self._latency_children[upstream] = self.upstream_latency.labels(upstream)
        child.observe(seconds)
