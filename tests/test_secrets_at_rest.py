"""Secrets at rest: what a stolen database dump holds is useless without the KEK and pepper."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from argon2 import PasswordHasher
from argon2.exceptions import VerifyMismatchError
from cryptography.exceptions import InvalidTag
from joserfc.jwk import ECKey, RSAKey

from libs.common.config import Settings
from services.identity import keys, schools

CLI = str(Path(sys.executable).with_name("loopwise-connect"))


async def _cli(env: dict[str, str], *args: str) -> tuple[dict[str, Any], str]:
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
    return result, err.decode()


@pytest.fixture(scope="module")
async def stored(
    pool: asyncpg.Pool, settings: Settings, base_env: dict[str, str]
) -> dict[str, Any]:
    """A school, a user made by the CLI with a known password, a confidential client."""
    unique = secrets.token_hex(4)
    school = await schools.create_school(pool, settings, f"rest{unique}", "At Rest School")
    password = f"Correct-Horse-{secrets.token_urlsafe(12)}"
    email = f"rest-{unique}@example.com"
    (user, user_err), (client, client_err) = await asyncio.gather(
        _cli(
            base_env,
            "users",
            "create",
            "--school",
            school.subdomain,
            "--email",
            email,
            "--password",
            password,
            "--json",
        ),
        _cli(
            base_env,
            "clients",
            "create",
            "--school",
            school.subdomain,
            "--name",
            "At Rest App",
            "--redirect-uri",
            "https://rest.example/cb",
            "--json",
        ),
    )
    secret = client["client_secret"]
    # The CLI's own logs (stderr) never carry what it was given or what it made.
    assert password not in user_err
    assert secret not in client_err
    return {
        "school": school,
        "password": password,
        "user_id": user["user_id"],
        "client_id": client["client_id"],
        "client_secret": secret,
    }


async def test_password_is_an_argon2id_hash(pool: asyncpg.Pool, stored: dict[str, Any]) -> None:
    """users.password_hash is an argon2id PHC string of the password, never the password."""
    stored_hash = await pool.fetchval(
        "SELECT password_hash FROM users WHERE id = $1::uuid", stored["user_id"]
    )
    assert stored_hash.startswith("$argon2id$")
    assert stored["password"] not in stored_hash
    # Memory and passes at least OWASP's argon2id floor (19 MiB, 2 passes).
    params = dict(p.split("=") for p in stored_hash.split("$")[3].split(","))
    assert int(params["m"]) >= 19 * 1024
    assert int(params["t"]) >= 2
    hasher = PasswordHasher()
    assert hasher.verify(stored_hash, stored["password"])
    with pytest.raises(VerifyMismatchError):
        hasher.verify(stored_hash, stored["password"] + "x")


async def test_client_secret_is_a_keyed_hash(
    pool: asyncpg.Pool, settings: Settings, stored: dict[str, Any]
) -> None:
    """clients.secret_hash is HMAC-SHA256 under the pepper: 32 bytes, not the secret."""
    secret = stored["client_secret"]
    secret_hash = await pool.fetchval(
        "SELECT secret_hash FROM clients WHERE id = $1", stored["client_id"]
    )
    assert isinstance(secret_hash, bytes)
    assert len(secret_hash) == 32
    assert secret.encode() not in secret_hash
    assert secret_hash == hmac.new(settings.secret_pepper, secret.encode(), hashlib.sha256).digest()
    # Without the pepper the hash is not even a plain SHA-256 of the secret.
    assert secret_hash != hashlib.sha256(secret.encode()).digest()


async def test_no_row_holds_a_secret_or_a_private_key(
    pool: asyncpg.Pool, stored: dict[str, Any]
) -> None:
    """No column of any row of any table (clients, users, signing_keys and the rest) holds
    the secret, the password or a PEM key, as text or as raw bytes."""
    tables = [
        (r["table_schema"], r["table_name"])
        for r in await pool.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
            " AND table_type = 'BASE TABLE'"
        )
    ]
    assert {("public", t) for t in ("clients", "users", "signing_keys")} <= set(tables)
    needles = [stored["client_secret"], stored["password"], "-----BEGIN", "PRIVATE KEY"]
    # Each needle as text, as the hex a bytea shows, and as base64 a careless store might use.
    forms = {
        n: (n, n.encode().hex(), base64.b64encode(n.encode()).decode().rstrip("=")) for n in needles
    }
    rows_seen = 0
    for schema, table in tables:
        # Identifiers come from the catalogue, quoted; never from input.
        rows = await pool.fetch(f'SELECT t::text AS row FROM "{schema}"."{table}" t')
        rows_seen += len(rows)
        for r in rows:
            text = r["row"]
            for needle, spellings in forms.items():
                for spelling in spellings:
                    assert spelling not in text, f"{table} holds {needle[:10]}..."
    assert rows_seen > 0


async def test_private_keys_are_sealed_to_kek_and_kid(
    pool: asyncpg.Pool, settings: Settings, stored: dict[str, Any]
) -> None:
    """signing_keys.private_key_enc opens only with our KEK and only under its own kid."""
    rows = await pool.fetch(
        "SELECT kid, alg, public_jwk, private_key_enc FROM signing_keys WHERE school_id = $1",
        stored["school"].id,
    )
    assert len(rows) == 4
    kek = settings.key_encryption_key
    other_kek = secrets.token_bytes(32)
    for index, row in enumerate(rows):
        pem = keys.unseal(kek, row["kid"], row["private_key_enc"])
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----")
        key = RSAKey.import_key(pem) if row["alg"] == "RS256" else ECKey.import_key(pem)
        # The sealed key is the private half of the published key with that kid.
        assert key.thumbprint() == row["kid"]
        assert key.as_dict(private=False).items() <= row["public_jwk"].items()

        with pytest.raises(InvalidTag):
            keys.unseal(other_kek, row["kid"], row["private_key_enc"])
        moved_to = rows[(index + 1) % len(rows)]["kid"]
        with pytest.raises(InvalidTag):
            keys.unseal(kek, moved_to, row["private_key_enc"])


async def test_swapped_sealed_keys_do_not_sign(
    pool: asyncpg.Pool, settings: Settings, unique: str
) -> None:
    """A sealed private key copied onto another key's row does not open there: no signing."""
    school = await schools.create_school(pool, settings, f"swap{unique}", "Swap School")
    current, upcoming = [
        await pool.fetchval(
            "SELECT kid FROM signing_keys WHERE school_id = $1 AND alg = 'ES256' AND state = $2",
            school.id,
            state,
        )
        for state in ("current", "next")
    ]
    await pool.execute(
        "UPDATE signing_keys SET private_key_enc ="
        " (SELECT private_key_enc FROM signing_keys WHERE kid = $2) WHERE kid = $1",
        current,
        upcoming,
    )
    with pytest.raises(InvalidTag):
        await keys.KeyRing(pool, settings).signer(school.id, "ES256")
