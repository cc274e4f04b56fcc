"""What the token endpoints keep per process, and the check of this issuer's own access tokens.

`TokenState` holds the caches every token, revocation, introspection and userinfo request leans
on: each issuer's verification keys, the client_credentials standing grants, and schools by id.
`verify_own_access_token` checks an access token `minting.py` made (RFC 9068), for the
endpoints that take one back: revocation (RFC 7009), introspection (RFC 7662) and UserInfo.
"""

from __future__ import annotations

import time
from typing import Any, Generic, TypeVar
from uuid import UUID

import asyncpg
from aiohttp import web

from libs.common import jwt
from services.identity import store
from services.identity.schools import Issuer


class IssuerKeys:
    """Each issuer's published keys (current, next, retired-but-unexpired), imported once.

    Entries live `ttl` seconds; an unknown kid reloads at most once per `miss_interval`, so a
    key rotated in by another process is found at once and random kids cannot hammer the DB.
    """

    def __init__(self, ttl: float = 30.0, miss_interval: float = 1.0) -> None:
        self._ttl = ttl
        self._miss_interval = miss_interval
        self._sets: dict[int | None, tuple[float, jwt.KeySet]] = {}

    def forget(self) -> None:
        self._sets.clear()

    async def _load(self, pool: asyncpg.Pool, school_id: int | None) -> jwt.KeySet:
        rows = await store.keys_of_issuer(pool, school_id)
        key_set = jwt.KeySet.from_jwks({"keys": [k.public_jwk for k in rows]})
        self._sets[school_id] = (time.monotonic() + self._ttl, key_set)
        return key_set

    def lookup(self, pool: asyncpg.Pool, school_id: int | None) -> jwt.KeyLookup:
        async def find(kid: str) -> jwt.VerificationKey | None:
            now = time.monotonic()
            hit = self._sets.get(school_id)
            if hit is None or hit[0] <= now:
                return (await self._load(pool, school_id)).get(kid)
            key = hit[1].get(kid)
            loaded_at = hit[0] - self._ttl
            if key is None and now - loaded_at >= self._miss_interval:
                key = (await self._load(pool, school_id)).get(kid)
            return key

        return find


_K = TypeVar("_K")
_V = TypeVar("_V")


class _Expiring(Generic[_K, _V]):
    """A small dict whose entries expire; enough for per-process hot lookups."""

    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._data: dict[_K, tuple[float, _V]] = {}

    def get(self, key: _K) -> _V | None:
        hit = self._data.get(key)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            self._data.pop(key, None)
            return None
        return hit[1]

    def put(self, key: _K, value: _V) -> None:
        if len(self._data) >= self._max:
            self._data.clear()
        self._data[key] = (time.monotonic() + self._ttl, value)

    def drop_values(self, value: _V) -> None:
        for key in [k for k, (_, v) in self._data.items() if v == value]:
            del self._data[key]


class TokenState:
    """What the token, revocation, introspection and userinfo endpoints keep per process."""

    # Short: another process revoking a standing grant is noticed within this long (this
    # process drops it at once), and it bounds how stale `last_used_at` gets.
    STANDING_GRANT_TTL = 5.0

    def __init__(self) -> None:
        self.issuer_keys = IssuerKeys()
        self.standing_grants: _Expiring[tuple[str, int], UUID] = _Expiring(self.STANDING_GRANT_TTL)
        self._schools: _Expiring[int, store.School] = _Expiring(10.0)

    def forget_grant(self, grant_id: UUID) -> None:
        self.standing_grants.drop_values(grant_id)

    async def school(self, pool: asyncpg.Pool, school_id: int) -> store.School | None:
        """A school by id: platform-issued tokens name the school the user picked."""
        school = self._schools.get(school_id)
        if school is None:
            school = await store.school_by_id(pool, school_id)
            if school is not None:
                self._schools.put(school_id, school)
        return school


STATE = web.AppKey("token_state", TokenState)


def install(app: web.Application) -> None:
    """Give the app its TokenState once; every token-related module's setup() calls this."""
    if STATE not in app:
        app[STATE] = TokenState()


def state(request: web.Request) -> TokenState:
    return request.app[STATE]


async def verify_own_access_token(
    token_state: TokenState, pool: asyncpg.Pool, issuer: Issuer, token: str
) -> dict[str, Any]:
    """Claims of an access token this issuer signed, or a jwt.TokenError.

    Checked: signature by one of this issuer's keys, typ, times, `iss`; for a school issuer,
    that the token is bound to that school. Not checked: `aud` (any audience the issuer mints
    for is ours) and revocation (the caller asks the grant).
    """
    claims = await jwt.verify_access_token(
        token,
        token_state.issuer_keys.lookup(pool, issuer.school_id),
        issuer=issuer.issuer,
        audience=None,
    )
    school_id = claims.get("school_id")
    if not isinstance(school_id, int) or isinstance(school_id, bool):
        raise jwt.MissingClaim("school_id is required")
    if issuer.school is not None and school_id != issuer.school.id:
        raise jwt.InvalidIssuer("the token is bound to another school")
    for name in ("grant_id", "client_id", "sub"):
        if not isinstance(claims.get(name), str):
            raise jwt.MissingClaim(f"{name} is required")
    try:
        UUID(claims["grant_id"])
    except ValueError:
        raise jwt.MalformedToken("grant_id is not a UUID") from None
    return claims


def grant_uuid(claims: dict[str, Any]) -> UUID:
    """The grant id of claims that passed verify_own_access_token (checked to be a UUID)."""
    return UUID(claims["grant_id"])
