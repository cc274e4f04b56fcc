"""A client's change holds at every identity process the moment the call that made it answers.

Identity processes reuse client rows for a few seconds. Here the test's own identity service
(process A) makes the change, through the admin pages or dynamic registration management, and
a second identity process (`loopwise-connect serve identity`, process B), whose cache holds
the client from a call just before, is asked right after.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import orjson
import pytest
import redis.asyncio as redis_asyncio

from libs.common import streams
from libs.common.config import Settings
from services.identity import clients, sessions, store
from tests.support import client_session, free_port
from tests.test_admin_pages import School, admin, detail_form, school, shown_secret
from tests.test_authorize import Browser
from tests.token_helpers import basic

# The school and its signed-in admin, as the admin page tests make them.
__all__ = ["admin", "school"]

CLI = str(Path(sys.executable).with_name("loopwise-connect"))
SPA = "https://spa.example"


@pytest.fixture(autouse=True)
async def _fresh_address_counter(redis: redis_asyncio.Redis, settings: Settings) -> Any:
    key = sessions.address_throttle_key(settings, "127.0.0.1")
    await redis.delete(key)
    yield
    await redis.delete(key)


@pytest.fixture(scope="module")
def second_identity(
    base_env: dict[str, str], migrated: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Process B: another identity process on the same database and Redis."""
    port = free_port()
    log = tmp_path_factory.mktemp("identity") / "identity-b.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [CLI, "serve", "identity", "--port", str(port)],
            env={**os.environ, **base_env, "LOG_LEVEL": "warning"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(process, port, log)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"identity B exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"identity B not ready: {log.read_text()[-3000:]}")


class Caller:
    """Client authentication (an introspection call) at one identity process, for a school."""

    def __init__(self, http: aiohttp.ClientSession, base: str, origin: str) -> None:
        self.http = http
        self.base = base
        self.host = urlsplit(origin).netloc

    async def introspect(
        self, client_id: str, secret: str, *, origin: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        headers = {"Host": self.host, "Authorization": basic(client_id, secret)}
        if origin is not None:
            headers["Origin"] = origin
        async with self.http.post(
            self.base + "/v1/oauth/introspect", data={"token": "x"}, headers=headers
        ) as resp:
            raw = await resp.read()
            return resp.status, orjson.loads(raw) if raw else {}


@pytest.fixture
async def at_b(second_identity: str, school: School) -> AsyncIterator[Caller]:
    async with client_session() as http:
        yield Caller(http, second_identity, school.origin)


async def admin_post(admin: Browser, school: School, client_id: str, action: str) -> str:
    fields = await detail_form(admin, school.origin, client_id, action)
    if action == "delete":
        fields["confirm"] = "yes"
    status, headers, body = await admin.post(
        f"{school.origin}/admin/apps/{client_id}/{action}", fields
    )
    assert status == 303, body
    return str(headers["Location"])


async def test_a_new_secret_holds_at_every_process_at_once(
    school: School, admin: Browser, at_b: Caller
) -> None:
    w = school.world
    cid = w.confidential.id
    assert (await at_b.introspect(cid, w.secret))[0] == 200  # B has the row now
    location = await admin_post(admin, school, cid, "rotate-secret")
    _, _, page = await admin.get(school.origin + location)
    new_secret = shown_secret(page)
    assert new_secret
    status, body = await at_b.introspect(cid, w.secret)
    assert (status, body.get("error")) == (401, "invalid_client")
    assert (await at_b.introspect(cid, new_secret))[0] == 200


async def test_disable_and_enable_hold_at_every_process_at_once(
    school: School, admin: Browser, at_b: Caller
) -> None:
    w = school.world
    cid = w.confidential.id
    assert (await at_b.introspect(cid, w.secret))[0] == 200
    await admin_post(admin, school, cid, "disable")
    status, body = await at_b.introspect(cid, w.secret)
    assert (status, body.get("error")) == (401, "invalid_client")
    # B has the disabled row now; enabling is as immediate.
    await admin_post(admin, school, cid, "enable")
    assert (await at_b.introspect(cid, w.secret))[0] == 200


async def test_a_deleted_client_is_gone_at_every_process_at_once(
    school: School, admin: Browser, at_b: Caller
) -> None:
    w = school.world
    cid = w.confidential.id
    assert (await at_b.introspect(cid, w.secret))[0] == 200
    await admin_post(admin, school, cid, "delete")
    status, body = await at_b.introspect(cid, w.secret)
    assert (status, body.get("error")) == (401, "invalid_client")


async def test_an_edited_origin_list_holds_at_every_process_at_once(
    school: School, admin: Browser, at_b: Caller, pool: asyncpg.Pool
) -> None:
    w = school.world
    cid = w.confidential.id
    await store.update_client(pool, cid, allowed_origins=[SPA])
    assert (await at_b.introspect(cid, w.secret, origin=SPA))[0] == 200
    fields = await detail_form(admin, school.origin, cid, "edit")
    status, _, body = await admin.post(
        f"{school.origin}/admin/apps/{cid}/edit",
        {
            **fields,
            "name": "Edited",
            "redirect_uris": w.confidential.redirect_uris[0],
            "origins": "",
        },
    )
    assert status == 303, body
    status, body = await at_b.introspect(cid, w.secret, origin=SPA)
    assert (status, body.get("error")) == (400, "invalid_request")


async def test_registration_management_announces_its_changes(
    identity_url: str,
    second_identity: str,
    school: School,
    http: Any,
    redis: redis_asyncio.Redis,
    settings: Settings,
) -> None:
    """RFC 7592 update and delete: announced before they answer; the deleted client is gone
    at process B at once."""
    base = school.origin
    doc = {
        "client_name": "Self Registered",
        "redirect_uris": ["https://self.example/cb"],
        "token_endpoint_auth_method": "client_secret_basic",
    }
    async with http.post(base + "/v1/oauth/register", json=doc) as resp:
        assert resp.status == 201, await resp.text()
        made = await resp.json()
    cid, secret = made["client_id"], made["client_secret"]
    manage = {"Authorization": f"Bearer {made['registration_access_token']}"}
    stream = settings.stream(streams.CLIENTS)

    async def announced_since(position: str) -> list[str]:
        entries = await redis.xrange(stream, min=f"({position}")
        return [orjson.loads(fields[b"data"])["client_id"] for _, fields in entries]

    async with client_session() as b_http:
        at_b = Caller(b_http, second_identity, base)
        assert (await at_b.introspect(cid, secret))[0] == 200
        before = await streams.last_id(redis, stream)
        async with http.put(
            f"{base}/v1/oauth/register/{cid}",
            json={**doc, "client_id": cid, "client_name": "Renamed"},
            headers=manage,
        ) as resp:
            assert resp.status == 200, await resp.text()
        assert cid in await announced_since(before)

        before = await streams.last_id(redis, stream)
        async with http.delete(f"{base}/v1/oauth/register/{cid}", headers=manage) as resp:
            assert resp.status == 204
        assert cid in await announced_since(before)
        status, body = await at_b.introspect(cid, secret)
        assert (status, body.get("error")) == (401, "invalid_client")


async def test_a_read_an_announcement_overtook_is_not_kept(
    identity_url: str, school: School, pool: asyncpg.Pool
) -> None:
    """A row read before a change committed, whose read ends after the change's announcement
    was applied, is not cached: it would outlive the announcement by the whole TTL."""
    cid = school.world.confidential.id
    first = await store.cached_client_by_id(pool, cid)
    assert first is not None
    # This process follows the announcements (its identity service runs), so rows are reused:
    # a change made behind the cache's back is not seen yet.
    await pool.execute("UPDATE clients SET name = 'behind the cache' WHERE id = $1", cid)
    again = await store.cached_client_by_id(pool, cid)
    assert again is not None and again.name == first.name

    store.forget_client(cid)
    reading = asyncio.create_task(store.cached_client_by_id(pool, cid))
    await asyncio.sleep(0)  # the read is on its way to PostgreSQL
    store.forget_client(cid)  # an announcement applied meanwhile
    await reading
    await pool.execute("UPDATE clients SET name = 'after' WHERE id = $1", cid)
    latest = await store.cached_client_by_id(pool, cid)
    assert latest is not None and latest.name == "after"


async def test_an_announcement_that_redis_refuses_does_not_fail_the_change(
    settings: Settings,
) -> None:
    """The change is committed by then: a Redis outage leaves other processes on their
    five-second entries, as before announcements, rather than failing the admin's call."""
    dead = redis_asyncio.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.5)
    try:
        await clients.announce_change(dead, settings, "some-client")
    finally:
        await dead.aclose()
