"""Delivery: from a due row in PostgreSQL to a signed POST at the subscriber, and back.

- `sender`: the loop of each process that claims due deliveries, checks the grant, bounds the
  requests per endpoint and in all, and records the outcomes in batches.
- `attempt`: one attempt: the Standard Webhooks headers, the POST, its result.
- `retry`: the retry policy: delivered, retried after the schedule's wait (or Retry-After),
  dead-lettered, or gone.
- `egress`: where requests leave from (WEBHOOK_EGRESS_IP or _PROXY), the pooled session with
  the SSRF guard's resolver and connector (the guard itself is `services/webhooks/ssrf.py`).
"""
