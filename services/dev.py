"""`loopwise-connect dev` (what `make dev` runs): the whole system on one machine.

It finds PostgreSQL and Redis (DATABASE_URL/REDIS_URL, else the default local ports, else it
starts local ones under `.data/`), migrates, seeds the demo schools, starts every part as its
own process, waits until each is ready, prints the URLs and the admin logins, and on Ctrl-C
stops everything it started.

The development secrets (`.data/dev-secrets`, generated) and the development database must
agree, or every token request fails: `make clean` removes the secrets while a PostgreSQL on the
default port keeps the database, and two checkouts share that database. So the secrets file
notes the databases it was used with (`dev-secrets.databases`), and when new secrets meet the
development database holding data made under others, that database is started afresh.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from libs.common import db
from libs.common.config import Settings, load_settings
from libs.common.logging import get_logger
from services import localstores, seed
from services.identity import secret_checks

log = get_logger(__name__)

DATA_DIR = Path(".data")


@dataclass(frozen=True, slots=True)
class Part:
    name: str
    port: int


def parts(settings: Settings) -> list[Part]:
    """The processes to run; the gateway is the public origin (port 8080) in front of the rest."""
    return [
        Part("identity", settings.ports.identity),
        Part("school-api", settings.ports.school_api),
        Part("webhooks", settings.ports.webhooks),
        Part("gateway", settings.ports.gateway),
    ]


def _spawn(part: Part, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", part.name, "--port", str(part.port)],
        env=env,
        # A terminal Ctrl-C reaches the whole process group; children get SIGTERM from us so
        # that they finish their in-flight requests in order.
        start_new_session=True,
    )


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _wait_ready(
    children: dict[str, subprocess.Popen[bytes]], all_parts: list[Part], timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    pending = {p.name: p.port for p in all_parts}
    while pending:
        for name, port in list(pending.items()):
            if children[name].poll() is not None:
                raise RuntimeError(f"{name} exited with code {children[name].returncode}")
            if _ready(port):
                del pending[name]
        if time.monotonic() > deadline:
            raise RuntimeError(f"not ready after {timeout:.0f}s: {', '.join(pending)}")
        time.sleep(0.1)


def _banner(settings: Settings, logins: list[seed.Login], started: float) -> str:
    urls = settings.urls
    lines = [
        "",
        f"Loopwise Connect is running (ready in {time.monotonic() - started:.1f}s).",
        "",
        f"  platform        {urls.platform_url}",
    ]
    for login in logins:
        origin = urls.school_origin(login.school)
        lines.append(f"  {login.school:<15} {origin}")
    demo = urls.school_origin("demo")
    lines += [
        "",
        f"  discovery       {demo}/.well-known/openid-configuration",
        f"  API             {demo}/api/v1/courses (with a Bearer token)",
        f"  webhook egress  {urls.platform_url}/v1/webhooks/egress-ips",
        f"  MCP             {urls.platform_url}/mcp",
        f"  your apps       {demo}/account/apps",
        f"  school admin    {demo}/admin/apps",
        "",
        f"  behind the gateway: identity :{settings.ports.identity},"
        f" school API :{settings.ports.school_api}, webhooks :{settings.ports.webhooks}",
        "",
        "Admin logins:",
    ]
    for login in logins:
        lines.append(f"  {login.school:<15} {login.email}  password: {login.password}")
    lines += ["", "Press Ctrl-C to stop.", ""]
    return "\n".join(lines)


def _stop_children(children: dict[str, subprocess.Popen[bytes]]) -> None:
    for child in children.values():
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 25
    for child in children.values():
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()


def _bindings(secrets_file: Path) -> Path:
    """Beside the development secrets: the databases `make dev` has used them with."""
    return secrets_file.with_name(secrets_file.name + ".databases")


def _bound(secrets_file: Path, database_url: str) -> bool:
    try:
        return database_url in _bindings(secrets_file).read_text().splitlines()
    except FileNotFoundError:
        return False


def _bind(secrets_file: Path, database_url: str) -> None:
    if _bound(secrets_file, database_url):
        return
    path = _bindings(secrets_file)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "a") as out:
        out.write(database_url + "\n")


def _database_name(database_url: str) -> str:
    return urlsplit(database_url).path.lstrip("/") or "postgres"


async def _start_afresh(database_url: str) -> None:
    # Not WITH (FORCE): a database another process is using (another checkout's `make dev`
    # still running) is left alone, and the user is told.
    try:
        await db.drop_database(database_url, force=False)
    except asyncpg.ObjectInUseError:
        raise RuntimeError(
            f"the development database {_database_name(database_url)} holds data made with"
            " other development secrets and is in use by another process (another `make dev`?):"
            " stop it and start again"
        ) from None
    await db.migrate(database_url)


async def prepare(
    settings: Settings, *, own_database: bool, logins_file: Path = seed.LOGINS_FILE
) -> list[seed.Login]:
    """Migrate, make sure the secrets are the database's own, seed the demo schools.

    `own_database`: the database is the development one this command found or started itself
    (no DATABASE_URL given). Only that one, and only for development secrets generated into a
    file that has not been used with it yet (new after `make clean`, or another checkout's
    database), is started afresh when it holds data made under other secrets: development
    data that nothing could open any more. Anything else with secrets that are not the
    database's is refused (SecretMismatch, exit status 2), and nothing is dropped.
    """
    await db.migrate(settings.database_url)
    try:
        await _verify_secrets(settings)
    except secret_checks.SecretMismatch:
        secrets_file = settings.dev_secrets
        if not (
            own_database
            and settings.is_development
            and secrets_file is not None
            and not _bound(secrets_file, settings.database_url)
        ):
            raise
        sys.stdout.write(
            f"The development database {_database_name(settings.database_url)} was made with"
            f" other development secrets than the new ones in {secrets_file}: starting it"
            " afresh (development data only).\n"
        )
        sys.stdout.flush()
        await _start_afresh(settings.database_url)
        await _verify_secrets(settings)
    if own_database and settings.dev_secrets is not None:
        _bind(settings.dev_secrets, settings.database_url)
    pool = await db.create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        return await seed.seed_demo(pool, settings, logins_file)
    finally:
        await pool.close()


async def _verify_secrets(settings: Settings) -> None:
    pool = await db.create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        await secret_checks.verify(pool, settings)
    finally:
        await pool.close()


def run(settings: Settings) -> int:
    started = time.monotonic()
    # A database named by DATABASE_URL is the user's: never started afresh here.
    own_database = not os.environ.get("DATABASE_URL")
    stores, stop_stores = localstores.find_or_start(DATA_DIR)
    env = {
        **os.environ,
        "DATABASE_URL": stores.database_url,
        "REDIS_URL": stores.redis_url,
        # Identity sits behind the gateway and takes the caller's address from it; nothing
        # stands in front of the gateway, so it trusts no forwarded header itself.
        "TRUST_FORWARDED_HOST": "true",
        "GATEWAY_TRUST_FORWARDED": "false",
    }
    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        settings = load_settings(env)
        logins = asyncio.run(prepare(settings, own_database=own_database))
        all_parts = parts(settings)
        for part in all_parts:
            children[part.name] = _spawn(part, env)
        _wait_ready(children, all_parts)
        sys.stdout.write(_banner(settings, logins, started))
        sys.stdout.flush()
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None:
                    log.error("part_exited", part=name, code=child.returncode)
                    stopping = True
            time.sleep(0.2)
        return 0
    except RuntimeError as exc:
        log.error("dev_failed", error=str(exc))
        return 1
    finally:
        sys.stdout.write("\nStopping...\n")
        _stop_children(children)
        stop_stores()
        sys.stdout.write("Stopped.\n")
