"""Signing keys: a public JWKS, rotation with overlap through the real CLI, expiry, the stream."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, KeySetSerialization

from libs.common import streams
from libs.common.config import Settings
from services.identity import keys, schools

CLI = str(Path(sys.executable).with_name("loopwise-connect"))
# Private members of RSA, EC, OKP and symmetric JWKs (RFC 7518 6.2.2, 6.3.2, 6.4; RFC 8037).
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


async def _jwks(http: Any, origin: str) -> dict[str, Any]:
    async with http.get(f"{origin}/v1/oauth/jwks") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        document: dict[str, Any] = await resp.json()
    return document


def _keyset(document: dict[str, Any]) -> KeySet:
    """The JWKS as a verifier would load it."""
    return KeySet.import_key_set(cast(KeySetSerialization, document))


def _kids(document: dict[str, Any]) -> set[str]:
    return {k["kid"] for k in document["keys"]}


async def _states(pool: asyncpg.Pool, school_id: int) -> dict[tuple[str, str], list[str]]:
    """(alg, state) -> kids, straight from the table."""
    rows = await pool.fetch(
        "SELECT kid, alg, state FROM signing_keys WHERE school_id = $1", school_id
    )
    found: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        found.setdefault((r["alg"], r["state"]), []).append(r["kid"])
    return found


async def _cli(env: dict[str, str], *args: str) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        CLI,
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    result: dict[str, Any] = json.loads(out)
    return result


def _access_claims(origin: str, school_id: int, subdomain: str) -> dict[str, Any]:
    now = int(time.time())
    return {
        "iss": origin,
        "sub": "user-1",
        "aud": f"{origin}/api",
        "client_id": "client-1",
        "scope": "courses:read",
        "school_id": school_id,
        "school_subdomain": subdomain,
        "jti": secrets.token_urlsafe(12),
        "iat": now,
        "exp": now + 7200,
    }


async def test_jwks_publishes_current_and_next_public_keys(
    identity_url: str,
    http: Any,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    """A new school publishes a current and a next key per algorithm, public members only."""
    school = await schools.create_school(pool, settings, f"jwks{unique}", "JWKS School")
    document = await _jwks(http, f"http://{school.subdomain}.localhost:{identity_port}")
    states = await _states(pool, school.id)
    for alg in keys.ALGORITHMS:
        published = [k for k in document["keys"] if k["alg"] == alg]
        assert {k["kid"] for k in published} == {
            states[(alg, "current")][0],
            states[(alg, "next")][0],
        }
    for jwk in document["keys"]:
        assert jwk["kid"]
        assert jwk["use"] == "sig"
        assert jwk["kty"] == ("EC" if jwk["alg"] == "ES256" else "RSA")
        assert not set(jwk) & PRIVATE_MEMBERS, jwk
    _keyset(document)  # a JWKS a standard library accepts

    # Each school is its own issuer: another school's JWKS shares no key with this one.
    other = await schools.create_school(pool, settings, f"jwko{unique}", "Other School")
    other_doc = await _jwks(http, f"http://{other.subdomain}.localhost:{identity_port}")
    assert len(other_doc["keys"]) == 4
    assert not _kids(document) & _kids(other_doc)


async def test_rotation_overlaps_and_expiry_unpublishes(
    identity_url: str,
    http: Any,
    pool: asyncpg.Pool,
    redis: Any,
    settings: Settings,
    base_env: dict[str, str],
    unique: str,
    identity_port: int,
) -> None:
    """`keys rotate`: next becomes current (it was published before it signs), the old key
    stays published so its tokens still verify, it disappears once expired, and gateways
    are told through the keys stream."""
    school = await schools.create_school(pool, settings, f"rot{unique}", "Rotation School")
    origin = f"http://{school.subdomain}.localhost:{identity_port}"
    before = await _jwks(http, origin)
    states = await _states(pool, school.id)

    signer = await keys.KeyRing(pool, settings).signer(school.id, "ES256")
    assert signer.kid == states[("ES256", "current")][0]
    token = jwt.encode(
        {"alg": "ES256", "kid": signer.kid, "typ": "at+jwt"},
        _access_claims(origin, school.id, school.subdomain),
        signer.key,
    )
    assert jwt.decode(token, _keyset(before), algorithms=["ES256"])

    stream = settings.stream(streams.KEYS)
    mark = await streams.last_id(redis, stream)

    result = await _cli(base_env, "keys", "rotate", "--school", school.subdomain, "--json")
    assert result["school_id"] == school.id
    for alg in keys.ALGORITHMS:
        change = result["keys"][alg]
        assert change["retired"] == states[(alg, "current")][0]
        assert change["current"] == states[(alg, "next")][0]
        assert change["next"] not in _kids(before)
    after_states = await _states(pool, school.id)
    for alg in keys.ALGORITHMS:
        assert after_states[(alg, "current")] == [states[(alg, "next")][0]]
        assert after_states[(alg, "retired")] == [states[(alg, "current")][0]]

    after = await _jwks(http, origin)
    old_kid = signer.kid
    assert _kids(before) < _kids(after), "every key published before is still published"
    assert len(after["keys"]) == 6

    # The token signed before the rotation verifies against the JWKS as served now.
    decoded = jwt.decode(token, _keyset(after), algorithms=["ES256"])
    assert decoded.header["kid"] == old_kid
    assert decoded.claims["school_id"] == school.id

    # A fresh key ring signs with the key that was published as `next` before the rotation.
    fresh = await keys.KeyRing(pool, settings).signer(school.id, "ES256")
    assert fresh.kid == states[("ES256", "next")][0]
    assert fresh.kid in _kids(before)
    new_token = jwt.encode(
        {"alg": "ES256", "kid": fresh.kid, "typ": "at+jwt"},
        _access_claims(origin, school.id, school.subdomain),
        fresh.key,
    )
    # A verifier that cached the JWKS before the rotation already knows the new signing key.
    assert jwt.decode(new_token, _keyset(before), algorithms=["ES256"])

    # Gateways were told to refresh this issuer's keys.
    raw = await redis.xrange(stream, min=f"({mark}", max="+")
    announced = [json.loads(fields[b"data"]) for _, fields in raw]
    ours = [a for a in announced if a.get("school_id") == school.id]
    assert [a["reason"] for a in ours] == ["rotated"]
    assert abs(ours[0]["at"] - time.time()) < 60

    # Once the retired key has expired it is no longer published, and its tokens fail.
    await pool.execute(
        "UPDATE signing_keys SET expires_at = now() - interval '1 second' WHERE kid = $1", old_kid
    )
    expired = await _jwks(http, origin)
    assert old_kid not in _kids(expired)
    assert _kids(expired) == _kids(after) - {old_kid}
    with pytest.raises(JoseError):
        jwt.decode(token, _keyset(expired), algorithms=["ES256"])
