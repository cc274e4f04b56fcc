"""Dynamic client registration (RFC 7591) and its management (RFC 7592), on a real socket."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from libs.common import keys, streams
from libs.common.config import Settings
from services.identity import (
    credentials,
    grants,
    ratelimit,
    registration,
    schools,
    store,
    users,
)
from tests.support import identity_records

# Seed 001, step 1, option B: the request and the answer users expect, verbatim.
SEED_REQUEST = b"""{
"client_name": "My Integration",
"redirect_uris": ["https://myapp.com/callback"],
"grant_types": ["authorization_code", "refresh_token"],
"response_types": ["code"],
"token_endpoint_auth_method": "none"
}"""
SEED_ANSWER = {
    "client_name": "My Integration",
    "redirect_uris": ["https://myapp.com/callback"],
    "grant_types": ["authorization_code", "refresh_token"],
    "response_types": ["code"],
    "token_endpoint_auth_method": "none",
    "scope": "read write courses:read courses:write students:read students:write "
    "analytics:read curriculum:read curriculum:write orders:read school:read",
}
REGISTRATION_EXTRAS = {
    "client_id_issued_at",
    "registration_access_token",
    "registration_client_uri",
}


def origin(port: int, subdomain: str | None = None) -> str:
    return f"http://{subdomain}.localhost:{port}" if subdomain else f"http://localhost:{port}"


async def new_school(pool: Any, settings: Settings, unique: str, tag: str = "reg") -> Any:
    return await schools.create_school(pool, settings, f"{tag}{unique}", f"School {tag}")


def body(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "client_name": "Test App",
        "redirect_uris": ["https://app.example/callback"],
        "token_endpoint_auth_method": "none",
    }
    doc.update(overrides)
    return {k: v for k, v in doc.items() if v is not None}


async def register(http: Any, base: str, doc: Any) -> tuple[int, dict[str, Any], Any]:
    async with http.post(base + "/v1/oauth/register", json=doc) as resp:
        return resp.status, await resp.json(), resp.headers


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def stream_entries(redis: Any, name: str) -> list[dict[str, Any]]:
    return [orjson.loads(fields[b"data"]) for _id, fields in await redis.xrange(name)]


async def grants_of_new_users(
    pool: Any, school_id: int, client_id: str, unique: str, scopes: dict[str, Sequence[str]]
) -> dict[str, store.Grant]:
    """For each name, a new user of the school (`{name}{unique}@example.com`) and their grant
    of those scopes to the client, as consent would leave it."""
    made = {}
    for name, granted in scopes.items():
        user, _ = await users.create_user(
            pool,
            school_id=school_id,
            email=f"{name}{unique}@example.com",
            password="correct horse battery",
        )
        made[name] = await grants.create_grant(
            pool, school_id=school_id, client_id=client_id, user_id=user.id, scopes=granted
        )
    return made


# Registration ----------------------------------------------------------------------------


async def test_seed_quickstart_request_verbatim(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await new_school(pool, settings, unique, "seed")
    base = origin(identity_port, school.subdomain)
    async with http.post(
        base + "/api/oauth/register",
        data=SEED_REQUEST,
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 201, await resp.text()
        answer = await resp.json()
        assert resp.headers["Cache-Control"] == "no-store"
    assert set(answer) == {"client_id", *SEED_ANSWER, *REGISTRATION_EXTRAS}
    assert {k: answer[k] for k in SEED_ANSWER} == SEED_ANSWER
    assert "client_secret" not in answer
    client_id = answer["client_id"]
    assert answer["registration_client_uri"] == f"{base}/v1/oauth/register/{client_id}"
    assert isinstance(answer["client_id_issued_at"], int)

    row = await store.client_by_id(pool, client_id)
    assert row is not None
    assert row.school_id == school.id
    assert row.created_via == "registration"
    assert row.is_public and row.secret_hash is None
    assert row.registration_token_hash == credentials.keyed_hash(
        settings.secret_pepper, answer["registration_access_token"]
    )


async def test_platform_origin_registers_a_platform_client(
    identity_url: str, http: Any, pool: Any, identity_port: int
) -> None:
    base = origin(identity_port)
    status, answer, _ = await register(
        http, base, body(client_name="Claude Code", redirect_uris=["http://127.0.0.1:33418/cb"])
    )
    assert status == 201, answer
    row = await store.client_by_id(pool, answer["client_id"])
    assert row is not None and row.school_id is None
    assert answer["registration_client_uri"].startswith(base + "/v1/oauth/register/")


async def test_confidential_client_gets_its_secret_once_stored_as_keyed_hash(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await new_school(pool, settings, unique)
    base = origin(identity_port, school.subdomain)
    # token_endpoint_auth_method omitted: RFC 7591's default, client_secret_basic.
    status, answer, _ = await register(http, base, body(token_endpoint_auth_method=None))
    assert status == 201, answer
    assert answer["token_endpoint_auth_method"] == "client_secret_basic"
    secret = answer["client_secret"]
    assert secret.startswith(credentials.CLIENT_SECRET_PREFIX)
    assert answer["client_secret_expires_at"] == 0

    row = await store.client_by_id(pool, answer["client_id"])
    assert row is not None
    assert row.secret_hash == credentials.keyed_hash(settings.secret_pepper, secret)
    assert secret.encode() not in row.secret_hash

    async with http.get(
        answer["registration_client_uri"], headers=bearer(answer["registration_access_token"])
    ) as resp:
        read = await resp.json()
    assert resp.status == 200
    assert "client_secret" not in read and "registration_access_token" not in read


async def test_admin_scopes_are_removed(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await new_school(pool, settings, unique)
    status, answer, _ = await register(
        http,
        origin(identity_port, school.subdomain),
        body(scope="admin:read admin:write courses:read"),
    )
    assert status == 201, answer
    assert answer["scope"] == "courses:read"
    row = await store.client_by_id(pool, answer["client_id"])
    assert row is not None and row.scopes == ("courses:read",)


async def test_only_admin_scopes_is_refused(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await new_school(pool, settings, unique)
    status, answer, _ = await register(
        http, origin(identity_port, school.subdomain), body(scope="admin:read")
    )
    assert status == 400
    assert answer["error"] == "invalid_client_metadata"


async def test_unknown_scope_is_invalid_client_metadata(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await new_school(pool, settings, unique)
    status, answer, headers = await register(
        http, origin(identity_port, school.subdomain), body(scope="courses:read teleport:write")
    )
    assert status == 400
    assert answer["error"] == "invalid_client_metadata"
    assert "teleport:write" in answer["error_description"]
    assert headers["Cache-Control"] == "no-store"


async def test_default_scopes_follow_the_schools_allowed_scopes(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await new_school(pool, settings, unique)
    await pool.execute(
        "UPDATE schools SET allowed_scopes = $2 WHERE id = $1",
        school.id,
        ["openid", "courses:read", "orders:read"],
    )
    base = origin(identity_port, school.subdomain)
    status, answer, _ = await register(http, base, body())
    assert status == 201, answer
    assert answer["scope"] == "courses:read orders:read"
    status, answer, _ = await register(http, base, body(scope="students:read"))
    assert status == 400
    assert answer["error"] == "invalid_client_metadata"


@pytest.mark.parametrize(
    "uri",
    [
        "http://evil.example/cb",
        "https://a.example/cb#frag",
        "https://*.example/cb",
        # 127.0.0.1 to Python's urlsplit, evil.example to a browser.
        "http://evil.example\\@127.0.0.1/cb",
        "http://evil.example\\@localhost/cb",
        "http://evil.example@127.0.0.1/cb",
        "http://127.0.0.1\\evil.example/cb",
        "https://a.example/cb\x00",
    ],
)
async def test_bad_redirect_uris_are_refused(
    uri: str,
    identity_url: str,
    http: Any,
    pool: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    school = await new_school(pool, settings, unique)
    status, answer, _ = await register(
        http, origin(identity_port, school.subdomain), body(redirect_uris=[uri])
    )
    assert status == 400
    assert answer["error"] == "invalid_redirect_uri"


async def test_missing_redirect_uris_are_refused(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await new_school(pool, settings, unique)
    base = origin(identity_port, school.subdomain)
    for uris in (None, []):
        status, answer, _ = await register(http, base, body(redirect_uris=uris))
        assert status == 400
        assert answer["error"] == "invalid_redirect_uri"


async def test_loopback_redirect_uris_are_accepted(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await new_school(pool, settings, unique)
    uris = ["http://127.0.0.1:8765/cb", "http://[::1]/cb"]
    status, answer, _ = await register(
        http, origin(identity_port, school.subdomain), body(redirect_uris=uris)
    )
    assert status == 201, answer
    assert answer["redirect_uris"] == uris


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"grant_types": ["client_credentials"]}, "client_credentials"),
        ({"grant_types": ["refresh_token"]}, "authorization_code"),
        ({"grant_types": ["implicit"]}, "grant_types"),
        ({"response_types": ["token"]}, "response_types"),
        ({"token_endpoint_auth_method": "private_key_jwt"}, "token_endpoint_auth_method"),
        ({"client_name": 42}, "client_name"),
        ({"redirect_uris": "https://app.example/cb"}, "redirect_uris"),
        ({"scope": ["courses:read"]}, "scope"),
        ({"logo_uri": "http://evil.example/logo.png"}, "logo_uri"),
        ({"client_uri": "javascript:alert(1)"}, "client_uri"),
        ({"contacts": ["not an address"]}, "contacts"),
    ],
)
async def test_invalid_metadata_is_refused(
    overrides: dict[str, Any],
    fragment: str,
    identity_url: str,
    http: Any,
    pool: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    school = await new_school(pool, settings, unique)
    status, answer, _ = await register(
        http, origin(identity_port, school.subdomain), body(**overrides)
    )
    assert status == 400, answer
    assert answer["error"] == "invalid_client_metadata"
    assert fragment in answer["error_description"]


async def test_optional_metadata_is_kept_and_unknown_members_ignored(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await new_school(pool, settings, unique)
    extra = {
        "client_uri": "https://app.example",
        "logo_uri": "https://app.example/logo.png",
        "policy_uri": "https://app.example/privacy",
        "tos_uri": "https://app.example/terms",
        "contacts": ["dev@app.example"],
        "software_id": "4NRB1-0XZABZI9E6-5SM3R",
        "software_version": "2.1",
    }
    status, answer, _ = await register(
        http,
        origin(identity_port, school.subdomain),
        body(**extra, jwks_uri="https://app.example/jwks", x_vendor={"a": 1}),
    )
    assert status == 201, answer
    assert {k: answer[k] for k in extra} == extra
    assert "jwks_uri" not in answer and "x_vendor" not in answer
    row = await store.client_by_id(pool, answer["client_id"])
    assert row is not None and row.metadata == extra


async def test_client_name_defaults_when_omitted(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await new_school(pool, settings, unique)
    status, answer, _ = await register(
        http, origin(identity_port, school.subdomain), body(client_name=None)
    )
    assert status == 201, answer
    assert answer["client_name"] == registration.DEFAULT_CLIENT_NAME


async def test_non_json_bodies_are_refused(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await new_school(pool, settings, unique)
    url = origin(identity_port, school.subdomain) + "/v1/oauth/register"
    attempts = [
        (b"client_name=x", "application/x-www-form-urlencoded"),
        (b"{not json", "application/json"),
        (b'["an", "array"]', "application/json"),
        (b"{}" + b" " * (registration.MAX_BODY_BYTES + 1), "application/json"),
    ]
    for data, content_type in attempts:
        async with http.post(url, data=data, headers={"Content-Type": content_type}) as resp:
            answer = await resp.json()
            assert resp.status == 400, (content_type, data[:20], answer)
        assert answer["error"] == "invalid_client_metadata"
        assert answer["error_description"]


async def test_registration_is_audited_without_secrets(
    identity_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    school = await new_school(pool, settings, unique)
    status, answer, _ = await register(
        http, origin(identity_port, school.subdomain), body(token_endpoint_auth_method=None)
    )
    assert status == 201
    mine = await identity_records(settings.database_url, client_id=answer["client_id"])
    raw = [orjson.dumps(r, default=str) for r in mine]
    assert [e["action"] for e in mine] == ["client.registered"]
    assert mine[0]["school_id"] == school.id
    assert mine[0]["ip"] == "127.0.0.1"
    for r in raw:
        assert answer["client_secret"].encode() not in r
        assert answer["registration_access_token"].encode() not in r


# Open registration and rate limits ------------------------------------------------------


async def test_closed_school_refuses_while_another_allows(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    closed = await new_school(pool, settings, unique, "closed")
    still_open = await new_school(pool, settings, unique, "open")
    # Visit first so the Host cache holds the school as open: closing must win regardless.
    status, _, _ = await register(http, origin(identity_port, closed.subdomain), body())
    assert status == 201
    await store.set_open_registration(pool, closed.id, False)

    status, answer, _ = await register(http, origin(identity_port, closed.subdomain), body())
    assert status == 403
    assert answer["error"] == "access_denied"
    assert answer["error_description"]
    status, _, _ = await register(http, origin(identity_port, still_open.subdomain), body())
    assert status == 201


async def test_rate_limit_per_issuer_and_address(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await new_school(pool, settings, unique, "rl")
    other = await new_school(pool, settings, unique, "rlother")
    base = origin(identity_port, school.subdomain)
    for n in range(registration.REGISTRATIONS_PER_WINDOW):
        status, answer, _ = await register(http, base, body(client_name=f"App {n}"))
        assert status == 201, (n, answer)
    status, answer, headers = await register(http, base, body())
    assert status == 429
    assert answer["error"] == "slow_down"
    assert 1 <= int(headers["Retry-After"]) <= registration.REGISTRATION_WINDOW_SECONDS
    # The same address at another issuer has a window of its own.
    status, _, _ = await register(http, origin(identity_port, other.subdomain), body())
    assert status == 201


async def test_platform_origin_is_rate_limited_too(
    identity_url: str, http: Any, redis: Any, settings: Settings, identity_port: int
) -> None:
    # The platform's window is shared by every test registering there: start from and
    # leave an empty one.
    bucket = ratelimit.key(settings, "register", "platform", "127.0.0.1")
    await redis.delete(bucket)
    try:
        base = origin(identity_port)
        for _ in range(registration.REGISTRATIONS_PER_WINDOW):
            status, answer, _ = await register(http, base, body())
            assert status == 201, answer
        status, answer, headers = await register(http, base, body())
        assert status == 429
        assert int(headers["Retry-After"]) >= 1
    finally:
        await redis.delete(bucket)


async def test_hit_is_atomic_and_reports_retry_after(redis: Any, settings: Settings) -> None:
    key = ratelimit.key(settings, "test", os.urandom(4).hex())
    results = await asyncio.gather(*(ratelimit.hit(redis, key, 10, 30) for _ in range(50)))
    assert sum(allowed for allowed, _ in results) == 10
    assert all(0 < retry <= 30 for allowed, retry in results if not allowed)
    assert 0 < await redis.ttl(key) <= 30


def test_ipv6_addresses_share_their_64() -> None:
    assert ratelimit.address_bucket("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert ratelimit.address_bucket("2001:db8:1:2::9") == "2001:db8:1:2::/64"
    assert ratelimit.address_bucket("::ffff:192.0.2.7") == "192.0.2.7"
    assert ratelimit.address_bucket("192.0.2.7") == "192.0.2.7"


async def test_cli_turns_open_registration_off_and_on(
    identity_url: str,
    http: Any,
    pool: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
    base_env: dict[str, str],
) -> None:
    school = await new_school(pool, settings, unique, "cli")
    cli = str(Path(sys.executable).parent / "loopwise-connect")
    env = {**os.environ, **base_env}

    async def update(value: str) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            cli,
            "schools",
            "update",
            "--school",
            school.subdomain,
            "--open-registration",
            value,
            "--json",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        result: dict[str, Any] = orjson.loads(out)
        return result

    result = await update("false")
    assert result == {
        "school_id": school.id,
        "subdomain": school.subdomain,
        "name": school.name,
        "open_registration": False,
    }
    status, answer, _ = await register(http, origin(identity_port, school.subdomain), body())
    assert status == 403, answer
    assert (await update("true"))["open_registration"] is True
    status, _, _ = await register(http, origin(identity_port, school.subdomain), body())
    assert status == 201


# Management (RFC 7592) -------------------------------------------------------------------


async def test_read_update_delete_with_the_registration_token(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await new_school(pool, settings, unique)
    base = origin(identity_port, school.subdomain)
    status, made, _ = await register(http, base, body(scope="courses:read"))
    assert status == 201
    uri, auth = made["registration_client_uri"], bearer(made["registration_access_token"])
    # The seed's alias serves management too.
    alias = f"{base}/api/oauth/register/{made['client_id']}"
    for url in (uri, alias):
        async with http.get(url, headers=auth) as resp:
            assert resp.status == 200
            assert resp.headers["Cache-Control"] == "no-store"
            read = await resp.json()
        expected = {k: v for k, v in made.items() if k != "registration_access_token"}
        assert read == expected

    replacement = {
        **read,
        "client_name": "Renamed",
        "redirect_uris": ["https://app.example/new-callback"],
        "scope": "courses:read students:read",
        "logo_uri": "https://app.example/logo.png",
    }
    async with http.put(uri, json=replacement, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
        updated = await resp.json()
    assert updated["client_name"] == "Renamed"
    assert updated["redirect_uris"] == ["https://app.example/new-callback"]
    assert updated["scope"] == "courses:read students:read"
    assert updated["logo_uri"] == "https://app.example/logo.png"
    assert updated["token_endpoint_auth_method"] == "none"
    row = await store.client_by_id(pool, made["client_id"])
    assert row is not None and row.name == "Renamed"

    # Omitted members revert to defaults (RFC 7592 2.2); the auth method stays the client's.
    async with http.put(
        uri,
        json={"client_id": made["client_id"], "redirect_uris": ["https://app.example/cb"]},
        headers=auth,
    ) as resp:
        assert resp.status == 200
        minimal = await resp.json()
    assert minimal["scope"] == SEED_ANSWER["scope"]
    assert minimal["client_name"] == registration.DEFAULT_CLIENT_NAME
    assert minimal["token_endpoint_auth_method"] == "none"
    assert "logo_uri" not in minimal

    async with http.delete(uri, headers=auth) as resp:
        assert resp.status == 204
    assert await store.client_by_id(pool, made["client_id"]) is None
    async with http.get(uri, headers=auth) as resp:
        assert resp.status == 401


async def test_management_needs_this_clients_token(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await new_school(pool, settings, unique)
    base = origin(identity_port, school.subdomain)
    _, first, _ = await register(http, base, body())
    _, second, _ = await register(http, base, body())
    uri = first["registration_client_uri"]
    refusals = [
        {},
        bearer("lcg_wrong"),
        bearer(second["registration_access_token"]),
        {"Authorization": f"Basic {first['registration_access_token']}"},
        {"Authorization": "Bearer"},
    ]
    for headers in refusals:
        for method in ("GET", "PUT", "DELETE"):
            async with http.request(
                method, uri, json={"client_id": first["client_id"]}, headers=headers
            ) as resp:
                assert resp.status == 401, (method, headers)
                assert resp.headers["WWW-Authenticate"].startswith("Bearer ")
                assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
                assert (await resp.json())["error"] == "invalid_token"
    # A client that does not exist answers exactly like a wrong token.
    async with http.get(
        f"{base}/v1/oauth/register/no-such-client", headers=bearer("lcg_wrong")
    ) as resp:
        missing = (resp.status, await resp.json())
    async with http.get(uri, headers=bearer("lcg_wrong")) as resp:
        wrong = (resp.status, await resp.json())
    assert missing == wrong
    assert await store.client_by_id(pool, first["client_id"]) is not None


async def test_clients_not_made_by_registration_cannot_be_managed(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    from services.identity import clients

    school = await new_school(pool, settings, unique)
    made = await clients.create_client(
        pool,
        settings,
        school=school,
        name="Admin made",
        redirect_uris=["https://app.example/cb"],
        created_via="admin",
        with_registration_token=True,
    )
    assert made.registration_access_token is not None
    uri = f"{origin(identity_port, school.subdomain)}/v1/oauth/register/{made.client.id}"
    async with http.get(uri, headers=bearer(made.registration_access_token)) as resp:
        assert resp.status == 401


async def test_management_at_another_issuer_is_401(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    home = await new_school(pool, settings, unique, "home")
    away = await new_school(pool, settings, unique, "away")
    _, made, _ = await register(http, origin(identity_port, home.subdomain), body())
    auth = bearer(made["registration_access_token"])
    for base in (origin(identity_port, away.subdomain), origin(identity_port)):
        for method in ("GET", "DELETE"):
            async with http.request(
                method, f"{base}/v1/oauth/register/{made['client_id']}", headers=auth
            ) as resp:
                assert resp.status == 401
    assert await store.client_by_id(pool, made["client_id"]) is not None


async def test_put_must_name_the_client_and_its_secret(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await new_school(pool, settings, unique)
    _, made, _ = await register(
        http, origin(identity_port, school.subdomain), body(token_endpoint_auth_method=None)
    )
    uri, auth = made["registration_client_uri"], bearer(made["registration_access_token"])
    keep = {"client_id": made["client_id"], "redirect_uris": made["redirect_uris"]}
    bad = [
        {**keep, "client_id": "someone-else"},
        {k: v for k, v in keep.items() if k != "client_id"},
        {**keep, "client_secret": "lcs_not-the-secret"},
        {**keep, "token_endpoint_auth_method": "none"},
        {**keep, "redirect_uris": ["http://evil.example/cb"]},
    ]
    for doc in bad:
        async with http.put(uri, json=doc, headers=auth) as resp:
            assert resp.status == 400, doc
            assert (await resp.json())["error"] in (
                "invalid_client_metadata",
                "invalid_redirect_uri",
            )
    ok = {
        **keep,
        "client_secret": made["client_secret"],
        "token_endpoint_auth_method": "client_secret_post",
        # Read-only members a client may echo back from GET are ignored.
        "client_id_issued_at": made["client_id_issued_at"],
        "registration_client_uri": uri,
    }
    async with http.put(uri, json=ok, headers=auth) as resp:
        assert resp.status == 200, await resp.text()
        answer = await resp.json()
    assert answer["token_endpoint_auth_method"] == "client_secret_post"
    assert "client_secret" not in answer
    row = await store.client_by_id(pool, made["client_id"])
    assert row is not None
    assert row.secret_hash == credentials.keyed_hash(settings.secret_pepper, made["client_secret"])


async def test_delete_revokes_the_clients_grants(
    identity_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    school = await new_school(pool, settings, unique)
    _, made, _ = await register(http, origin(identity_port, school.subdomain), body())
    grant = await grants.create_grant(
        pool,
        school_id=school.id,
        client_id=made["client_id"],
        user_id=None,
        scopes=["courses:read"],
    )
    async with http.delete(
        made["registration_client_uri"], headers=bearer(made["registration_access_token"])
    ) as resp:
        assert resp.status == 204
    # The grant row went with the client (ON DELETE CASCADE); what gateways act on stays:
    # the revocation mark and the announcement on connect:revocations.
    assert await store.grant_by_id(pool, grant.id) is None
    assert await redis.exists(keys.revoked_mark(settings, grant.school_id, grant.id)) == 1
    announced = await stream_entries(redis, settings.stream(streams.REVOCATIONS))
    assert {"grant_id": str(grant.id), "reason": "client_deleted"}.items() <= next(
        e for e in announced if e["grant_id"] == str(grant.id)
    ).items()
    audited = await identity_records(settings.database_url, client_id=made["client_id"])
    actions = [e["action"] for e in audited]
    assert actions[-2:] == ["grant.revoked", "client.deleted"]


async def test_update_revokes_grants_wider_than_the_new_registration(
    identity_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    school = await new_school(pool, settings, unique)
    _, made, _ = await register(
        http, origin(identity_port, school.subdomain), body(scope="courses:read students:read")
    )
    # Two users' grants: one within the narrowed registration, one wider.
    grant_of = await grants_of_new_users(
        pool,
        school.id,
        made["client_id"],
        unique,
        {"narrow": ["courses:read"], "wide": ["courses:read", "students:read"]},
    )
    narrow, wide = grant_of["narrow"], grant_of["wide"]
    doc = {
        "client_id": made["client_id"],
        "redirect_uris": made["redirect_uris"],
        "scope": "courses:read",
    }
    async with http.put(
        made["registration_client_uri"],
        json=doc,
        headers=bearer(made["registration_access_token"]),
    ) as resp:
        assert resp.status == 200
    narrow_row = await store.grant_by_id(pool, narrow.id)
    wide_row = await store.grant_by_id(pool, wide.id)
    assert narrow_row is not None and narrow_row.revoked_at is None
    assert wide_row is not None and wide_row.revoked_at is not None
    assert await redis.exists(keys.revoked_mark(settings, wide.school_id, wide.id)) == 1
    announced = await stream_entries(redis, settings.stream(streams.REVOCATIONS))
    assert any(e["grant_id"] == str(wide.id) for e in announced)
    assert not any(e["grant_id"] == str(narrow.id) for e in announced)


async def test_update_keeps_grants_of_identity_scopes_and_umbrella_covered_scopes(
    identity_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    """Identity scopes are granted without being registered, and a registered umbrella covers
    its data scopes: a PUT that only adds a redirect URI must not end such grants."""
    school = await new_school(pool, settings, unique, "regumb")
    _, made, _ = await register(
        http, origin(identity_port, school.subdomain), body(scope="read courses:write")
    )
    grant_of = await grants_of_new_users(
        pool,
        school.id,
        made["client_id"],
        unique,
        {
            "umbrella": ["openid", "read"],
            "covered": ["openid", "profile", "email", "courses:read"],
            "wider": ["openid", "students:write"],
        },
    )
    doc = {
        "client_id": made["client_id"],
        "redirect_uris": [*made["redirect_uris"], "https://app.example/other-callback"],
        "scope": made["scope"],
    }
    async with http.put(
        made["registration_client_uri"],
        json=doc,
        headers=bearer(made["registration_access_token"]),
    ) as resp:
        assert resp.status == 200, await resp.text()
    for name in ("umbrella", "covered"):
        row = await store.grant_by_id(pool, grant_of[name].id)
        assert row is not None and row.revoked_at is None, name
        assert not await redis.exists(keys.revoked_mark(settings, row.school_id, row.id)), name
    wider = await store.grant_by_id(pool, grant_of["wider"].id)
    assert wider is not None and wider.revoked_at is not None
    assert await redis.exists(keys.revoked_mark(settings, wider.school_id, wider.id)) == 1


def test_within_registration_expands_umbrellas_and_admits_identity_scopes() -> None:
    assert registration.within_registration(["openid", "profile", "email"], [])
    assert registration.within_registration(["openid", "courses:read", "read"], ["read"])
    assert registration.within_registration(["courses:write"], ["write"])
    assert not registration.within_registration(["courses:write"], ["read"])
    # An umbrella grant needs the umbrella registered, as authorize asks of a new request.
    assert not registration.within_registration(["read"], ["courses:read"])
    assert not registration.within_registration(["admin:read"], ["read"])


def test_forwarded_address_is_trusted_only_when_configured(settings: Settings) -> None:
    import dataclasses

    from aiohttp.test_utils import make_mocked_request

    headers = {"X-Forwarded-For": "203.0.113.9, 10.0.0.2"}
    request = make_mocked_request("POST", "/v1/oauth/register", headers=headers)
    peer = ratelimit.client_address(request, settings)
    assert peer != "203.0.113.9"
    trusting = dataclasses.replace(settings, trust_forwarded_host=True)
    assert ratelimit.client_address(request, trusting) == "203.0.113.9"
    garbage = make_mocked_request(
        "POST", "/v1/oauth/register", headers={"X-Forwarded-For": "not-an-ip"}
    )
    assert ratelimit.client_address(garbage, trusting) == peer
