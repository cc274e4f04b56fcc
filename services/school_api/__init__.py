"""The school API (contract section 7): the reference resource service the gateway fronts.

The seeds' school data (courses, members, orders, lessons, events, ...) in PostgreSQL, every
row keyed by school, served under `/api/v1/` to callers the gateway vouches for, and an event
for every change, published through a transactional outbox to `connect:events`.

Modules: `resources` (the catalogue everything else derives from), `routes` (handlers),
`validation`, `store` (all SQL), `outbox` (the relay), `identity` (the gateway's headers),
`openapi`, `seed` (sample data), `app` (wiring).
"""
