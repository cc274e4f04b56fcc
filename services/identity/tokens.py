"""Minting access tokens (RFC 9068) and ID tokens (OIDC Core), and verifying our own.

Claims are built by plain functions and signed separately, so the token endpoint can fetch the
signer before its transaction and sign after it without holding a connection.

The per-process caches every token endpoint request leans on live in :class:`TokenState`:
verification keys of each issuer, the client_credentials standing grants, and schools by id.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Generic, TypeVar
from uuid import UUID

import asyncpg
import orjson
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from libs.common import jwt
from libs.common.config import Settings
from services.identity import keys, store
from services.identity.schools import Issuer


def _epoch(moment: datetime | None) -> int | None:
    return int(moment.timestamp()) if moment is not None else None


def new_jti() -> str:
    return secrets.token_urlsafe(16)


def access_token_claims(
    settings: Settings,
    *,
    issuer: Issuer,
    school: store.School,
    client_id: str,
    subject: str,
    scopes: Sequence[str],
    audience: str,
    grant_id: UUID,
    auth_time: datetime | None,
    now: int | None = None,
) -> dict[str, Any]:
    """RFC 9068 2.2 claims plus ours: the school the token is bound to and its grant."""
    iat = int(time.time()) if now is None else now
    claims: dict[str, Any] = {
        "iss": issuer.issuer,
        "sub": subject,
        "aud": audience,
        "client_id": client_id,
        "scope": " ".join(scopes),
        "school_id": school.id,
        "school_subdomain": school.subdomain,
        "jti": new_jti(),
        "iat": iat,
        "exp": iat + settings.tokens.access_token_ttl,
        "grant_id": str(grant_id),
    }
    if auth_time is not None:
        claims["auth_time"] = _epoch(auth_time)
    return claims


def at_hash(access_token: str) -> str:
    """OIDC Core 3.1.3.6: the left half of the SHA-256 of the token (our ID tokens are RS256)."""
    digest = hashlib.sha256(access_token.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest[: len(digest) // 2]).rstrip(b"=").decode()


def id_token_claims(
    settings: Settings,
    *,
    issuer: Issuer,
    school: store.School,
    client_id: str,
    subject: str,
    auth_time: datetime | None,
    nonce: str | None,
    access_token: str,
    now: int | None = None,
) -> dict[str, Any]:
    iat = int(time.time()) if now is None else now
    claims: dict[str, Any] = {
        "iss": issuer.issuer,
        "sub": subject,
        "aud": client_id,
        "azp": client_id,
        "iat": iat,
        "exp": iat + settings.tokens.id_token_ttl,
        "at_hash": at_hash(access_token),
        "school_id": school.id,
    }
    if auth_time is not None:
        claims["auth_time"] = _epoch(auth_time)
    if nonce:
        claims["nonce"] = nonce
    return claims


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# A signer's header is the same for every token it signs; encode it once per (kid, alg, typ).
_HEADERS: dict[tuple[str, str, str], str] = {}
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def _encoded_header(signer: keys.Signer, typ: str) -> str:
    cache_key = (signer.kid, signer.alg, typ)
    encoded = _HEADERS.get(cache_key)
    if encoded is None:
        if len(_HEADERS) > 1024:
            _HEADERS.clear()
        header = {"alg": signer.alg, "kid": signer.kid, "typ": typ}
        encoded = _HEADERS[cache_key] = _b64url(orjson.dumps(header))
    return encoded


def sign(signer: keys.Signer, claims: dict[str, Any], *, typ: str) -> str:
    """A compact JWS, signed with `cryptography` directly: joserfc's registry and key
    wrappers cost more than the ECDSA signature itself on the token endpoint's hot path."""
    signing_input = f"{_encoded_header(signer, typ)}.{_b64url(orjson.dumps(claims))}"
    private = signer.key.raw_value
    if signer.alg == "ES256":
        if not isinstance(private, ec.EllipticCurvePrivateKey):
            raise ValueError("an ES256 signer needs a P-256 private key")
        r, s = decode_dss_signature(private.sign(signing_input.encode("ascii"), _ECDSA_SHA256))
        # RFC 7518 3.4: JWS carries ECDSA as fixed-width r||s, not DER.
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    elif signer.alg == "RS256":
        if not isinstance(private, rsa.RSAPrivateKey):
            raise ValueError("an RS256 signer needs an RSA private key")
        signature = private.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    else:
        raise ValueError(f"unsupported algorithm {signer.alg}")
    return f"{signing_input}.{_b64url(signature)}"


def sign_access_token(signer: keys.Signer, claims: dict[str, Any]) -> str:
    return sign(signer, claims, typ="at+jwt")


def sign_id_token(signer: keys.Signer, claims: dict[str, Any]) -> str:
    return sign(signer, claims, typ="JWT")


# Verification of our own tokens (introspection, revocation, userinfo) --------------------------


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
