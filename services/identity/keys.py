"""Signing keys per issuer: generation, encryption at rest, rotation with overlap, the JWKS.

Every issuer (each school, and the platform) holds one key per algorithm in each state:
`next` is published but does not sign yet, so every verifier has it cached before it is used;
`current` signs; `retired` keys stay published until every token they signed has expired.
Access tokens are signed ES256 (fast to sign, small); ID tokens RS256, as OIDC expects by default.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from joserfc.jwk import ECKey, RSAKey

from libs.common import sealing, streams
from libs.common.config import Settings
from libs.common.db import Connection
from services.identity import store

ACCESS_TOKEN_ALG = "ES256"
ID_TOKEN_ALG = "RS256"
ALGORITHMS = (ACCESS_TOKEN_ALG, ID_TOKEN_ALG)

PrivateKey = RSAKey | ECKey


def kek_id(kek: bytes) -> str:
    """Names the key-encryption key a row was sealed with, without revealing it."""
    return hashlib.sha256(b"loopwise-connect kek id\x00" + kek).hexdigest()[:16]


def seal(kek: bytes, kid: str, plaintext: bytes) -> bytes:
    nonce = os.urandom(12)
    # The kid is the associated data: a sealed key copied onto another row will not open.
    return nonce + AESGCM(kek).encrypt(nonce, plaintext, kid.encode())


def unseal(kek: bytes, kid: str, sealed: bytes) -> bytes:
    return AESGCM(kek).decrypt(sealed[:12], sealed[12:], kid.encode())


def unseal_any(keks: Sequence[bytes], kid: str, sealed: bytes) -> bytes:
    """Open under whichever configured key sealed it (InvalidTag when none did)."""
    return _open(keks, kid, sealed)[0]


def _open(keks: Sequence[bytes], kid: str, sealed: bytes) -> tuple[bytes, bytes]:
    return sealing.open_with_any(keks, lambda kek: unseal(kek, kid, sealed))


def generate(alg: str) -> PrivateKey:
    if alg == "RS256":
        return RSAKey.generate_key(2048, private=True)
    if alg == "ES256":
        return ECKey.generate_key("P-256", private=True)
    raise ValueError(f"unsupported algorithm {alg}")


def public_jwk(key: PrivateKey, kid: str, alg: str) -> dict[str, Any]:
    return {**key.as_dict(private=False), "kid": kid, "alg": alg, "use": "sig"}


async def _create(
    conn: Connection, settings: Settings, school_id: int | None, alg: str, state: str
) -> store.SigningKey:
    key = generate(alg)
    # RFC 7638 thumbprint: stable, unique, and says nothing about the issuer.
    kid = key.thumbprint()
    return await store.insert_key(
        conn,
        kid=kid,
        school_id=school_id,
        alg=alg,
        state=state,
        public_jwk=public_jwk(key, kid, alg),
        private_key_enc=seal(settings.key_encryption_key, kid, key.as_pem(private=True)),
        kek_id=kek_id(settings.key_encryption_key),
    )


async def ensure_issuer_keys(pool: asyncpg.Pool, settings: Settings, school_id: int | None) -> bool:
    """Give the issuer a current and a next key of every algorithm; True if any was made."""
    async with pool.acquire() as conn, conn.transaction():
        await store.lock_issuer_keys(conn, school_id)
        existing = await store.keys_of_issuer(conn, school_id)
        made = False
        for alg in ALGORITHMS:
            states = {k.state for k in existing if k.alg == alg}
            for state in ("current", "next"):
                if state not in states:
                    await _create(conn, settings, school_id, alg, state)
                    made = True
        return made


async def rotate(pool: asyncpg.Pool, settings: Settings, school_id: int | None) -> dict[str, Any]:
    """Promote next to current, retire the old current, publish a fresh next."""
    async with pool.acquire() as conn, conn.transaction():
        await store.lock_issuer_keys(conn, school_id)
        return await _rotate_locked(conn, settings, school_id)


async def _rotate_locked(
    conn: Connection, settings: Settings, school_id: int | None
) -> dict[str, Any]:
    existing = await store.keys_of_issuer(conn, school_id)
    changes: dict[str, Any] = {}
    for alg in ALGORITHMS:
        current = next((k for k in existing if k.alg == alg and k.state == "current"), None)
        upcoming = next((k for k in existing if k.alg == alg and k.state == "next"), None)
        if current is not None:
            await store.retire_key(conn, current.kid, settings.tokens.retired_key_ttl)
        if upcoming is not None:
            await store.promote_key(conn, upcoming.kid)
            promoted = upcoming.kid
        else:
            promoted = (await _create(conn, settings, school_id, alg, "current")).kid
        fresh = await _create(conn, settings, school_id, alg, "next")
        changes[alg] = {
            "retired": current.kid if current else None,
            "current": promoted,
            "next": fresh.kid,
        }
    return changes


async def rotate_if_due(
    pool: asyncpg.Pool, settings: Settings, school_id: int | None
) -> dict[str, Any] | None:
    """Rotate when the current keys are older than the rotation interval.

    Due-ness is checked again under the issuer's lock, so two identity processes running the
    schedule at once rotate an issuer once, not twice.
    """
    async with pool.acquire() as conn, conn.transaction():
        await store.lock_issuer_keys(conn, school_id)
        due = await store.issuers_due_for_rotation(conn, settings.tokens.key_rotation_interval)
        if school_id not in due:
            return None
        return await _rotate_locked(conn, settings, school_id)


async def rotate_due_issuers(pool: asyncpg.Pool, redis: Any, settings: Settings) -> int:
    """One pass of the schedule: rotate every issuer whose keys are due; return how many."""
    rotated = 0
    for school_id in await store.issuers_due_for_rotation(
        pool, settings.tokens.key_rotation_interval
    ):
        if await rotate_if_due(pool, settings, school_id) is not None:
            await announce(redis, settings, school_id, "scheduled")
            rotated += 1
    return rotated


async def announce(redis: Any, settings: Settings, school_id: int | None, reason: str) -> None:
    """Tell every gateway to refresh this issuer's JWKS (connect:keys)."""
    await streams.append(
        redis,
        settings.stream(streams.KEYS),
        {"school_id": school_id, "reason": reason, "at": int(time.time())},
        maxlen=10_000,
    )


async def jwks(pool: asyncpg.Pool, school_id: int | None) -> dict[str, Any]:
    keys = await store.keys_of_issuer(pool, school_id)
    return {"keys": [k.public_jwk for k in keys]}


async def rewrap(pool: asyncpg.Pool, settings: Settings) -> dict[str, int]:
    """Seal every private key (retired ones too) under KEY_ENCRYPTION_KEY, opening each under
    whichever configured key sealed it; how many were re-sealed, already were, changed in
    between (raced), and would not open under any configured key.

    Idempotent: a key already sealed under KEY_ENCRYPTION_KEY is left as it is. Safe beside
    running services: each key is replaced only if its sealed value is still the one read
    (another rewrap that got there first is not undone), and every configured process opens
    either value as long as it has both keys, which a rotation's first step gives them all.
    """
    newest = settings.key_encryption_key
    newest_id = kek_id(newest)
    counts = {"resealed": 0, "already": 0, "raced": 0, "unopenable": 0}
    for sealed in await store.sealed_private_keys(pool):
        try:
            pem, opened_by = _open(settings.key_encryption_keys, sealed.kid, sealed.private_key_enc)
        except (InvalidTag, ValueError):
            # Sealed under no configured key: left for an operator (rewrap refuses to finish).
            counts["unopenable"] += 1
            continue
        if opened_by == newest and sealed.kek_id == newest_id:
            counts["already"] += 1
            continue
        if await store.reseal_private_key(
            pool,
            sealed.kid,
            old=sealed.private_key_enc,
            new=seal(newest, sealed.kid, pem),
            kek_id=newest_id,
        ):
            counts["resealed"] += 1
        else:
            # Another rewrap re-sealed it in between: the next pass finds it done.
            counts["raced"] += 1
    return counts


@dataclass(frozen=True, slots=True)
class Signer:
    kid: str
    alg: str
    key: PrivateKey


class KeyRing:
    """The decrypted current keys of each issuer, held briefly in memory.

    Signing happens on every token request; decrypting a PEM each time would dominate it.
    Entries expire after `ttl` seconds so a rotation made by another process is picked up.
    """

    def __init__(self, pool: asyncpg.Pool, settings: Settings, ttl: float = 30.0) -> None:
        self._pool = pool
        self._settings = settings
        self._ttl = ttl
        self._cache: dict[tuple[int | None, str], tuple[float, Signer]] = {}
        self._lock = asyncio.Lock()

    def forget(self, school_id: int | None = None) -> None:
        if school_id is None:
            self._cache.clear()
        else:
            for cache_key in [k for k in self._cache if k[0] == school_id]:
                del self._cache[cache_key]

    async def signer(self, school_id: int | None, alg: str) -> Signer:
        cache_key = (school_id, alg)
        hit = self._cache.get(cache_key)
        now = time.monotonic()
        if hit and hit[0] > now:
            return hit[1]
        async with self._lock:
            hit = self._cache.get(cache_key)
            if hit and hit[0] > now:
                return hit[1]
            current = await self._current(school_id, alg)
            if current is None:
                await ensure_issuer_keys(self._pool, self._settings, school_id)
                current = await self._current(school_id, alg)
            assert current is not None
            pem = unseal_any(
                self._settings.key_encryption_keys, current.kid, current.private_key_enc
            )
            key: PrivateKey = RSAKey.import_key(pem) if alg == "RS256" else ECKey.import_key(pem)
            signer = Signer(current.kid, alg, key)
            self._cache[cache_key] = (now + self._ttl, signer)
            return signer

    async def _current(self, school_id: int | None, alg: str) -> store.SigningKey | None:
        keys = await store.keys_of_issuer(self._pool, school_id)
        return next((k for k in keys if k.alg == alg and k.state == "current"), None)
