"""Closing a school's registration (`schools update --open-registration false`) ends, at once
and at every gateway, the grants of apps that registered themselves (RFC 7591) at that school:
the school's own and platform apps alike. Apps made by an admin, the CLI or an operator keep
theirs, and so does every app at other schools.

The CLI runs as a real process against the run's stores; the tokens come from identity's token
endpoint through the run's gateway (echo upstream), and are tried there right after the command
has returned.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import pytest

from libs.common.config import Settings
from services.identity import clients, grants, keys, schools, store
from services.identity.store import authorize as flow_store
from tests.test_cli import _cli
from tests.test_gateway_support import World, echo_upstream, make_world
from tests.token_helpers import insert_code, pkce_pair, revocation_marked

__all__ = ["echo_upstream"]

pytestmark = pytest.mark.usefixtures("echo_upstream")

REDIRECT = "http://127.0.0.1/callback"


@dataclass(frozen=True)
class App:
    client: store.Client
    secret: str | None

    def auth(self) -> dict[str, str]:
        """The client's credentials as form fields (client_secret_post, or a public client's
        client_id alone)."""
        if self.secret is None:
            return {"client_id": self.client.id}
        return {"client_id": self.client.id, "client_secret": self.secret}


@dataclass(frozen=True)
class Issued:
    app: App
    host: str  # where its issuer answers (through the gateway)
    access_token: str
    refresh_token: str
    grant_id: UUID


async def _app(
    pool: asyncpg.Pool,
    settings: Settings,
    school: store.School | None,
    created_via: str,
    *,
    public: bool = True,
) -> App:
    made = await clients.create_client(
        pool,
        settings,
        school=school,
        name=f"{created_via} app",
        redirect_uris=[REDIRECT],
        public=public,
        scopes=["openid", "events:read"],
        created_via=created_via,
        with_registration_token=created_via == "registration",
    )
    return App(made.client, made.client_secret)


def _issuer_host(settings: Settings, app: App, world: World) -> str:
    return world.host if app.client.school_id is not None else f"localhost:{world.gateway_port}"


async def _exchange(
    http: Any,
    gateway_url: str,
    pool: asyncpg.Pool,
    settings: Settings,
    world: World,
    app: App,
) -> tuple[int, dict[str, Any], UUID]:
    """A code for `world`'s user and `app`, as the authorize flow stores it after consent,
    redeemed at the app's issuer through the gateway: (status, body, grant id)."""
    verifier, challenge = pkce_pair()
    code, grant_id = await insert_code(
        pool,
        settings,
        school_id=world.school.id,
        client_id=app.client.id,
        user_id=world.user.id,
        scopes=["openid", "events:read"],
        challenge=challenge,
        redirect_uri=REDIRECT,
    )
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": verifier,
        **app.auth(),
    }
    host = _issuer_host(settings, app, world)
    async with http.post(
        gateway_url + "/v1/oauth/token", data=form, headers={"Host": host}
    ) as resp:
        return resp.status, await resp.json(), grant_id


async def _issued(
    http: Any,
    gateway_url: str,
    pool: asyncpg.Pool,
    settings: Settings,
    world: World,
    app: App,
) -> Issued:
    status, body, grant_id = await _exchange(http, gateway_url, pool, settings, world, app)
    assert status == 200, body
    host = _issuer_host(settings, app, world)
    return Issued(app, host, body["access_token"], body["refresh_token"], grant_id)


async def _call(http: Any, gateway_url: str, world: World, issued: Issued) -> int:
    """A protected call with the token where it is meant to work: the school's API for a
    school-API token, the MCP endpoint (a ping) for a self-registered platform app's."""
    headers = {"Authorization": f"Bearer {issued.access_token}"}
    if issued.app.client.is_platform and issued.app.client.created_via == "registration":
        headers |= {
            "Host": f"localhost:{world.gateway_port}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        ping = orjson.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"})
        async with http.post(gateway_url + "/mcp", data=ping, headers=headers) as resp:
            return int(resp.status)
    headers["Host"] = world.host
    async with http.get(gateway_url + "/api/v1/events", headers=headers) as resp:
        return int(resp.status)


async def _refresh(http: Any, gateway_url: str, issued: Issued) -> tuple[int, dict[str, Any]]:
    form = {"grant_type": "refresh_token", "refresh_token": issued.refresh_token}
    async with http.post(
        gateway_url + "/v1/oauth/token",
        data={**form, **issued.app.auth()},
        headers={"Host": issued.host},
    ) as resp:
        return resp.status, await resp.json()


async def _set_registration(gateway_env: dict[str, str], school: str, value: str) -> int:
    run = await _cli(
        gateway_env, "schools", "update", "--school", school, "--open-registration", value, "--json"
    )
    assert run.code == 0, run.err
    answer = run.json()
    assert answer["open_registration"] is (value == "true")
    # Named only when closing ended any grant.
    revoked = answer.get("revoked_grants", 0)
    assert (isinstance(revoked, int) and revoked != 0) or "revoked_grants" not in answer
    return revoked


async def _reason(pool: asyncpg.Pool, grant_id: UUID) -> str | None:
    reason: str | None = await pool.fetchval(
        "SELECT revoked_reason FROM grants WHERE id = $1", grant_id
    )
    return reason


async def _consented(pool: asyncpg.Pool, world: World, app: App) -> bool:
    scopes = await flow_store.consented_scopes(
        pool, user_id=world.user.id, client_id=app.client.id, school_id=world.school.id
    )
    return scopes is not None


async def test_closing_registration_ends_self_registered_apps_grants_at_once(
    gateway_url: str,
    gateway_env: dict[str, str],
    gateway_settings: Settings,
    gateway_port: int,
    http: Any,
    pool: asyncpg.Pool,
    redis: Any,
) -> None:
    settings = gateway_settings
    await keys.ensure_issuer_keys(pool, settings, None)
    world = await make_world(pool, settings, "close", gateway_port)
    elsewhere = await make_world(pool, settings, "open", gateway_port)

    ended = {
        "school app that registered itself": await _app(
            pool, settings, world.school, "registration"
        ),
        "confidential school app that registered itself": await _app(
            pool, settings, world.school, "registration", public=False
        ),
        "platform app that registered itself": await _app(pool, settings, None, "registration"),
    }
    kept = {
        "admin-made school app": await _app(pool, settings, world.school, "admin"),
        "CLI-made school app": await _app(pool, settings, world.school, "cli", public=False),
        "operator-made platform app": await _app(pool, settings, None, "cli"),
    }
    issued = {
        name: await _issued(http, gateway_url, pool, settings, world, app)
        for name, app in {**ended, **kept}.items()
    }
    # At another school, self-registered apps are untouched.
    other_app = await _app(pool, settings, elsewhere.school, "registration")
    other = await _issued(http, gateway_url, pool, settings, elsewhere, other_app)
    for app in {**ended, **kept}.values():
        await flow_store.upsert_consent(
            pool,
            user_id=world.user.id,
            client_id=app.client.id,
            school_id=world.school.id,
            scopes=["openid", "events:read"],
        )
    for name, token in issued.items():
        assert await _call(http, gateway_url, world, token) == 200, name
    assert await _call(http, gateway_url, elsewhere, other) == 200

    revoked = await _set_registration(gateway_env, world.school.subdomain, "false")

    # Refused the moment the command has returned, at the gateway; the rest work on.
    for name in ended:
        token = issued[name]
        assert await _call(http, gateway_url, world, token) == 401, name
        assert await revocation_marked(redis, settings, token.grant_id) == (True, True), name
        assert await _reason(pool, token.grant_id) == "registration_closed", name
        status, body = await _refresh(http, gateway_url, token)
        assert (status, body["error"]) == (400, "invalid_grant"), name
        assert not await _consented(pool, world, token.app), name
    for name in kept:
        token = issued[name]
        assert await _call(http, gateway_url, world, token) == 200, name
        assert await _reason(pool, token.grant_id) is None, name
        status, body = await _refresh(http, gateway_url, token)
        assert status == 200, (name, body)
        assert await _consented(pool, world, token.app), name
    assert await _call(http, gateway_url, elsewhere, other) == 200
    assert (await _refresh(http, gateway_url, other))[0] == 200
    assert revoked == len(ended)

    # Closing what is closed ends nothing more, and changes nothing for the others.
    assert await _set_registration(gateway_env, world.school.subdomain, "false") == 0
    assert await _call(http, gateway_url, world, issued["admin-made school app"]) == 200


async def test_a_closed_school_gives_self_registered_apps_nothing_new(
    gateway_url: str,
    gateway_env: dict[str, str],
    gateway_settings: Settings,
    gateway_port: int,
    http: Any,
    pool: asyncpg.Pool,
    redis: Any,
) -> None:
    """After closing: a self-registered app cannot start an authorization at the school, and a
    code made in spite of it (a flow that was past its checks when the school closed, after
    the closing had listed the grants to end) is refused at the token endpoint, its grant
    ended. Apps made by an admin still get tokens; opening again lets the others back in."""
    settings = gateway_settings
    await keys.ensure_issuer_keys(pool, settings, None)
    world = await make_world(pool, settings, f"late{secrets.token_hex(2)}", gateway_port)
    school_app = await _app(pool, settings, world.school, "registration")
    platform_app = await _app(pool, settings, None, "registration")
    admin_app = await _app(pool, settings, world.school, "admin")

    assert await _set_registration(gateway_env, world.school.subdomain, "false") == 0

    for app in (school_app, platform_app):
        status, body, grant_id = await _exchange(http, gateway_url, pool, settings, world, app)
        assert status == 400, (app.client.created_via, body)
        assert body["error"] == "invalid_grant" and "access_token" not in body
        assert await _reason(pool, grant_id) == "registration_closed"
        assert await revocation_marked(redis, settings, grant_id) == (True, True)
    status, body, _ = await _exchange(http, gateway_url, pool, settings, world, admin_app)
    assert status == 200, body

    # The authorization request itself is refused on our own page, not redirected to the app.
    _, challenge = pkce_pair()
    query = {
        "response_type": "code",
        "client_id": school_app.client.id,
        "redirect_uri": REDIRECT,
        "scope": "openid events:read",
        "state": "s1",
        "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    async with http.get(
        gateway_url + "/v1/oauth/authorize", params=query, headers={"Host": world.host}
    ) as resp:
        page = await resp.text()
        assert resp.status == 400, page
        assert "Location" not in resp.headers
    assert "does not accept applications that registered themselves" in page
    async with http.get(
        gateway_url + "/v1/oauth/authorize",
        params={**query, "client_id": admin_app.client.id},
        headers={"Host": world.host},
    ) as resp:
        # The admin's app goes on to the sign-in page.
        assert resp.status in (200, 303), await resp.text()

    # A grant made while closed and left live (an interrupted closing, say) is ended by the
    # next closing.
    left = await store.insert_grant(
        pool,
        school_id=world.school.id,
        client_id=school_app.client.id,
        user_id=world.user.id,
        scopes=["events:read"],
    )
    assert await _set_registration(gateway_env, world.school.subdomain, "false") == 1
    assert await _reason(pool, left.id) == "registration_closed"

    assert await _set_registration(gateway_env, world.school.subdomain, "true") == 0
    for app in (school_app, platform_app):
        status, body, _ = await _exchange(http, gateway_url, pool, settings, world, app)
        assert status == 200, body


async def test_closing_ends_every_page_of_grants(
    gateway_settings: Settings,
    gateway_port: int,
    pool: asyncpg.Pool,
    redis: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Many grants end in rounds (schools.CLOSING_PAGE at a time): every round's grants are
    revoked, marked and announced, the last short round too; already revoked grants are not
    counted again."""
    settings = gateway_settings
    world = await make_world(pool, settings, f"pages{secrets.token_hex(2)}", gateway_port)
    app = await _app(pool, settings, world.school, "registration")
    made = [
        await store.insert_grant(
            pool,
            school_id=world.school.id,
            client_id=app.client.id,
            user_id=world.user.id,
            scopes=["events:read"],
        )
        for _ in range(5)
    ]
    await grants.revoke_grant(pool, redis, settings, made[0].id, reason="test")
    monkeypatch.setattr(schools, "CLOSING_PAGE", 2)
    ended = await schools.set_open_registration(pool, redis, settings, world.school.id, False)
    assert ended == 4
    for grant in made[1:]:
        assert await _reason(pool, grant.id) == "registration_closed"
        assert await revocation_marked(redis, settings, grant.id) == (True, True)
    assert await _reason(pool, made[0].id) == "test"
