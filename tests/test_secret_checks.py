"""Secrets that are not the database's are a clear error at start, and `make clean && make dev`
keeps working (issue 13, item 6).

Identity, started for real as `loopwise-connect serve identity`, exits 2 before listening when
KEY_ENCRYPTION_KEY does not open the stored signing keys or SECRET_PEPPER is not the pepper the
database was set up with, naming the variable; the CLI commands that seal keys or hash secrets
refuse the same way. The development start path (`services.dev.database.prepare`, what `make
dev` runs before starting the parts) meets a database made with secrets it no longer has and
starts it afresh, but only its own development database and only for new development secrets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from pytest_aiohttp import AiohttpServer

from libs.common import db
from libs.common.config import Settings, load_settings
from libs.common.logging import configure_logging
from services.dev import database
from services.identity import clients, keys, secret_checks, store, users
from services.identity.app import create_app
from tests.support import (
    connect,
    database_env,
    direct_url,
    free_port,
    without_handler_cancellation,
)
from tests.token_helpers import basic, insert_code, pkce_pair, token, verify_with_jwks

CLI = str(Path(sys.executable).with_name("loopwise-connect"))

pytestmark = pytest.mark.timeout(120)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode()


def decoded(value: str) -> bytes:
    return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))


@dataclass(frozen=True)
class Exit:
    code: int
    out: str
    err: str
    # Whether anything ever accepted a connection on the port while the process ran.
    listened: bool


async def port_answers(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def serve_part(part: str, env: dict[str, str], port: int) -> asyncio.subprocess.Process:
    """`loopwise-connect serve <part>` as its own process, its output captured."""
    return await asyncio.create_subprocess_exec(
        CLI,
        "serve",
        part,
        "--port",
        str(port),
        env={**env, "LOG_LEVEL": "info"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _identity(env: dict[str, str], port: int) -> asyncio.subprocess.Process:
    return await serve_part("identity", env, port)


async def refused(env: dict[str, str], part: str = "identity") -> Exit:
    """Run the part with `env` and, while it runs, watch its port: it must exit, never listen.
    One that listens is stopped at once (and the caller's assertions fail)."""
    port = free_port()
    proc = await serve_part(part, env, port)
    listened = False
    communicate = asyncio.ensure_future(proc.communicate())
    deadline = asyncio.get_running_loop().time() + 60
    try:
        while not communicate.done() and not listened:
            listened = await port_answers(port)
            await asyncio.wait({communicate}, timeout=0.02)
            assert asyncio.get_running_loop().time() < deadline, (
                f"{part} neither exited nor listened"
            )
    finally:
        if proc.returncode is None:
            proc.kill()
    out, err = await asyncio.wait_for(communicate, 30)
    assert proc.returncode is not None
    return Exit(proc.returncode, out.decode(), err.decode(), listened)


@contextlib.asynccontextmanager
async def serving(env: dict[str, str], part: str = "identity") -> AsyncIterator[int]:
    """The part started for real and ready on its port; stopped (SIGTERM) afterwards."""
    port = free_port()
    proc = await serve_part(part, env, port)
    try:
        for _ in range(600):
            if proc.returncode is not None:
                _, err = await proc.communicate()
                raise AssertionError(f"{part} exited {proc.returncode}: {err.decode()}")
            if await port_answers(port):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"{part} never listened")
        yield port
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.communicate(), 30)


def _assert_configuration_error(run: Exit, variable: str, other: str) -> None:
    assert run.code == 2, run.err
    assert not run.listened
    # Stopped before listening: the service never logged that it listens.
    assert '"listening"' not in run.err
    assert f"configuration error: {variable}: " in run.err, run.err
    assert other not in run.err
    assert "Traceback" not in run.err


async def test_identity_refuses_to_start_with_another_key_encryption_key(
    identity_url: str, base_env: dict[str, str]
) -> None:
    """Another KEY_ENCRYPTION_KEY (random, or the right one with one bit flipped, in either
    base64 alphabet) stops identity with exit 2 before it listens, naming the variable and
    what to do, and not a word of either key; the right key in the other base64 alphabet,
    unpadded, starts."""
    right = decoded(base_env["KEY_ENCRYPTION_KEY"])
    flipped = bytes([right[0] ^ 0x01]) + right[1:]
    wrong_keys = [
        b64(secrets.token_bytes(32)),
        b64(flipped),
        base64.b64encode(flipped).decode().rstrip("="),
    ]
    runs = await asyncio.gather(
        *(refused({**base_env, "KEY_ENCRYPTION_KEY": key}) for key in wrong_keys)
    )
    for key, run in zip(wrong_keys, runs, strict=True):
        _assert_configuration_error(run, "KEY_ENCRYPTION_KEY", "SECRET_PEPPER")
        assert "does not open the signing keys stored in the database" in run.err
        assert "start with the KEY_ENCRYPTION_KEY" in run.err
        assert key not in run.err and key.rstrip("=") not in run.err
        assert base_env["KEY_ENCRYPTION_KEY"].rstrip("=") not in run.err

    spelled_otherwise = base64.b64encode(right).decode().rstrip("=")
    async with serving({**base_env, "KEY_ENCRYPTION_KEY": spelled_otherwise}) as port:
        assert await port_answers(port)


async def test_identity_refuses_to_start_with_another_pepper(
    identity_url: str, base_env: dict[str, str]
) -> None:
    """SECRET_PEPPER other than the one the database was set up with (its check value was
    recorded by the first identity): exit 2 before listening, naming SECRET_PEPPER."""
    right = decoded(base_env["SECRET_PEPPER"])
    wrong_peppers = [b64(secrets.token_bytes(32)), b64(right[:-1] + bytes([right[-1] ^ 0x80]))]
    runs = await asyncio.gather(
        *(refused({**base_env, "SECRET_PEPPER": pepper}) for pepper in wrong_peppers)
    )
    for pepper, run in zip(wrong_peppers, runs, strict=True):
        _assert_configuration_error(run, "SECRET_PEPPER", "KEY_ENCRYPTION_KEY")
        assert "start with the SECRET_PEPPER this database was set up with" in run.err
        assert pepper not in run.err


async def _cli(env: dict[str, str], *args: str, cwd: Path | None = None) -> Exit:
    proc = await asyncio.create_subprocess_exec(
        CLI,
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            # SIGTERM, not SIGKILL: a `dev` that went on to start the parts stops them first.
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 40)
    assert proc.returncode is not None
    return Exit(proc.returncode, out.decode(), err.decode(), listened=False)


async def test_cli_commands_refuse_secrets_that_are_not_the_databases(
    identity_url: str,
    base_env: dict[str, str],
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
) -> None:
    """`keys rotate` and `schools create` with another KEY_ENCRYPTION_KEY, `clients create`
    with another SECRET_PEPPER: exit 2 naming the variable, and nothing sealed or hashed under
    the wrong secret is stored; with the right secrets the same commands work."""
    subdomain = f"sc{unique}"
    made = await _cli(base_env, "schools", "create", "--subdomain", subdomain, "--name", "S")
    assert made.code == 0, made.err
    school = await store.school_by_subdomain(pool, subdomain)
    assert school is not None
    kids_before = {k.kid for k in await store.keys_of_issuer(pool, school.id)}

    other_kek = {**base_env, "KEY_ENCRYPTION_KEY": b64(secrets.token_bytes(32))}
    other_pepper = {**base_env, "SECRET_PEPPER": b64(secrets.token_bytes(32))}
    rotate, create_school, create_client = await asyncio.gather(
        _cli(other_kek, "keys", "rotate", "--school", subdomain, "--json"),
        _cli(other_kek, "schools", "create", "--subdomain", f"{subdomain}x", "--name", "X"),
        _cli(
            other_pepper,
            *("clients", "create", "--school", subdomain, "--name", "Wrong Pepper App"),
            *("--redirect-uri", "https://app.example/cb", "--json"),
        ),
    )
    for run, variable in (
        (rotate, "KEY_ENCRYPTION_KEY"),
        (create_school, "KEY_ENCRYPTION_KEY"),
        (create_client, "SECRET_PEPPER"),
    ):
        assert run.code == 2, run.out + run.err
        assert f"configuration error: {variable}: " in run.err
        assert "Traceback" not in run.err
        assert "lcs_" not in run.out + run.err
    assert {k.kid for k in await store.keys_of_issuer(pool, school.id)} == kids_before
    assert await store.school_by_subdomain(pool, f"{subdomain}x") is None
    assert not [
        c for c in await store.list_clients(pool, school.id) if c.name == "Wrong Pepper App"
    ]

    rotated = await _cli(base_env, "keys", "rotate", "--school", subdomain, "--json")
    assert rotated.code == 0, rotated.err
    assert json.loads(rotated.out)["keys"]["ES256"]["retired"] in kids_before
    signer = await keys.KeyRing(pool, settings).signer(school.id, "ES256")
    assert signer.kid == json.loads(rotated.out)["keys"]["ES256"]["current"]


@pytest.fixture
async def fresh_database(base_env: dict[str, str], run_id: str) -> AsyncIterator[str]:
    """A database of its own on the test server, dropped afterwards."""
    url = urlunsplit(
        urlsplit(base_env["DATABASE_URL"])._replace(path=f"/{run_id}_sc_{secrets.token_hex(4)}")
    )
    yield url
    await db.drop_database(url)


async def _waiting_for_an_advisory_lock(conn: asyncpg.Connection) -> int:
    value: int = await conn.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    return value


async def test_two_identities_starting_at_once_on_an_empty_database(
    base_env: dict[str, str], fresh_database: str
) -> None:
    """Two identities with different keys start at once on a database that holds no key yet:
    one starts, the other refuses, rather than both starting with the platform's keys sealed
    under one of them. The platform issuer's key lock is held until each has either exited or
    come to wait for it, so both pass the look at the (still empty) signing keys before either
    makes one, every time. The same with the same key and different peppers."""
    env = {**base_env, **database_env(base_env, fresh_database)}
    for variable in ("KEY_ENCRYPTION_KEY", "SECRET_PEPPER"):
        await db.drop_database(fresh_database)
        await db.migrate(fresh_database)
        envs = [{**env, variable: b64(secrets.token_bytes(32))} for _ in range(2)]
        ports = [free_port(), free_port()]
        holder = await connect(fresh_database)
        try:
            hold = holder.transaction()
            await hold.start()
            await holder.execute("SELECT pg_advisory_xact_lock(hashtext('signing_keys'), 0)")
            procs = [await _identity(e, p) for e, p in zip(envs, ports, strict=True)]
            for _ in range(600):
                exited = [proc for proc in procs if proc.returncode is not None]
                if len(exited) + await _waiting_for_an_advisory_lock(holder) == 2:
                    break
                await asyncio.sleep(0.05)
            await hold.rollback()
        finally:
            await holder.close()
        try:
            ready: list[int] = []
            for _ in range(600):
                ready = [p for p in ports if await port_answers(p)]
                exited = [proc for proc in procs if proc.returncode is not None]
                if len(ready) + len(exited) == 2:
                    break
                await asyncio.sleep(0.05)
            assert len(ready) == 1, variable
            assert len(exited) == 1, variable
            _, err = await exited[0].communicate()
            assert exited[0].returncode == 2, err.decode()
            assert f"configuration error: {variable}: " in err.decode()
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.communicate(), 30)
        # The one that started is the one whose key sealed the platform's keys.
        winner = envs[procs.index(next(p for p in procs if p.returncode != 2))]
        conn = await connect(fresh_database)
        try:
            await secret_checks.verify(conn, load_settings(winner))
            loser = load_settings(envs[1 - envs.index(winner)])
            with pytest.raises(secret_checks.SecretMismatch) as caught:
                await secret_checks.verify(conn, loser)
            assert caught.value.variable == variable
        finally:
            await conn.close()


async def test_one_damaged_key_does_not_stop_a_start_that_a_wrong_key_does(
    base_env: dict[str, str], fresh_database: str
) -> None:
    """A key row whose sealed half was damaged (copied from another row) is that issuer's
    trouble, not a wrong KEY_ENCRYPTION_KEY: the check still passes with the right key, and
    still refuses another key."""
    await db.migrate(fresh_database)
    settings = load_settings({**base_env, **database_env(base_env, fresh_database)})
    pool = await db.create_pool(settings=settings, min_size=1, max_size=2)
    try:
        await secret_checks.verify(pool, settings)
        school = await store.insert_school(pool, "damaged", "Damaged School", None)
        await keys.ensure_issuer_keys(pool, settings, school.id)
        for state in ("current", "next"):
            await pool.execute(
                "UPDATE signing_keys SET private_key_enc = (SELECT private_key_enc"
                " FROM signing_keys WHERE school_id = $1 AND alg = 'RS256' AND state = $2)"
                " WHERE school_id = $1 AND alg = 'ES256' AND state = $2",
                school.id,
                state,
            )
        await secret_checks.verify(pool, settings)
        other = load_settings(
            {
                **base_env,
                **database_env(base_env, fresh_database),
                "KEY_ENCRYPTION_KEY": b64(b"k" * 32),
            }
        )
        with pytest.raises(secret_checks.SecretMismatch) as caught:
            await secret_checks.verify(pool, other)
        assert caught.value.variable == "KEY_ENCRYPTION_KEY"
    finally:
        await pool.close()


# Development ------------------------------------------------------------------------------------


@pytest.fixture
async def dev_database(base_env: dict[str, str], run_id: str) -> AsyncIterator[str]:
    """The development database of these tests: on the test server, dropped afterwards."""
    url = urlunsplit(
        urlsplit(base_env["DATABASE_URL"])._replace(path=f"/{run_id}_dev_{secrets.token_hex(4)}")
    )
    yield url
    await db.drop_database(url)


def _dev_env(
    base_env: dict[str, str], database_url: str, data_dir: Path, port: int
) -> dict[str, str]:
    """What `make dev` runs with: no secret given, the generated ones in data_dir."""
    return {
        "CONNECT_ENV": "development",
        **database_env(base_env, database_url),
        "REDIS_URL": base_env["REDIS_URL"],
        "REDIS_KEY_PREFIX": f"{base_env['REDIS_KEY_PREFIX']}dev{secrets.token_hex(3)}:",
        "CONNECT_DEV_SECRETS": str(data_dir / "dev-secrets"),
        "PUBLIC_URL_TEMPLATE": f"http://{{school}}.localhost:{port}",
        "PLATFORM_URL": f"http://localhost:{port}",
        "IDENTITY_PORT": str(port),
        "LOG_LEVEL": "warning",
        "DB_POOL_MIN": "1",
        "DB_POOL_MAX": "5",
    }


async def _demo_kids(database_url: str) -> set[str]:
    conn = await connect(direct_url(database_url))
    try:
        rows = await conn.fetch("SELECT kid FROM signing_keys WHERE school_id = 42")
    finally:
        await conn.close()
    return {r["kid"] for r in rows}


async def test_make_clean_then_make_dev_works_on_the_same_postgresql(
    base_env: dict[str, str],
    dev_database: str,
    tmp_path: Path,
    http: Any,
    capsys: pytest.CaptureFixture[str],
    aiohttp_server: AiohttpServer,
) -> None:
    """`make dev`, `make clean` (the secrets and logins under .data/ go, the database on the
    local PostgreSQL stays), `make dev` again: the second start finds the database made under
    the lost secrets, starts it afresh, and identity then starts and exchanges tokens (both
    signing algorithms) for the demo school with the printed admin login."""
    configure_logging("warning")
    port = free_port()
    data_dir = tmp_path / ".data"
    env = _dev_env(base_env, dev_database, data_dir, port)

    first = load_settings(env)
    assert first.dev_secrets == data_dir / "dev-secrets"
    await database.prepare(first, own_database=True, logins_file=data_dir / "dev-logins.json")
    old_kids = await _demo_kids(dev_database)
    assert len(old_kids) == 4
    assert "afresh" not in capsys.readouterr().out

    shutil.rmtree(data_dir)  # make clean
    second = load_settings(env)
    assert second.key_encryption_key != first.key_encryption_key
    logins = await database.prepare(
        second, own_database=True, logins_file=data_dir / "dev-logins.json"
    )
    printed = capsys.readouterr().out
    new_kids = await _demo_kids(dev_database)

    server = await aiohttp_server(
        create_app(second), port=port, access_log=None, shutdown_timeout=2
    )
    async with without_handler_cancellation(server):  # stopped before the third start below
        pool = await db.create_pool(settings=second, min_size=1, max_size=2)
        try:
            demo = await store.school_by_subdomain(pool, "demo")
            assert demo is not None and demo.id == 42
            admin = next(login for login in logins if login.school == "demo")
            user = await users.authenticate(pool, admin.email, admin.password)
            assert user is not None
            made = await clients.create_client(
                pool,
                second,
                school=demo,
                name="After make clean",
                redirect_uris=["https://app.example.com/callback"],
                scopes=["openid", "courses:read"],
                grant_types=["authorization_code", "client_credentials"],
            )
            assert made.client_secret is not None
            origin = f"http://demo.localhost:{port}"
            auth = basic(made.client.id, made.client_secret)

            machine = await token(
                http, origin, {"grant_type": "client_credentials"}, authorization=auth
            )
            assert machine.status == 200, machine.body
            header, claims = await verify_with_jwks(http, origin, machine.body["access_token"])
            assert header["alg"] == "ES256" and header["kid"] in new_kids
            assert claims["school_id"] == 42

            verifier, challenge = pkce_pair()
            code, _ = await insert_code(
                pool,
                second,
                school_id=42,
                client_id=made.client.id,
                user_id=user.id,
                scopes=["openid", "courses:read"],
                challenge=challenge,
            )
            exchanged = await token(
                http,
                origin,
                {
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": "https://app.example.com/callback",
                    "code_verifier": verifier,
                },
                authorization=auth,
            )
            assert exchanged.status == 200, exchanged.body
            id_header, id_claims = await verify_with_jwks(http, origin, exchanged.body["id_token"])
            assert id_header["alg"] == "RS256" and id_claims["sub"] == str(user.id)
        finally:
            await pool.close()

    # The second start said what it did, and the keys are all new.
    assert "starting it afresh (development data only)" in printed
    assert str(data_dir / "dev-secrets") in printed
    assert len(new_kids) == 4 and not new_kids & old_kids
    # A third start with the same secrets changes nothing.
    await database.prepare(second, own_database=True, logins_file=data_dir / "dev-logins.json")
    assert await _demo_kids(dev_database) == new_kids
    assert "afresh" not in capsys.readouterr().out


async def test_dev_starts_afresh_only_its_own_database_for_new_secrets(
    base_env: dict[str, str], dev_database: str, tmp_path: Path
) -> None:
    """Nothing else is dropped: secrets already used with the database (this checkout's, when
    another checkout's `make dev` took the shared database since), secrets given in the
    environment, and a database named by DATABASE_URL are refused with exit 2 and the
    database is left as it was."""
    configure_logging("warning")
    port = free_port()
    mine = _dev_env(base_env, dev_database, tmp_path / "mine", port)
    theirs = _dev_env(base_env, dev_database, tmp_path / "theirs", port)
    await database.prepare(
        load_settings(mine), own_database=True, logins_file=tmp_path / "mine" / "logins.json"
    )
    # Another checkout with its own new secrets takes the shared development database.
    await database.prepare(
        load_settings(theirs), own_database=True, logins_file=tmp_path / "theirs" / "logins.json"
    )
    kids = await _demo_kids(dev_database)

    with pytest.raises(secret_checks.SecretMismatch) as caught:
        await database.prepare(
            load_settings(mine), own_database=True, logins_file=tmp_path / "mine" / "logins.json"
        )
    assert caught.value.variable == "KEY_ENCRYPTION_KEY"
    assert str(tmp_path / "mine" / "dev-secrets") in caught.value.problem
    assert await _demo_kids(dev_database) == kids

    # Secrets given in the environment (not generated) are never a reason to drop anything.
    given = {
        **_dev_env(base_env, dev_database, tmp_path / "given", port),
        "KEY_ENCRYPTION_KEY": b64(secrets.token_bytes(32)),
        "SECRET_PEPPER": b64(secrets.token_bytes(32)),
    }
    assert load_settings(given).dev_secrets is None
    with pytest.raises(secret_checks.SecretMismatch):
        await database.prepare(
            load_settings(given), own_database=True, logins_file=tmp_path / "given.json"
        )
    assert await _demo_kids(dev_database) == kids

    # `make dev` with DATABASE_URL given, new development secrets: refused, nothing dropped,
    # nothing started.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = await _cli(
        {
            **_dev_env(base_env, dev_database, elsewhere / ".data", port),
            "GATEWAY_PORT": str(free_port()),
            "SCHOOL_API_PORT": str(free_port()),
            "WEBHOOKS_PORT": str(free_port()),
        },
        "dev",
        cwd=elsewhere,
    )
    assert run.code == 2, run.out + run.err
    assert "configuration error: KEY_ENCRYPTION_KEY: " in run.err
    assert "afresh" not in run.out
    assert "Traceback" not in run.err
    assert await _demo_kids(dev_database) == kids
    assert not _port_listened(port)


def _port_listened(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


async def test_dev_leaves_a_database_in_use_alone(
    base_env: dict[str, str], dev_database: str, tmp_path: Path
) -> None:
    """New development secrets meet the development database while another process is
    connected to it (another checkout's `make dev` still running): it is not dropped from
    under that process; the start stops with an error saying so."""
    configure_logging("warning")
    port = free_port()
    first = _dev_env(base_env, dev_database, tmp_path / "first", port)
    await database.prepare(
        load_settings(first), own_database=True, logins_file=tmp_path / "first" / "logins.json"
    )
    kids = await _demo_kids(dev_database)
    other = await connect(dev_database)
    try:
        # Using it: through a transaction pooler, a client that has run nothing holds no
        # session on the server, and nothing on the server can tell it is there.
        assert await other.fetchval("SELECT 1") == 1
        renewed = _dev_env(base_env, dev_database, tmp_path / "renewed", port)
        with pytest.raises(RuntimeError, match=r"in use by another process"):
            await database.prepare(
                load_settings(renewed),
                own_database=True,
                logins_file=tmp_path / "renewed" / "logins.json",
            )
        assert await other.fetchval("SELECT 1") == 1
    finally:
        await other.close()
    assert await _demo_kids(dev_database) == kids
