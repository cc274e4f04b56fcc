"""The school admin pages on real sockets: OAuth applications and the audit log with CSV export.

Who may: only the school's admins (members and other schools' admins get 403). What changes:
read back from the clients table, the audit stream, and the token endpoint.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit

import asyncpg
import orjson
import pytest
import redis.asyncio as redis_asyncio

from libs.common.config import Settings
from services.identity import credentials, sessions, store, users
from services.identity.store import audit as audit_store
from tests.support import identity_records
from tests.test_account_pages import authorize_in_browser, live_grants, sign_in
from tests.test_authorize import Browser, authorize_url, form
from tests.token_helpers import (
    PASSWORD,
    REDIRECT_URI,
    World,
    basic,
    make_world,
    pkce_pair,
    post_form,
    revocation_marked,
    token,
)

CSP_FRAME = "frame-ancestors 'none'"


@pytest.fixture(autouse=True)
async def _fresh_address_counter(redis: redis_asyncio.Redis, settings: Settings) -> Any:
    key = sessions.address_throttle_key(settings, "127.0.0.1")
    await redis.delete(key)
    yield
    await redis.delete(key)


@dataclass
class School:
    world: World
    admin: store.User

    @property
    def origin(self) -> str:
        return self.world.origin


async def make_school(pool: asyncpg.Pool, settings: Settings, unique: str, port: int) -> School:
    # The world's user is the school's plain member, whom the admin pages refuse.
    world = await make_world(pool, settings, unique, port, label="adm", role="member")
    admin, _ = await users.create_user(
        pool,
        school_id=world.school.id,
        email=f"admin-{unique}-{secrets.token_hex(3)}@example.com",
        password=PASSWORD,
        role="admin",
    )
    return School(world, admin)


@pytest.fixture
async def school(
    identity_url: str, pool: asyncpg.Pool, settings: Settings, unique: str, identity_port: int
) -> School:
    return await make_school(pool, settings, unique, identity_port)


@pytest.fixture
async def admin(school: School) -> AsyncIterator[Browser]:
    """A browser signed in as the school's admin."""
    b = Browser()
    status, _, body = await sign_in(b, school.origin, school.admin.email)
    assert status == 303, body
    yield b
    await b.close()


async def apps_page(browser: Browser, origin: str) -> str:
    status, headers, body = await browser.get(origin + "/admin/apps")
    assert status == 200, body
    assert CSP_FRAME in headers["Content-Security-Policy"]
    return body


async def create(browser: Browser, origin: str, **fields: Any) -> tuple[int, Any, str]:
    body = await apps_page(browser, origin)
    csrf_token = form(body, "/admin/apps").fields["csrf_token"]
    data: list[tuple[str, str]] = [("csrf_token", csrf_token)]
    defaults = {"name": "Gradebook", "redirect_uris": "https://grades.example/cb", "origins": ""}
    for key, value in {**defaults, **fields}.items():
        if isinstance(value, list | tuple):
            data.extend((key, v) for v in value)
        else:
            data.append((key, value))
    async with browser.session.post(origin + "/admin/apps", data=data, allow_redirects=False) as r:
        return r.status, r.headers, await r.text()


def client_id_of(location: str) -> str:
    return urlsplit(location).path.rsplit("/", 1)[1]


def shown_secret(html: str) -> str | None:
    match = re.search(r'<code class="secret" id="client-secret">([^<]+)</code>', html)
    return match.group(1) if match else None


async def stream_actions(
    redis: redis_asyncio.Redis, settings: Settings, client_id: str
) -> list[dict[str, Any]]:
    """Identity's audit records of the client, oldest first (redis: no longer read, kept for
    the callers)."""
    return await identity_records(settings.database_url, client_id=client_id)


async def detail_form(browser: Browser, origin: str, client_id: str, action: str) -> dict[str, str]:
    status, _, body = await browser.get(f"{origin}/admin/apps/{client_id}")
    assert status == 200, body
    return form(body, f"/admin/apps/{client_id}/{action}").fields


# Who may -----------------------------------------------------------------------------------


ADMIN_GETS = ("/admin/apps", "/admin/audit", "/admin/audit.csv")


async def test_signed_out_visitors_are_sent_to_sign_in(school: School) -> None:
    b = Browser()
    try:
        for path in ADMIN_GETS:
            status, headers, _ = await b.get(school.origin + path)
            assert status == 303
            assert headers["Location"].startswith("/account/login?")
        status, headers, _ = await sign_in(
            b, school.origin, school.admin.email, return_to="/admin/audit"
        )
        assert headers["Location"] == "/admin/audit"
    finally:
        await b.close()


async def test_members_who_are_not_admins_get_403(school: School, pool: asyncpg.Pool) -> None:
    b = Browser()
    try:
        status, _, _ = await sign_in(b, school.origin, school.world.user.email)
        assert status == 303
        for path in (*ADMIN_GETS, f"/admin/apps/{school.world.confidential.id}"):
            status, headers, body = await b.get(school.origin + path)
            assert status == 403, path
            assert CSP_FRAME in headers["Content-Security-Policy"]
            assert "Only the school&#39;s admins" in body
        status, _, _ = await b.post(
            school.origin + "/admin/apps", {"name": "x", "redirect_uris": "https://x.example/cb"}
        )
        assert status == 403
        status, _, _ = await b.post(
            f"{school.origin}/admin/apps/{school.world.confidential.id}/disable", {}
        )
        assert status == 403
        # The member's own pages do not offer the admin ones.
        _, _, body = await b.get(school.origin + "/account/apps")
        assert "/admin/apps" not in body
    finally:
        await b.close()
    assert (await store.client_by_id(pool, school.world.confidential.id)).disabled_at is None  # type: ignore[union-attr]


async def test_an_admin_of_another_school_is_refused(
    school: School,
    admin: Browser,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    other = await make_school(pool, settings, unique + "b", identity_port)
    # Signing in at the other school: not a member there.
    b = Browser()
    try:
        status, _, body = await sign_in(b, other.origin, school.admin.email)
        assert status == 403
        assert "not a member" in body
    finally:
        await b.close()
    # School A's session cookie carried to school B's origin by hand.
    session = admin.cookie("lc_session")
    assert session
    cookie = {"Cookie": f"lc_session={session}"}
    for path in ADMIN_GETS:
        async with admin.session.get(
            other.origin + path, headers=cookie, allow_redirects=False
        ) as r:
            assert r.status == 403, path
    # And school A's admin pages never reach school B's clients.
    body = await apps_page(admin, school.origin)
    assert other.world.confidential.id not in body
    csrf_token = form(body, "/admin/apps").fields["csrf_token"]
    for action in ("disable", "delete", "rotate-secret", "edit"):
        status, _, _ = await admin.post(
            f"{school.origin}/admin/apps/{other.world.confidential.id}/{action}",
            {
                "csrf_token": csrf_token,
                "confirm": "yes",
                "redirect_uris": "https://evil.example/cb",
            },
        )
        assert status == 404, action
    status, _, _ = await admin.get(f"{school.origin}/admin/apps/{other.world.confidential.id}")
    assert status == 404
    untouched = await store.client_by_id(pool, other.world.confidential.id)
    assert untouched is not None
    assert untouched.disabled_at is None
    assert untouched.secret_hash == other.world.confidential.secret_hash
    assert untouched.redirect_uris == other.world.confidential.redirect_uris


# Creating, and the secret once -------------------------------------------------------------


async def test_create_shows_the_secret_once_and_stores_only_its_hash(
    school: School,
    admin: Browser,
    pool: asyncpg.Pool,
    http: Any,
    redis: redis_asyncio.Redis,
    settings: Settings,
) -> None:
    status, headers, body = await create(
        admin,
        school.origin,
        name="Attendance <Sync>",
        redirect_uris="https://attend.example/cb\nhttp://127.0.0.1/cb\n",
        origins="https://attend.example",
        scope=["openid", "courses:read", "students:read"],
        client_type="confidential",
        client_credentials="yes",
    )
    assert status == 303, body
    location = headers["Location"]
    client_id = client_id_of(location)
    assert "shown=" in location

    status, headers, page = await admin.get(school.origin + location)
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    secret = shown_secret(page)
    assert secret and secret.startswith("lcs_")
    assert client_id in page
    assert "Attendance &lt;Sync&gt;" in page
    # Never again: not on a reload of the very same URL, not on the app's page, not in a list.
    for path in (location, f"/admin/apps/{client_id}", "/admin/apps"):
        _, _, again = await admin.get(school.origin + path)
        assert secret not in again
        assert shown_secret(again) is None

    row = await pool.fetchrow("SELECT * FROM clients WHERE id = $1", client_id)
    assert row["school_id"] == school.world.school.id
    assert row["secret_hash"] == credentials.keyed_hash(settings.secret_pepper, secret)
    assert secret.encode() not in bytes(row["secret_hash"])
    assert list(row["redirect_uris"]) == ["https://attend.example/cb", "http://127.0.0.1/cb"]
    assert list(row["allowed_origins"]) == ["https://attend.example"]
    assert list(row["scopes"]) == ["openid", "courses:read", "students:read"]
    assert "client_credentials" in row["grant_types"]
    # No plaintext left in Redis either: the sealed copy went with the first page load.
    leftovers = [k async for k in redis.scan_iter(match=settings.stream("connect:flash:*"))]
    for key in leftovers:
        assert secret.encode() not in (await redis.get(key) or b"")

    # The secret works.
    answer = await token(
        http,
        school.origin,
        {"grant_type": "client_credentials", "scope": "courses:read"},
        authorization=basic(client_id, secret),
    )
    assert answer.status == 200, answer.body

    records = await stream_actions(redis, settings, client_id)
    created = [r for r in records if r["action"] == "client.created"]
    assert len(created) == 1
    assert created[0]["subject"] == str(school.admin.id)
    assert created[0]["school_id"] == school.world.school.id
    assert secret not in orjson.dumps(records).decode()


async def test_a_public_app_has_no_secret(
    school: School, admin: Browser, pool: asyncpg.Pool
) -> None:
    status, headers, body = await create(
        admin,
        school.origin,
        name="Phone App",
        redirect_uris="com.example.app:/cb",
        client_type="public",
        scope=["openid"],
    )
    assert status == 303, body
    assert "shown=" not in headers["Location"]
    _, _, page = await admin.get(school.origin + headers["Location"])
    assert shown_secret(page) is None
    assert "rotate-secret" not in page
    row = await pool.fetchrow(
        "SELECT * FROM clients WHERE id = $1", client_id_of(headers["Location"])
    )
    assert row["token_endpoint_auth_method"] == "none" and row["secret_hash"] is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"redirect_uris": "http://grades.example/cb"}, "loopback"),
        ({"redirect_uris": "https://grades.example/cb#frag"}, "fragment"),
        ({"redirect_uris": "https://*.grades.example/cb"}, "not an absolute URI"),
        ({"redirect_uris": ""}, "at least one redirect URI"),
        ({"origins": "http://grades.example"}, "loopback"),
        ({"scope": ["openid", "admin:read"]}, "admin scopes"),
        ({"scope": ["no-such:scope"]}, "unknown scope"),
        ({"name": " "}, "1-200"),
        ({"client_type": "public", "client_credentials": "yes"}, "confidential"),
    ],
    ids=[
        "http",
        "fragment",
        "wildcard",
        "none",
        "origin",
        "admin-scope",
        "unknown-scope",
        "name",
        "public-m2m",
    ],
)
async def test_create_follows_the_registration_rules(
    school: School, admin: Browser, pool: asyncpg.Pool, fields: dict[str, Any], message: str
) -> None:
    before = await pool.fetchval(
        "SELECT count(*) FROM clients WHERE school_id = $1", school.world.school.id
    )
    status, headers, body = await create(admin, school.origin, **{"name": "Bad <App>", **fields})
    assert status == 400, body
    assert "Location" not in headers
    assert message in body
    # What was typed comes back, escaped.
    if "name" not in fields:
        assert 'value="Bad &lt;App&gt;"' in body
    after = await pool.fetchval(
        "SELECT count(*) FROM clients WHERE school_id = $1", school.world.school.id
    )
    assert after == before


async def test_the_form_never_offers_admin_scopes(school: School, admin: Browser) -> None:
    body = await apps_page(admin, school.origin)
    offered = form(body, "/admin/apps")
    assert 'value="courses:read"' in body
    assert "admin:read" not in body and "admin:write" not in body
    assert offered.fields["csrf_token"]


# Rotating, editing, disabling, deleting ------------------------------------------------------


async def test_rotate_shows_the_new_secret_once_and_the_old_one_stops(
    school: School, admin: Browser, http: Any, redis: redis_asyncio.Redis, settings: Settings
) -> None:
    w = school.world
    fields = await detail_form(admin, school.origin, w.confidential.id, "rotate-secret")
    status, headers, _ = await admin.post(
        f"{school.origin}/admin/apps/{w.confidential.id}/rotate-secret", fields
    )
    assert status == 303
    _, _, page = await admin.get(school.origin + headers["Location"])
    new_secret = shown_secret(page)
    assert new_secret and new_secret != w.secret
    assert "the old one no longer works" in page
    _, _, again = await admin.get(school.origin + headers["Location"])
    assert shown_secret(again) is None

    async def introspect_with(secret: str) -> int:
        answer = await post_form(
            http,
            school.origin + "/v1/oauth/introspect",
            {"token": "x"},
            authorization=basic(w.confidential.id, secret),
        )
        return answer.status

    assert await introspect_with(w.secret) == 401
    assert await introspect_with(new_secret) == 200
    actions = [r["action"] for r in await stream_actions(redis, settings, w.confidential.id)]
    assert "client.secret_rotated" in actions


async def test_edit_redirect_uris_and_origins(
    school: School,
    admin: Browser,
    pool: asyncpg.Pool,
    redis: redis_asyncio.Redis,
    settings: Settings,
) -> None:
    w = school.world
    fields = await detail_form(admin, school.origin, w.confidential.id, "edit")
    url = f"{school.origin}/admin/apps/{w.confidential.id}/edit"
    good = {
        "csrf_token": fields["csrf_token"],
        "name": "Renamed App",
        "redirect_uris": "https://new.example/cb\r\nhttp://[::1]/cb",
        "origins": "https://new.example\nhttp://localhost:3000",
    }
    status, headers, _ = await admin.post(url, good)
    assert status == 303
    assert headers["Location"].endswith("?updated=1")
    row = await store.client_by_id(pool, w.confidential.id)
    assert row is not None
    assert row.name == "Renamed App"
    assert row.redirect_uris == ("https://new.example/cb", "http://[::1]/cb")
    assert row.allowed_origins == ("https://new.example", "http://localhost:3000")

    for bad in (
        "https://new.example/cb#x",
        "https://*.new.example/cb",
        "http://new.example/cb",
        "",
    ):
        status, _, body = await admin.post(url, {**good, "redirect_uris": bad})
        assert status == 400, bad
        assert 'role="alert"' in body
    status, _, _ = await admin.post(url, {**good, "origins": "https://new.example/path"})
    assert status == 400
    unchanged = await store.client_by_id(pool, w.confidential.id)
    assert unchanged == row
    updates = [
        r
        for r in await stream_actions(redis, settings, w.confidential.id)
        if r["action"] == "client.updated"
    ]
    assert len(updates) == 1
    assert updates[0]["subject"] == str(school.admin.id)


async def test_disable_enable_and_delete(
    school: School,
    admin: Browser,
    pool: asyncpg.Pool,
    http: Any,
    redis: redis_asyncio.Redis,
    settings: Settings,
) -> None:
    w = school.world
    member = Browser()
    try:
        status, _, _ = await sign_in(member, school.origin, w.user.email)
        assert status == 303
        tokens = await authorize_in_browser(member, http, w)
        granted = await live_grants(pool, w.user.id, w.confidential.id)
        assert granted

        fields = await detail_form(admin, school.origin, w.confidential.id, "disable")
        status, _, _ = await admin.post(
            f"{school.origin}/admin/apps/{w.confidential.id}/disable", fields
        )
        assert status == 303
        assert (await store.client_by_id(pool, w.confidential.id)).disabled_at is not None  # type: ignore[union-attr]
        _, challenge = pkce_pair()
        status, _, body = await member.get(
            authorize_url(
                school.origin, w.confidential.id, redirect_uri=REDIRECT_URI, challenge=challenge
            )
        )
        assert status == 400 and "disabled" in body
        refused = await token(
            http,
            school.origin,
            {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
            authorization=basic(w.confidential.id, w.secret),
        )
        assert refused.status == 401
        # Disabling ended every grant at once: marked for the gateways, not only refused here.
        for grant_id in granted:
            assert await revocation_marked(redis, settings, grant_id) == (True, True)
        assert await live_grants(pool, w.user.id, w.confidential.id) == []

        fields = await detail_form(admin, school.origin, w.confidential.id, "enable")
        status, _, _ = await admin.post(
            f"{school.origin}/admin/apps/{w.confidential.id}/enable", fields
        )
        assert status == 303
        assert (await store.client_by_id(pool, w.confidential.id)).disabled_at is None  # type: ignore[union-attr]
        # Enabled again, the app gets none of its old tokens back.
        stale = await token(
            http,
            school.origin,
            {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
            authorization=basic(w.confidential.id, w.secret),
        )
        assert stale.status == 400 and stale.body["error"] == "invalid_grant"

        fields = await detail_form(admin, school.origin, w.confidential.id, "delete")
        url = f"{school.origin}/admin/apps/{w.confidential.id}/delete"
        fields.pop("confirm", None)  # the confirm box left unticked
        status, _, body = await admin.post(url, fields)
        assert status == 400 and "confirm" in body
        assert await store.client_by_id(pool, w.confidential.id) is not None
        status, headers, _ = await admin.post(url, {**fields, "confirm": "yes"})
        assert status == 303
        assert headers["Location"] == "/admin/apps?deleted=1"
        assert await store.client_by_id(pool, w.confidential.id) is None
        for grant_id in granted:
            assert await revocation_marked(redis, settings, grant_id) == (True, True)
        actions = [r["action"] for r in await stream_actions(redis, settings, w.confidential.id)]
        for expected in ("client.disabled", "client.enabled", "grant.revoked", "client.deleted"):
            assert expected in actions
    finally:
        await member.close()


async def test_every_admin_post_without_a_valid_csrf_token_is_refused(
    school: School, admin: Browser, pool: asyncpg.Pool
) -> None:
    w = school.world
    before = await store.client_by_id(pool, w.confidential.id)
    count = await pool.fetchval("SELECT count(*) FROM clients WHERE school_id = $1", w.school.id)
    posts = {
        "/admin/apps": {"name": "Sneaky", "redirect_uris": "https://sneaky.example/cb"},
        **{
            f"/admin/apps/{w.confidential.id}/{action}": {
                "confirm": "yes",
                "redirect_uris": "https://sneaky.example/cb",
                "name": "Sneaky",
            }
            for action in ("edit", "rotate-secret", "disable", "enable", "delete")
        },
    }
    for path, data in posts.items():
        for token_value in (None, "", "forged-token"):
            sent = dict(data) if token_value is None else {**data, "csrf_token": token_value}
            status, headers, _ = await admin.post(school.origin + path, sent)
            assert status == 403, (path, token_value)
            assert "Location" not in headers
    assert await store.client_by_id(pool, w.confidential.id) == before
    assert (
        await pool.fetchval("SELECT count(*) FROM clients WHERE school_id = $1", w.school.id)
        == count
    )


# The audit log -------------------------------------------------------------------------------


def _row(label: str, i: int, school_id: int, at: datetime, **extra: Any) -> audit_store.AuditRow:
    values: dict[str, Any] = {
        "record_id": f"adm-{label}-{i}",
        "occurred_at": at,
        "school_id": school_id,
        "client_id": None,
        "subject": None,
        "grant_id": None,
        "action": "api.call",
        "method": "GET",
        "path": f"/api/v1/row/{label}/{i}",
        "status": 200,
        "scope": None,
        "ip": "192.0.2.1",
        "detail": {},
    }
    values.update(extra)
    return audit_store.AuditRow(**values)


async def test_audit_log_filters_and_csv_export(
    school: School,
    admin: Browser,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    w = school.world
    # Client ids never begin with a formula character (credentials.new_id), so the CSV below
    # carries them as they are; an id from before that rule is the next test's.
    assert not w.public.id.startswith(("-", "_")) and not w.confidential.id.startswith(("-", "_"))
    other = await make_school(pool, settings, unique + "c", identity_port)
    label = f"{unique}{secrets.token_hex(2)}"
    start = datetime(2023, 6, 1, 12, 0, tzinfo=UTC)
    member = str(w.user.id)
    rows = [
        _row(label, 0, w.school.id, start, client_id=w.confidential.id, subject=member),
        _row(
            label,
            1,
            w.school.id,
            start + timedelta(hours=1),
            client_id=w.public.id,
            subject=member,
            action="token.issued",
            path=None,
            method=None,
            status=None,
        ),
        _row(
            label,
            2,
            w.school.id,
            start + timedelta(hours=2),
            client_id=w.confidential.id,
            subject=str(school.admin.id),
            path='=HYPERLINK("http://evil.example","x")',
        ),
        _row(
            label,
            3,
            w.school.id,
            start + timedelta(days=3),
            client_id=w.confidential.id,
            subject=member,
            path="+cmd|' /C calc'!A0",
            scope="@SUM(1+1)",
        ),
        # Another school's record: never shown here.
        _row(
            label,
            4,
            other.world.school.id,
            start,
            client_id=other.world.confidential.id,
            path=f"/api/v1/other-school-{label}",
        ),
    ]
    await audit_store.insert_many(pool, rows)

    async def page(**filters: str) -> str:
        status, headers, body = await admin.get(f"{school.origin}/admin/audit?{urlencode(filters)}")
        assert status == 200, body
        assert CSP_FRAME in headers["Content-Security-Policy"]
        return body

    def rows_in(body: str) -> set[int]:
        return (
            {int(n) for n in re.findall(rf"/api/v1/row/{label}/(\d+)", body)}
            | ({2} if "HYPERLINK" in body else set())
            | ({3} if "calc" in body else set())
        )

    window = {"from": "2023-06-01T00:00", "to": "2023-06-02T00:00"}
    everything = await page(**{**window, "to": "2023-07-01T00:00"})
    assert f"other-school-{label}" not in everything
    assert rows_in(everything) == {0, 2, 3}
    assert "token.issued" in everything  # row 1 has no path but is listed
    assert rows_in(await page(**window)) == {0, 2}
    assert rows_in(await page(**window, action="api.call", client=w.confidential.id)) == {0, 2}
    by_member = await page(**window, user=w.user.email)
    assert rows_in(by_member) == {0}
    assert "token.issued" in by_member
    assert rows_in(await page(**window, user=school.admin.email)) == {2}
    # HTML-escaped on the page.
    assert (
        "=HYPERLINK(&#34;http://evil.example&#34;" in everything
        or "=HYPERLINK(&quot;" in everything
    )
    # An email from another school finds nobody, rather than anybody.
    status, _, body = await admin.get(
        f"{school.origin}/admin/audit?{urlencode({'user': other.admin.email})}"
    )
    assert status == 400 and "No member" in body
    status, _, _ = await admin.get(f"{school.origin}/admin/audit?from=yesterday")
    assert status == 400

    # The CSV: the same filters, an attachment, formula cells defused.
    async with admin.session.get(
        f"{school.origin}/admin/audit.csv?{urlencode({**window, 'to': '2023-07-01T00:00'})}",
        allow_redirects=False,
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/csv")
        disposition = resp.headers["Content-Disposition"]
        assert disposition.startswith("attachment;") and ".csv" in disposition
        assert CSP_FRAME in resp.headers["Content-Security-Policy"]
        text = await resp.text()
    table = list(csv.DictReader(io.StringIO(text)))
    assert [r["action"] for r in table] == ["api.call", "api.call", "token.issued", "api.call"]
    assert all(r["client_id"] != other.world.confidential.id for r in table)
    assert table[0]["path"] == "'+cmd|' /C calc'!A0"
    assert table[0]["scope"] == "'@SUM(1+1)"
    assert table[1]["path"] == '\'=HYPERLINK("http://evil.example","x")'
    assert table[1]["user_email"] == school.admin.email
    assert table[3]["user_email"] == w.user.email
    for r in table:
        for cell in r.values():
            assert not cell.startswith(("=", "+", "-", "@")), cell

    async with admin.session.get(
        f"{school.origin}/admin/audit.csv?"
        + urlencode({**window, "user": w.user.email, "action": "token.issued"}),
        allow_redirects=False,
    ) as resp:
        filtered = list(csv.DictReader(io.StringIO(await resp.text())))
    assert [(r["action"], r["client_id"]) for r in filtered] == [("token.issued", w.public.id)]


async def test_audit_csv_quotes_a_client_id_that_begins_with_a_dash(
    school: School, admin: Browser, pool: asyncpg.Pool, unique: str
) -> None:
    """A client made before ids stopped beginning with '-': the page finds it by its id, and
    the CSV quotes it like any cell a spreadsheet would take for a formula."""
    legacy = await store.insert_client(
        pool,
        client_id=f"-{unique}Legacy{secrets.token_hex(4)}",
        school_id=school.world.school.id,
        name="Legacy App",
        token_endpoint_auth_method="none",
        secret_hash=None,
        redirect_uris=["https://legacy.example/cb"],
        allowed_origins=[],
        scopes=["openid"],
        grant_types=["authorization_code"],
    )
    label = f"{unique}{secrets.token_hex(2)}"
    at = datetime(2023, 8, 1, 12, 0, tzinfo=UTC)
    await audit_store.insert_many(
        pool, [_row(label, 0, school.world.school.id, at, client_id=legacy.id)]
    )
    window = {"from": "2023-08-01T00:00", "to": "2023-08-02T00:00", "client": legacy.id}
    status, _, body = await admin.get(f"{school.origin}/admin/audit?{urlencode(window)}")
    assert status == 200, body
    assert f"/api/v1/row/{label}/0" in body
    async with admin.session.get(
        f"{school.origin}/admin/audit.csv?{urlencode(window)}", allow_redirects=False
    ) as resp:
        assert resp.status == 200
        table = list(csv.DictReader(io.StringIO(await resp.text())))
    assert [(r["client_id"], r["client_name"]) for r in table] == [("'" + legacy.id, "Legacy App")]


async def test_admin_changes_reach_the_audit_page(
    school: School, admin: Browser, pool: asyncpg.Pool
) -> None:
    status, headers, _ = await create(admin, school.origin, name="Audited App", scope=["openid"])
    assert status == 303
    client_id = client_id_of(headers["Location"])
    body = ""
    for _ in range(100):  # the audit consumer stores the stream in batches
        _, _, body = await admin.get(
            f"{school.origin}/admin/audit?"
            + urlencode({"action": "client.created", "client": client_id})
        )
        if "client.created" in body and "Audited App" in body:
            break
        await asyncio.sleep(0.1)
    assert "Audited App" in body
    assert school.admin.email in body
