"""The demo data `make dev` starts with: the quickstart's school `demo` (school_id 42), a second
school `northside`, and an admin of each (`make up` seeds the same with `migrate --demo`).

Seeding is idempotent: a second run finds what the first made. The admins' passwords are
generated on the first run and kept in `.data/dev-logins.json` (mode 0600) so they can be
printed again; no password lives in the repository. CONNECT_DEMO_ADMIN_PASSWORD, when set, is
the demo school's admin's password instead (an existing account is given it).
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from libs.common.config import Settings
from services.identity import credentials, keys, schools, store, users

DEMO_SCHOOLS = (
    (42, "demo", "Demo School"),
    (None, "northside", "Northside Academy"),
)
LOGINS_FILE = Path(".data") / "dev-logins.json"


@dataclass(frozen=True, slots=True)
class Login:
    school: str
    email: str
    password: str


def _saved_logins(path: Path) -> dict[str, dict[str, str]]:
    if not path.exists():
        return {}
    data: dict[str, dict[str, str]] = json.loads(path.read_text())
    return data


def _save_logins(path: Path, logins: dict[str, dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as out:
        json.dump(logins, out, indent=2)


def demo_password() -> str:
    """A new demo admin's password: printed by `make dev` and pasted into a sign-in form or a
    `--password` argument, so it never begins with '-' (an option there) or '_'."""
    return credentials.new_id(12)


async def seed_demo(
    pool: asyncpg.Pool, settings: Settings, logins_file: Path = LOGINS_FILE
) -> list[Login]:
    saved = _saved_logins(logins_file)
    result: list[Login] = []
    for school_id, subdomain, name in DEMO_SCHOOLS:
        school = await store.school_by_subdomain(pool, subdomain)
        if school is None:
            school = await schools.create_school(pool, settings, subdomain, name, school_id)
        await keys.ensure_issuer_keys(pool, settings, school.id)
        email = f"admin@{subdomain}.example.com"
        login = saved.get(subdomain)
        existing = await store.user_by_email(pool, email)
        given = settings.demo_admin_password if subdomain == "demo" else None
        if login is None or existing is None or (given and login["password"] != given):
            password = given or (login["password"] if login else demo_password())
            user, created = await users.create_user(
                pool,
                school_id=school.id,
                email=email,
                password=password,
                name=f"{name} Admin",
                role="admin",
            )
            if not created:
                # The account predates our saved logins: reset it so the printed login works.
                from services.identity import credentials

                await store.update_password_hash(pool, user.id, credentials.hash_password(password))
            login = {"email": email, "password": password}
            saved[subdomain] = login
        result.append(Login(subdomain, login["email"], login["password"]))
    await keys.ensure_issuer_keys(pool, settings, None)
    _save_logins(logins_file, saved)
    await _seed_school_data(pool)
    return result


async def _seed_school_data(pool: asyncpg.Pool) -> None:
    """The school API's sample data (courses, members, orders, ...) for each demo school."""
    from services.school_api.seed import seed_school

    for _, subdomain, name in DEMO_SCHOOLS:
        school = await store.school_by_subdomain(pool, subdomain)
        if school is not None:
            await seed_school(pool, school.id, name)


def summary(logins: list[Login]) -> list[dict[str, Any]]:
    return [{"school": x.school, "email": x.email, "password": x.password} for x in logins]
