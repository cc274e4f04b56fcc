"""Every SQL statement of the webhooks service, one module per aggregate.

- `subscriptions`: the subscription row and what its client does to it (the public API).
- `revocations`: revoked grants, and the lock that orders changes against a revocation.
- `events`: events from `connect:events`, fanned out to one pending delivery per subscription.
- `queue`: the pending deliveries as a work queue: claim with a lease, renew, release, cancel.
- `ordering`: one sendable delivery at a time per subscription and resource, in the
  resource's order (the rest held, released as each finishes).
- `outcomes`: a batch of attempts written back: attempts, delivery states, failure streaks,
  disabling and its `endpoint.disabled` announcement.
- `deliveries`: the delivery log read back, and a manual retry (dead letters included).
- `admin`: a school's subscriptions over every app, for the school admin.
- `secret_checks`: what the start-up key check reads (sealed secrets, identity's check value).
- `dead_letters`: stream entries no consumer can handle, set aside.

The hot path is three statements per batch: the dispatcher records a whole stream batch of
deliveries in one INSERT (`events`), a sender claims due deliveries with FOR UPDATE SKIP LOCKED
and a lease (`queue`), and the recorder writes a batch of outcomes in one transaction
(`outcomes`).
"""

from __future__ import annotations

import asyncpg

# Errors that the same statement with the same data will raise again: retrying is useless.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
)
