"""client_credentials: a confidential client acting for itself, on one standing grant."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID

from libs.common.config import Settings
from services.identity import clients, resources, schools
from tests.token_helpers import (
    audit_actions,
    basic,
    introspect,
    make_world,
    origin_of,
    post_form,
    revocation_marked,
    token,
    verify_with_jwks,
)

SCOPES = ("openid", "read", "courses:read", "orders:read", "school:write")


async def _service_client(
    pool: Any, settings: Settings, unique: str, port: int, scopes: tuple[str, ...] = SCOPES
) -> tuple[Any, Any, str, str]:
    school = await schools.create_school(pool, settings, f"cc{unique}", "Machine School")
    made = await clients.create_client(
        pool,
        settings,
        school=school,
        name="Nightly Sync",
        redirect_uris=[],
        scopes=scopes,
        grant_types=["client_credentials"],
    )
    assert made.client_secret is not None
    return school, made.client, made.client_secret, origin_of(school.subdomain, port)


async def test_confidential_client_gets_a_token_for_itself(
    identity_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    school, client, secret, origin = await _service_client(pool, settings, unique, identity_port)
    answer = await token(
        http, origin, {"grant_type": "client_credentials"}, authorization=basic(client.id, secret)
    )
    assert answer.status == 200, answer.body
    body = answer.body
    assert "refresh_token" not in body and "id_token" not in body
    assert body["token_type"] == "Bearer" and body["expires_in"] == 7200
    # Default: every data scope the client registered; identity scopes need a user.
    assert body["scope"] == "read courses:read orders:read school:write"
    assert body["school_id"] == school.id and body["school_subdomain"] == school.subdomain
    header, claims = await verify_with_jwks(http, origin, body["access_token"])
    assert header["typ"] == "at+jwt"
    assert claims["sub"] == client.id and claims["client_id"] == client.id
    assert claims["iss"] == origin and claims["aud"] == origin
    assert claims["school_id"] == school.id and "auth_time" not in claims
    grant = await pool.fetchrow("SELECT * FROM grants WHERE id = $1::uuid", claims["grant_id"])
    assert grant["user_id"] is None and grant["client_id"] == client.id
    assert "token.issued" in await audit_actions(redis, settings, claims["grant_id"])

    # client_secret_post works as well, and the same standing grant is used.
    again = await token(
        http,
        origin,
        {"grant_type": "client_credentials", "client_id": client.id, "client_secret": secret},
    )
    _, claims2 = await verify_with_jwks(http, origin, again.body["access_token"])
    assert claims2["grant_id"] == claims["grant_id"] and claims2["jti"] != claims["jti"]


async def test_scopes_are_limited_to_the_clients_data_scopes(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    _, client, secret, origin = await _service_client(pool, settings, unique, identity_port)
    auth = basic(client.id, secret)

    async def ask(scope: str) -> Any:
        return await token(
            http, origin, {"grant_type": "client_credentials", "scope": scope}, authorization=auth
        )

    narrowed = await ask("courses:read")
    assert narrowed.status == 200 and narrowed.body["scope"] == "courses:read"
    # `students:read` is inside the registered umbrella `read`.
    inside = await ask("students:read orders:read")
    assert inside.status == 200 and inside.body["scope"] == "students:read orders:read"
    for refused in (
        "admin:read",
        "admin:write",
        "openid",
        "profile email",
        "courses:write",
        "write",
        "nonsense",
    ):
        answer = await ask(refused)
        assert answer.status == 400 and answer.body["error"] == "invalid_scope", refused
    target = await token(
        http,
        origin,
        {"grant_type": "client_credentials", "resource": "https://evil.example/api"},
        authorization=auth,
    )
    assert target.status == 400 and target.body["error"] == "invalid_target"
    mcp = await token(
        http,
        origin,
        {"grant_type": "client_credentials", "resource": resources.mcp_resource(settings)},
        authorization=auth,
    )
    # The MCP resource takes the platform's tokens only; a school's client has no platform.
    assert mcp.status == 400 and mcp.body["error"] == "invalid_target"


async def test_client_with_only_identity_scopes_has_nothing_to_grant_itself(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    _, client, secret, origin = await _service_client(
        pool, settings, unique, identity_port, scopes=("openid", "email")
    )
    answer = await token(
        http, origin, {"grant_type": "client_credentials"}, authorization=basic(client.id, secret)
    )
    assert answer.status == 400 and answer.body["error"] == "invalid_scope"


async def test_public_clients_and_clients_without_the_grant_are_refused(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    world = await make_world(pool, settings, unique, identity_port)
    public = await token(
        http, world.origin, {"grant_type": "client_credentials", "client_id": world.public.id}
    )
    assert public.status == 400 and public.body["error"] == "unauthorized_client"
    without = await token(
        http,
        world.origin,
        {"grant_type": "client_credentials"},
        authorization=basic(world.confidential.id, world.secret),
    )
    assert without.status == 400 and without.body["error"] == "unauthorized_client"
    wrong_secret = await token(
        http,
        world.origin,
        {"grant_type": "client_credentials"},
        authorization=basic(world.confidential.id, "lcs_wrong"),
    )
    assert wrong_secret.status == 401 and wrong_secret.body["error"] == "invalid_client"


async def test_concurrent_first_requests_share_one_standing_grant(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    _, client, secret, origin = await _service_client(pool, settings, unique, identity_port)
    auth = basic(client.id, secret)
    answers = await asyncio.gather(
        *(
            token(http, origin, {"grant_type": "client_credentials"}, authorization=auth)
            for _ in range(12)
        )
    )
    assert all(a.status == 200 for a in answers)
    live = await pool.fetchval(
        "SELECT count(*) FROM grants WHERE client_id = $1 AND user_id IS NULL", client.id
    )
    assert live == 1


async def test_revoking_a_client_token_ends_the_standing_grant_and_a_new_one_starts(
    identity_url: str,
    http: Any,
    pool: Any,
    redis: Any,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    _, client, secret, origin = await _service_client(pool, settings, unique, identity_port)
    auth = basic(client.id, secret)
    first = await token(http, origin, {"grant_type": "client_credentials"}, authorization=auth)
    _, claims = await verify_with_jwks(http, origin, first.body["access_token"])
    revoked = await post_form(
        http, origin + "/v1/oauth/revoke", {"token": first.body["access_token"]}, authorization=auth
    )
    assert revoked.status == 200
    assert await revocation_marked(redis, settings, UUID(claims["grant_id"])) == (True, True)
    introspected = await post_form(
        http,
        origin + "/v1/oauth/introspect",
        {"token": first.body["access_token"]},
        authorization=auth,
    )
    assert introspected.body == {"active": False}

    second = await token(http, origin, {"grant_type": "client_credentials"}, authorization=auth)
    assert second.status == 200
    _, claims2 = await verify_with_jwks(http, origin, second.body["access_token"])
    assert claims2["grant_id"] != claims["grant_id"]
    active = await post_form(
        http,
        origin + "/v1/oauth/introspect",
        {"token": second.body["access_token"]},
        authorization=auth,
    )
    assert active.body["active"] is True and active.body["sub"] == client.id


async def test_platform_clients_cannot_use_client_credentials(
    identity_url: str, http: Any, pool: Any, settings: Settings, identity_port: int
) -> None:
    made = await clients.create_client(
        pool,
        settings,
        school=None,
        name="Platform Robot",
        redirect_uris=[],
        scopes=["courses:read"],
        grant_types=["client_credentials"],
    )
    assert made.client_secret is not None
    answer = await token(
        http,
        f"http://localhost:{identity_port}",
        {"grant_type": "client_credentials"},
        authorization=basic(made.client.id, made.client_secret),
    )
    assert answer.status == 400 and answer.body["error"] == "unauthorized_client"


async def test_world_helper_introspection_of_client_token(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    """The first-party resource server view: another client of the school sees it only when
    first-party."""
    world = await make_world(
        pool,
        settings,
        unique,
        identity_port,
        grant_types=["authorization_code", "refresh_token", "client_credentials"],
    )
    answer = await token(
        http,
        world.origin,
        {"grant_type": "client_credentials", "scope": "courses:read"},
        authorization=basic(world.confidential.id, world.secret),
    )
    assert answer.status == 200, answer.body
    own = await introspect(http, world, answer.body["access_token"])
    assert own["active"] is True and own["token_type"] == "Bearer"
