"""The webhooks service (CONTRACT.md section 8): subscriptions gated by the grant's scopes,
at-least-once dispatch from `connect:events`, Standard Webhooks signatures, delivery from the
fixed egress address, retries, the dead-letter list, the delivery log, SSRF guards."""
