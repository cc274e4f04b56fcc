"""How long and how much: the full run (`make bench`) and the quick one (`make bench-quick`).

Both run the same scenarios; the quick one with shorter runs, smaller pools and no peer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    # wrk concurrency of the throughput runs (the node-oidc peer's figures used -c32).
    connections: int
    # Concurrency of the light-load runs that measure the latency the gateway adds.
    latency_connections: int
    # Rounds of the light-load runs (each round: every variant twice, ABBA). A 4-second run's
    # p99 on a 2-core machine shared with everything else moves by half a millisecond from one
    # run to the next, the bare proxy's as much as the gateway's: each variant's figure is the
    # median of its runs.
    latency_rounds: int
    warmup_s: float
    # A warm-up run of each gateway variant before the measured ones.
    variant_warmup: bool
    gateway_s: float
    gateway_latency_s: float
    token_s: float
    token_warmup_s: float
    validation_tokens: int
    validation_rounds: int
    webhook_subscriptions: int
    webhook_burst_events: int
    webhook_rate: int
    webhook_latency_s: float
    receiver_s: float
    revocation_trials: int
    soak_warmup_s: float
    soak_s: float
    users: int
    peer: bool
    # Exchange more codes (not measured) when the measured exchange run left a refresh pool
    # too small for the refresh run's whole duration.
    refresh_topup: bool
    peer_token_s: float = 0.0
    peer_refresh_pool: int = 0


FULL = Plan(
    name="full",
    connections=32,
    latency_connections=2,
    latency_rounds=2,
    warmup_s=2,
    variant_warmup=True,
    gateway_s=8,
    gateway_latency_s=4,
    token_s=10,
    token_warmup_s=2,
    validation_tokens=5000,
    validation_rounds=3,
    webhook_subscriptions=4,
    webhook_burst_events=6000,
    webhook_rate=500,
    webhook_latency_s=15,
    receiver_s=5,
    revocation_trials=60,
    soak_warmup_s=10,
    soak_s=120,
    users=16,
    peer=True,
    refresh_topup=True,
    peer_token_s=8,
    peer_refresh_pool=5500,
)

QUICK = Plan(
    name="quick",
    connections=32,
    latency_connections=2,
    latency_rounds=1,
    warmup_s=1,
    variant_warmup=False,
    gateway_s=2,
    gateway_latency_s=2,
    token_s=3,
    token_warmup_s=1,
    validation_tokens=1500,
    validation_rounds=2,
    webhook_subscriptions=4,
    webhook_burst_events=1500,
    webhook_rate=500,
    webhook_latency_s=4,
    receiver_s=1,
    revocation_trials=12,
    soak_warmup_s=2,
    soak_s=15,
    users=4,
    peer=False,
    refresh_topup=False,
)
