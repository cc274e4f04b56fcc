"""The `loopwise-connect` CLI, run as a real process: schools, users, clients, `--json`."""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import asyncpg
import pytest

from libs.common import db
from libs.common.config import Settings
from services.identity import clients, credentials, store, users
from tests.support import database_env

CLI = str(Path(sys.executable).with_name("loopwise-connect"))


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> dict[str, Any]:
        """stdout is exactly one JSON object on one line: nothing else shares it."""
        lines = self.out.splitlines()
        assert len(lines) == 1, self.out
        value = json.loads(lines[0])
        assert isinstance(value, dict)
        return value


async def _cli(env: dict[str, str], *args: str) -> Run:
    proc = await asyncio.create_subprocess_exec(
        CLI,
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


@pytest.fixture(scope="module")
async def school(base_env: dict[str, str], pool: asyncpg.Pool) -> dict[str, Any]:
    """A school made by `schools create --id`: the other tests of this file work in it.

    `pool` is asked for so the run's database is migrated (and dropped) by its fixture.
    """
    subdomain = f"cli{secrets.token_hex(4)}"
    school_id = 5_000_000 + secrets.randbelow(1_000_000_000)
    run = await _cli(
        base_env,
        "schools",
        "create",
        "--subdomain",
        subdomain,
        "--name",
        "CLI Academy",
        "--id",
        str(school_id),
        "--json",
    )
    assert run.code == 0, run.err
    return run.json()


async def test_school_round_trip(
    school: dict[str, Any], base_env: dict[str, str], pool: asyncpg.Pool, settings: Settings
) -> None:
    """A created school is in `schools list` and the database, with the id asked for; a
    second one with the same subdomain is refused with exit 1 and a JSON error."""
    assert school["name"] == "CLI Academy"
    assert school["issuer"] == settings.urls.school_origin(school["subdomain"])
    row = await store.school_by_subdomain(pool, school["subdomain"])
    assert row is not None
    assert (row.id, row.name) == (school["school_id"], "CLI Academy")

    duplicate, listed = await asyncio.gather(
        _cli(
            base_env,
            "schools",
            "create",
            "--subdomain",
            school["subdomain"],
            "--name",
            "Impostor",
            "--json",
        ),
        _cli(base_env, "schools", "list", "--json"),
    )
    assert listed.code == 0, listed.err
    entries = [s for s in listed.json()["schools"] if s["subdomain"] == school["subdomain"]]
    assert entries == [
        {"school_id": school["school_id"], "subdomain": school["subdomain"], "name": "CLI Academy"}
    ]
    assert duplicate.code == 1, duplicate.err
    assert isinstance(duplicate.json()["error"], str)
    assert duplicate.json()["error"]
    # The refusal changed nothing: still one school by that subdomain, with its first name.
    after = [s for s in await store.list_schools(pool) if s.subdomain == school["subdomain"]]
    assert [(s.id, s.name) for s in after] == [(school["school_id"], "CLI Academy")]


async def test_user_can_authenticate(
    school: dict[str, Any], base_env: dict[str, str], pool: asyncpg.Pool, unique: str
) -> None:
    """`users create` makes an account that signs in with exactly that password, with its
    role at the school, and never echoes the password."""
    email = f"Admin-{unique}@Example.com"
    password = f"pw-{secrets.token_urlsafe(12)}"
    run = await _cli(
        base_env,
        "users",
        "create",
        "--school",
        school["subdomain"],
        "--email",
        email,
        "--password",
        password,
        "--name",
        "Ada Admin",
        "--role",
        "admin",
        "--json",
    )
    assert run.code == 0, run.err
    result = run.json()
    assert password not in run.out
    assert password not in run.err
    user_id = UUID(result["user_id"])
    assert result["created"] is True

    user = await users.authenticate(pool, email, password)
    assert user is not None
    assert user.id == user_id
    assert user.name == "Ada Admin"
    # Email matching ignores case; the password does not.
    assert await users.authenticate(pool, email.lower(), password) is not None
    assert await users.authenticate(pool, email, password + "x") is None
    assert await users.authenticate(pool, email, password.upper()) is None
    assert await store.membership_role(pool, school["school_id"], user_id) == "admin"


async def test_client_creation(
    school: dict[str, Any], base_env: dict[str, str], pool: asyncpg.Pool, settings: Settings
) -> None:
    """A confidential client's secret is printed once and verifies; a public client gets none;
    admin scopes and non-loopback http redirect URIs are refused with nothing stored."""
    clients_before = len(await store.list_clients(pool, school["school_id"]))
    common = ("clients", "create", "--school", school["subdomain"], "--json")
    confidential, public, admin_scope, evil_redirect = await asyncio.gather(
        _cli(
            base_env,
            *common,
            "--name",
            "Partner App",
            "--redirect-uri",
            "https://a.example/cb",
            "--redirect-uri",
            "http://127.0.0.1/cb",
            "--scope",
            "courses:read students:read",
            "--origin",
            "https://a.example",
        ),
        _cli(
            base_env,
            *common,
            "--name",
            "Mobile App",
            "--public",
            "--redirect-uri",
            "http://127.0.0.1/cb",
            "--scope",
            "courses:read",
        ),
        _cli(
            base_env,
            *common,
            "--name",
            "Greedy App",
            "--redirect-uri",
            "https://a.example/cb",
            "--scope",
            "admin:read",
        ),
        _cli(
            base_env,
            *common,
            "--name",
            "Evil App",
            "--redirect-uri",
            "http://evil.example/cb",
        ),
    )

    assert confidential.code == 0, confidential.err
    made = confidential.json()
    secret = made["client_secret"]
    assert secret.startswith(credentials.CLIENT_SECRET_PREFIX)
    assert secret not in confidential.err
    assert made["token_endpoint_auth_method"] == "client_secret_basic"
    assert made["redirect_uris"] == ["https://a.example/cb", "http://127.0.0.1/cb"]
    assert made["scope"] == "courses:read students:read"
    assert made["allowed_origins"] == ["https://a.example"]
    assert made["school_id"] == school["school_id"]
    row = await store.client_by_id(pool, made["client_id"])
    assert row is not None
    assert row.school_id == school["school_id"]
    assert credentials.matches(settings.secret_pepper, secret, row.secret_hash)

    assert public.code == 0, public.err
    public_made = public.json()
    assert "client_secret" not in public_made
    assert public_made["token_endpoint_auth_method"] == "none"
    public_row = await store.client_by_id(pool, public_made["client_id"])
    assert public_row is not None
    assert public_row.secret_hash is None

    for refused, why in ((admin_scope, "admin"), (evil_redirect, "redirect")):
        assert refused.code == 1, refused.out + refused.err
        assert why in refused.json()["error"]
    clients_after = await store.list_clients(pool, school["school_id"])
    assert len(clients_after) == clients_before + 2
    assert {c.name for c in clients_after} >= {"Partner App", "Mobile App"}
    assert not {"Greedy App", "Evil App"} & {c.name for c in clients_after}


async def test_unknown_school_is_an_error(base_env: dict[str, str], unique: str) -> None:
    """A command naming a school that does not exist exits 1 with a JSON error."""
    run = await _cli(
        base_env,
        "users",
        "create",
        "--school",
        f"nosuch{unique}",
        "--email",
        f"x-{unique}@example.com",
        "--password",
        "long-enough-password",
        "--json",
    )
    assert run.code == 1
    assert f"nosuch{unique}" in run.json()["error"]


async def test_json_goes_to_stdout_and_logs_to_stderr(
    base_env: dict[str, str], settings: Settings, run_id: str
) -> None:
    """With logging on, `migrate --json` prints one JSON object on stdout; every log line
    (one per applied migration) is JSON on stderr."""
    name = f"{run_id}_cli_{secrets.token_hex(4)}"
    dsn = urlunsplit(urlsplit(settings.database_url)._replace(path=f"/{name}"))
    try:
        run = await _cli(
            {**base_env, **database_env(base_env, dsn), "LOG_LEVEL": "debug"},
            "migrate",
            "--json",
        )
    finally:
        await db.drop_database(dsn)
    assert run.code == 0, run.err
    applied = run.json()["applied"]
    assert applied == [f"{m.component}/{m.name}" for m in db.discover_migrations()]
    logs = [json.loads(line) for line in run.err.splitlines()]
    logged = [entry["migration"] for entry in logs if entry.get("event") == "migration_applied"]
    assert logged == applied


async def test_lowering_a_role_ends_the_grants_it_no_longer_allows(
    school: dict[str, Any],
    base_env: dict[str, str],
    pool: asyncpg.Pool,
    redis: Any,
    settings: Settings,
    unique: str,
) -> None:
    """`users create` for an existing account with a lower role: the grants beyond the new
    role are revoked at once (marked for the gateways), the ones within it stay."""
    from tests.token_helpers import revocation_marked

    email = f"demoted-{unique}@example.com"
    made, _ = await users.create_user(
        pool, school_id=school["school_id"], email=email, password="pw-" + unique, role="admin"
    )
    made_client = await clients.create_client(
        pool,
        settings,
        school=await store.school_by_id(pool, school["school_id"]),
        name="Roster",
        redirect_uris=["https://roster.example/cb"],
        public=True,
        scopes=["events:read", "students:read"],
    )

    async def grant(*scopes: str) -> UUID:
        made_grant = await store.insert_grant(
            pool,
            school_id=school["school_id"],
            client_id=made_client.client.id,
            user_id=made.id,
            scopes=scopes,
        )
        return made_grant.id

    wide = await grant("students:read")
    narrow = await grant("openid", "events:read")

    run = await _cli(
        base_env,
        "users",
        "create",
        "--school",
        school["subdomain"],
        "--email",
        email,
        "--password",
        "whatever-" + unique,
        "--role",
        "member",
        "--json",
    )
    assert run.code == 0, run.err
    assert run.json()["revoked_grants"] == 1
    assert await store.membership_role(pool, school["school_id"], made.id) == "member"
    live = {g.id for g in await store.active_grants_of(pool, user_id=made.id)}
    assert live == {narrow}
    assert await revocation_marked(redis, settings, wide) == (True, True)
