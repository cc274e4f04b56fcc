"""The gateway: the only public edge (CONTRACT.md section 6).

routes.py dispatches every call: public routes pass through to identity with their Host; a
protected route (`/api/v1/...`, on a school's Host) gets checks.py, contract 6's checks in its
order: the token's signature, times, issuer, audience and school (validation.py, keys from
jwks.py), revocation (revocation.py: the local set, the lease and its follower), the route's
scope (routetable.py, deploy/routes.toml) and the rate limit (ratelimit.py, one Redis round
trip with the revocation mark); then proxy.py forwards it with the verified identity. Beside
them: forwarded.py (who called, X-Forwarded-*), refusals.py (the gateway's own error answers),
cors.py, audit.py (the audit trail), directory.py (identity's tables, read-only), mcp/ (the
MCP server at /mcp). Lean clients for the hot path: redis_pipeline.py (pipelined RESP2) and
http1_pool.py (pooled HTTP/1.1); broadcasts.py follows connect:keys. app.py wires it all and
edge.py is the aiohttp shell (health, readiness, metrics).
"""
