"""Issuers from the Host: discovery per school and platform, unknown schools, the JWKS."""

from __future__ import annotations

from typing import Any

from libs.common import scopes
from libs.common.config import Settings
from services.identity import schools, store


async def test_school_discovery_names_its_own_issuer(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await schools.create_school(pool, settings, f"disc{unique}", "Discovery School")
    base = f"http://{school.subdomain}.localhost:{identity_port}"
    for path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
        async with http.get(base + path) as resp:
            assert resp.status == 200
            meta = await resp.json()
        assert meta["issuer"] == base
        assert meta["token_endpoint"] == f"{base}/v1/oauth/token"
        assert meta["jwks_uri"] == f"{base}/v1/oauth/jwks"
        assert meta["code_challenge_methods_supported"] == ["S256"]
        assert meta["response_types_supported"] == ["code"]
        assert meta["authorization_response_iss_parameter_supported"] is True


async def test_discovery_never_lists_admin_scopes(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    school = await schools.create_school(pool, settings, f"adm{unique}", "Admin Scope School")
    for base in (
        f"http://{school.subdomain}.localhost:{identity_port}",
        f"http://localhost:{identity_port}",
    ):
        async with http.get(base + "/.well-known/openid-configuration") as resp:
            meta = await resp.json()
        listed = set(meta["scopes_supported"])
        assert not listed & scopes.ADMIN_SCOPES
        assert {"openid", "profile", "email", "courses:read", "read", "write"} <= listed


async def test_closed_registration_is_not_advertised(
    identity_url: str, http: Any, pool: Any, settings: Settings, unique: str, identity_port: int
) -> None:
    still_open = await schools.create_school(pool, settings, f"dcro{unique}", "Open School")
    closed = await schools.create_school(pool, settings, f"dcrc{unique}", "Closed School")
    # Closed before its first request, so no Host cache holds it as open.
    await store.set_open_registration(pool, closed.id, False)
    open_base = f"http://{still_open.subdomain}.localhost:{identity_port}"
    closed_base = f"http://{closed.subdomain}.localhost:{identity_port}"
    platform = f"http://localhost:{identity_port}"
    for path in ("/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"):
        async with http.get(closed_base + path) as resp:
            assert resp.status == 200
            meta = await resp.json()
        assert "registration_endpoint" not in meta
        # The rest of the document is unchanged.
        assert meta["token_endpoint"] == f"{closed_base}/v1/oauth/token"
        async with http.get(open_base + path) as resp:
            assert (await resp.json())["registration_endpoint"] == f"{open_base}/v1/oauth/register"
        async with http.get(platform + path) as resp:
            assert (await resp.json())["registration_endpoint"] == f"{platform}/v1/oauth/register"
    # And the endpoint itself still refuses.
    async with http.post(
        closed_base + "/v1/oauth/register",
        json={"client_name": "App", "redirect_uris": ["https://app.example.com/cb"]},
    ) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"] == "access_denied"


async def test_platform_host_is_the_platform_issuer(
    identity_url: str, http: Any, identity_port: int
) -> None:
    base = f"http://localhost:{identity_port}"
    async with http.get(base + "/.well-known/openid-configuration") as resp:
        assert resp.status == 200
        assert (await resp.json())["issuer"] == base


async def test_unknown_school_is_404(identity_url: str, http: Any, identity_port: int) -> None:
    for host in ("no-such-school", "a.b"):
        url = f"http://{host}.localhost:{identity_port}/.well-known/openid-configuration"
        async with http.get(url) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "not_found"


async def test_health_ready_metrics_openapi(identity_url: str, http: Any) -> None:
    async with http.get(identity_url + "/healthz") as resp:
        assert resp.status == 200
    async with http.get(identity_url + "/readyz") as resp:
        body = await resp.json()
        assert resp.status == 200, body
        assert body["checks"] == {"postgresql": True, "redis": True, "background": True}
    async with http.get(identity_url + "/metrics") as resp:
        assert resp.status == 200
        assert "http_requests_total" in await resp.text()
    async with http.get(identity_url + "/openapi.json") as resp:
        doc = await resp.json()
        assert doc["openapi"].startswith("3.")
        assert "/v1/oauth/jwks" in doc["paths"]


async def test_openapi_lists_every_contract_endpoint(identity_url: str, http: Any) -> None:
    async with http.get(identity_url + "/openapi.json") as resp:
        paths = (await resp.json())["paths"]
    for path in (
        "/.well-known/openid-configuration",
        "/v1/oauth/authorize",
        "/v1/oauth/token",
        "/v1/oauth/register",
        "/v1/oauth/register/{client_id}",
        "/v1/oauth/revoke",
        "/v1/oauth/introspect",
        "/v1/oauth/userinfo",
        "/v1/oauth/jwks",
        "/oauth/authorize",
        "/api/oauth/token",
        "/api/oauth/register",
    ):
        assert path in paths, path
