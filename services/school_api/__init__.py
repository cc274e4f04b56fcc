"""The school API (contract section 7): the reference resource service the gateway fronts.

The seeds' school data (courses, members, orders, lessons, events, ...) in PostgreSQL, every
row keyed by school, served under `/api/v1/` to callers the gateway vouches for, and an event
for every change, published through a transactional outbox to `connect:events`.

Modules: `resources/` (the catalogue everything else derives from: `model` says what an entry
is, one module per family of seed 002 holds the entries), `routes` (handlers), `validation`,
`store` (all SQL), `outbox` (the relay), `identity` (the gateway's headers), `uploads`,
`openapi`, `seed` (sample data, as rows), `app` (wiring).
"""
