"""Identity's domain metrics, in the service's registry (served at /metrics)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge


class IdentityMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.tokens_issued = Counter(
            "identity_tokens_issued_total",
            "Access tokens issued at the token endpoint, by grant type",
            ["grant_type"],  # authorization_code | refresh_token | client_credentials
            registry=registry,
        )
        self.sign_in_failures = Counter(
            "identity_sign_in_failures_total",
            "Sign-ins refused, by reason",
            ["reason"],  # bad_credentials | throttled | not_member
            registry=registry,
        )
        self.refresh_reuse = Counter(
            "identity_refresh_reuse_detected_total",
            "Rotated refresh tokens presented again outside the grace window (the grant ended)",
            registry=registry,
        )
        # Both read at each scrape from what the metrics loop found last (app.py).
        self.oldest_key_activated: float | None = None
        self.key_age = Gauge(
            "identity_signing_key_age_seconds",
            "Age of the oldest signing key in use (current) across issuers; past "
            "KEY_ROTATION_INTERVAL the scheduled rotation is not happening",
            registry=registry,
        )
        self.key_age.set_function(self._key_age)
        self.audit_lag = Gauge(
            "identity_audit_stream_lag",
            "connect:audit entries identity's consumer group has not read yet (XINFO GROUPS lag)",
            registry=registry,
        )
        self.audit_pending = Gauge(
            "identity_audit_stream_pending",
            "connect:audit entries read by identity and not yet stored and acknowledged",
            registry=registry,
        )

    def _key_age(self) -> float:
        if self.oldest_key_activated is None:
            return 0.0
        return max(0.0, time.time() - self.oldest_key_activated)
