"""The gateway: the only public edge (CONTRACT.md section 6).

Public routes (discovery, OAuth, pages) pass through to identity with their Host. Protected
routes (`/api/v1/...`) are checked in the contract's order: the token (validation.py, keys
from jwks.py), revocation and the rate limit in one Redis round trip (ratelimit.py,
revocation.py), the route's scope from the route table (routetable.py, deploy/routes.toml);
then proxied (proxy.py) with the verified identity, answered with CORS for the client's
registered origins (cors.py), and audited without waiting (audit.py). app.py wires it.
"""
