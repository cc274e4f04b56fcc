"""The webhooks service (CONTRACT.md section 8): subscriptions gated by the grant's scopes,
at-least-once dispatch from `connect:events`, Standard Webhooks signatures, delivery from the
fixed egress address, retries, the dead-letter list, the delivery log, SSRF guards.

- `app` wires the process; `routes` serves the public API, whose rules are `subscriptions`;
  `admin_api` the school admin's internal API; `openapi` the document.
- `dispatcher`: `connect:events` to pending deliveries; follows `connect:revocations`.
- `delivery/`: the sender, one attempt, the retry policy, the egress session.
- `store/`: every SQL statement, one module per aggregate.
- `signing` (Standard Webhooks), `ssrf` (the guard), `event_types` (types and their scopes),
  `secret_checks` (refusing to start with a KEY_ENCRYPTION_KEY not the database's), `context`,
  `metrics`.
"""
