"""The per-call token checks of contract section 6, in its order.

1. signature and `kid` against the issuer's JWKS, with the algorithm allowlist and `typ:
   at+jwt` (libs.common.jwt), 2. `exp`/`nbf`, 3. `iss` and `aud`, 4. the token's `school_id`
   equal to the Host's school, 5. not revoked, 6. the route's scope, 7. the rate limit.

Steps 1-4 depend only on the token and the Host's school, so their outcome is cached by a hash
of the token until min(exp, TOKEN_CACHE_TTL): a signature is checked once per token, not once
per call. Steps 5-7 run on every call (checks.py), revocation and rate limit in one Redis
round trip.

Accepted issuers on a school's Host: the school itself, and the platform for tokens of
platform-level clients (MCP clients and other system defaults) that the user granted for this
school. Either way `aud` must be the school's API origin and `school_id` the Host's school;
a platform token's client must be a platform client, a school token's client that school's.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Collection, Mapping
from types import MappingProxyType
from typing import NamedTuple
from uuid import UUID

from libs.common import jwt
from libs.common import scopes as catalogue
from libs.common.config import Settings
from services.gateway.directory import ClientPolicy, Directory
from services.gateway.jwks import JwksCache

TOKEN_CACHE_MAX = 50_000
# str(UUID(...)) of any UUID: such a grant id needs no parsing.
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class Rejection(Exception):
    """The call is refused; `reason` is the metric label, never shown with the token."""

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(description)
        self.reason = reason
        self.description = description


class VerifiedToken(NamedTuple):
    """Immutable (one instance serves every call of a cached token); a tuple because it is
    built on every first sight of a token, and a frozen dataclass costs several times more."""

    school_id: int
    client_id: str
    subject: str
    grant_id: str
    scope: str
    # Each effective scope (umbrellas expanded) to the granted scope that gives it.
    granted: Mapping[str, str]
    issuer: str
    platform: bool  # issued by the platform (a platform-level client), not the school
    deadline: float  # monotonic: until when the verification may be reused

    def satisfying(self, any_of: Collection[str]) -> tuple[bool, str | None]:
        """(allowed, the granted scope that allowed it); an empty any-of needs none."""
        if not any_of:
            return True, None
        granted = self.granted
        for needed in any_of:
            source = granted.get(needed)
            if source is not None:
                return True, source
        return False, None


def _expand(scope: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for held in catalogue.parse(scope):
        out.setdefault(held, held)
        for implied in catalogue.UMBRELLA_EXPANSION.get(held, ()):
            out.setdefault(implied, held)
    return out


# Tokens of one client mostly carry the same few scope strings: expand each once. Read-only
# once made, so one mapping may serve many tokens.
_GRANTED: dict[str, Mapping[str, str]] = {}
_GRANTED_MAX = 1024


def _granted(scope: str) -> Mapping[str, str]:
    found = _GRANTED.get(scope)
    if found is None:
        if len(_GRANTED) >= _GRANTED_MAX:
            _GRANTED.clear()
        found = _GRANTED[scope] = MappingProxyType(_expand(scope))
    return found


_DESCRIPTIONS = {
    "expired": "The access token has expired",
    "school": "The access token belongs to another school",
}


def describe(reason: str) -> str:
    return _DESCRIPTIONS.get(reason, "The access token is not valid here")


class TokenVerifier:
    def __init__(
        self,
        settings: Settings,
        jwks: JwksCache,
        directory: Directory,
        *,
        cache_ttl: float,
        leeway: int = jwt.DEFAULT_LEEWAY,
    ) -> None:
        self._settings = settings
        self._jwks = jwks
        self._directory = directory
        self._cache_ttl = cache_ttl
        self._leeway = leeway
        self._cache: dict[bytes, VerifiedToken] = {}

    def forget(self) -> None:
        """Drop every cached verification (a key rotation may have withdrawn a key)."""
        self._cache.clear()

    async def verify(self, token: str, school_id: int, subdomain: str) -> VerifiedToken:
        """Steps 1-4 for this Host's school, from cache when this token passed them before."""
        if not token.isascii():
            # A compact JWT is ASCII; aiohttp hands a header's other bytes on as surrogates,
            # which no encoding takes (a 500, and a stack trace in the log, per call).
            raise Rejection("malformed", describe("malformed"))
        digest = hashlib.sha256(token.encode()).digest()
        hit = self._cache.get(digest)
        if hit is not None:
            if hit.deadline > time.monotonic():
                if hit.school_id != school_id:
                    raise Rejection("school", describe("school"))
                return hit
            del self._cache[digest]
        verified = await self._verify(token, school_id, subdomain)
        if self._cache_ttl > 0:
            if len(self._cache) >= TOKEN_CACHE_MAX:
                self._cache.pop(next(iter(self._cache)))
            self._cache[digest] = verified
        return verified

    async def _verify(self, token: str, school_id: int, subdomain: str) -> VerifiedToken:
        urls = self._settings.urls
        platform_url = urls.platform_url
        school_issuer = urls.school_origin(subdomain)
        try:
            # Each segment decoded once; its `iss` read only to choose whose keys to try:
            # every claim is checked after the signature.
            compact = jwt.Compact(token)
            kid = compact.kid
            platform = compact.claims.get("iss") == platform_url
            issuer = platform_url if platform else school_issuer
            key = self._jwks.peek(issuer, kid)
            if key is None:
                key = await self._jwks.find(issuer, None if platform else school_id, kid)
            claims = jwt.verify_compact(compact, key, typ=jwt.ACCESS_TOKEN_TYPES)
            # aud: the school's API origin (resources.api_resource in identity).
            jwt.check_claims(claims, issuer=issuer, audience=school_issuer, leeway=self._leeway)
        except jwt.TokenError as exc:
            raise Rejection(exc.reason, describe(exc.reason)) from None
        token_school = claims.get("school_id")
        if isinstance(token_school, bool) or not isinstance(token_school, int):
            raise Rejection("missing_claim", describe("missing_claim"))
        if token_school != school_id:
            raise Rejection("school", describe("school"))
        client_id, subject, grant_id = (
            claims.get("client_id"),
            claims.get("sub"),
            claims.get("grant_id"),
        )
        if not (
            isinstance(client_id, str) and isinstance(subject, str) and isinstance(grant_id, str)
        ):
            raise Rejection("missing_claim", describe("missing_claim"))
        if _CANONICAL_UUID.fullmatch(grant_id) is None:
            # Not as identity writes it: parse, and key revocation on the canonical spelling.
            try:
                grant_id = str(UUID(grant_id))
            except ValueError:
                raise Rejection("malformed", describe("malformed")) from None
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise Rejection("malformed", describe("malformed"))
        client = await self._directory.client(client_id)
        self.check_client(client, platform, school_id)
        lifetime = min(self._cache_ttl, float(claims["exp"]) - time.time())
        return VerifiedToken(
            school_id,
            client_id,
            subject,
            grant_id,
            scope,
            _granted(scope),
            issuer,
            platform,
            time.monotonic() + max(0.0, lifetime),
        )

    @staticmethod
    def check_client(client: ClientPolicy | None, platform: bool, school_id: int) -> None:
        """The client still exists, is enabled, and belongs where the token's issuer says."""
        if client is None or client.disabled:
            raise Rejection("client", describe("client"))
        if platform and client.school_id is not None:
            raise Rejection("issuer", describe("issuer"))
        if not platform and client.school_id != school_id:
            raise Rejection("school", describe("school"))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer` header (RFC 6750 2.1), None when absent.

    Another scheme counts as no bearer token at all; `Bearer` with nothing usable after it is
    a token that fails verification.
    """
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return credentials.strip()
