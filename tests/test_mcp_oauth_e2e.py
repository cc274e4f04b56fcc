"""Contract section 9 as an MCP client lives it: the MCP SDK's own OAuth client meets the
gateway's 401, reads the RFC 9728 metadata, discovers the platform's authorization server,
registers itself (RFC 7591), sends the user through sign-in, the school picker and consent,
redeems the code with PKCE and the `resource`, and then calls tools on the picked school.

Nothing here is minted or inserted: every step is the real endpoint, through the gateway."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx2
import orjson
import pytest
from mcp import types
from mcp.client.auth import OAuthClientProvider
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import (
    AuthorizationCodeResult,
    OAuthClientInformationFull,
    OAuthClientMetadata,
    OAuthToken,
)

from libs.common.config import Settings
from services.identity import store
from tests.test_authorize import Browser, form, query_of
from tests.test_gateway_support import extra_gateway
from tests.test_mcp import System, Tenant, new_tenant

pytestmark = pytest.mark.timeout(60)

REDIRECT = "http://127.0.0.1:33419/callback"
PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
async def system(
    gateway_env: dict[str, str], gateway_port: int, gateway_identity_url: str, school_api_url: str
) -> AsyncIterator[System]:
    async with extra_gateway(gateway_env, SCHOOL_API_URL=school_api_url) as base:
        yield System(base, gateway_port)


class MemoryStorage:
    """The SDK's TokenStorage, kept in memory as a desktop client keeps it on disk."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


class ToThisGateway(httpx2.AsyncBaseTransport):
    """Sends the platform origin's requests to this module's gateway, Host left as written
    (the client only knows the public URLs the metadata gives it)."""

    def __init__(self, system: System) -> None:
        self._gateway = urlsplit(system.gateway)
        self._public = system.platform_host
        self._inner = httpx2.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.netloc.decode() == self._public:
            request.url = request.url.copy_with(
                host=self._gateway.hostname, port=self._gateway.port
            )
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class Person:
    """The user at the browser: signs in, picks the school, allows."""

    def __init__(self, system: System, email: str, school_id: int) -> None:
        self._system = system
        self._email = email
        self._school_id = school_id
        self.pages: list[str] = []
        self.consents: list[str] = []
        self.answer: dict[str, str] = {}

    async def authorize(self, url: str) -> None:
        base = self._system.platform
        assert url.startswith(base + "/v1/oauth/authorize?"), url
        browser = Browser()
        try:
            status, headers, page = await browser.get(url)
            assert status == 200, (url, headers.get("Location"))
            status, headers, page = await browser.login(base, page, self._email, PASSWORD)
            status, headers, page = await browser.follow(base, status, headers, page)
            self.pages.append(page)
            if 'action="/v1/oauth/select-school"' in page:
                picker = form(page, "/v1/oauth/select-school")
                fields = {
                    **picker.fields,
                    "school_id": str(self._school_id),
                    "decision": "continue",
                }
                status, headers, page = await browser.post(base + picker.action, fields)
                status, headers, page = await browser.follow(base, status, headers, page)
                self.pages.append(page)
            assert 'action="/v1/oauth/consent"' in page, page
            self.consents.append(page)
            status, headers, _ = await browser.decide(base, page, "allow")
            assert status in (302, 303)
            assert headers["Location"].startswith(REDIRECT + "?")
            self.answer = query_of(headers["Location"])
        finally:
            await browser.close()

    async def callback(self) -> AuthorizationCodeResult:
        return AuthorizationCodeResult(
            code=self.answer["code"], state=self.answer.get("state"), iss=self.answer.get("iss")
        )


async def test_an_mcp_client_connects_itself_and_reads_the_picked_school(
    system: System, gateway_url: str, pool: asyncpg.Pool, gateway_settings: Settings
) -> None:
    """`gateway_url`: the run's own gateway answers the public origin's pages, where the
    person's browser goes; the client's own requests go to this module's gateway."""
    picked = await new_tenant(pool, gateway_settings, "e2e")
    other: Tenant = await new_tenant(pool, gateway_settings, "e2o")
    # The same person belongs to both schools: the picker decides which one the app reads.
    await store.upsert_membership(pool, other.school.id, picked.user.id, "member")
    person = Person(system, picked.user.email, picked.school.id)
    storage = MemoryStorage()
    provider = OAuthClientProvider(
        server_url=system.mcp_resource,
        client_metadata=OAuthClientMetadata(
            client_name="Claude Code",
            redirect_uris=[REDIRECT],  # type: ignore[list-item]
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
            scope="courses:read courses:write",
        ),
        storage=storage,
        redirect_handler=person.authorize,
        callback_handler=person.callback,
    )
    async with (
        httpx2.AsyncClient(auth=provider, transport=ToThisGateway(system), timeout=30) as http,
        streamable_http_client(system.mcp_resource, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        listed = await session.list_tools()
        assert {"list_courses", "update_course"} <= {tool.name for tool in listed.tools}
        result = await session.call_tool("list_courses", {})
        assert not result.is_error, result
        courses: Any = orjson.loads(_text(result))
        # The 401 asked for reading only: the first consent granted no write scope.
        assert storage.tokens is not None and storage.tokens.scope is not None
        first_scopes = set(storage.tokens.scope.split())
        assert "courses:read" in first_scopes and "courses:write" not in first_scopes
        assert len(person.consents) == 1

        # A change: 403 insufficient_scope, the client asks the user for courses:write
        # (a second consent, for the difference), and the call goes through.
        rows = courses["data"] if isinstance(courses, dict) else courses
        course_id = rows[0]["id"]
        changed = await session.call_tool(
            "update_course", {"id": course_id, "title": "Renamed by the agent"}
        )
        assert not changed.is_error, _text(changed)
        assert len(person.consents) == 2
        assert "courses:write" in storage.tokens.scope.split()

    # The user was asked to pick between their two schools, then consented to the app.
    assert any(other.school.name in page and picked.school.name in page for page in person.pages)
    assert person.answer["iss"] == system.platform

    # What the app read is the picked school's, and only it; the change landed there.
    expected = {
        r["id"]
        for r in await pool.fetch(
            "SELECT id FROM school_api.courses WHERE school_id = $1", picked.school.id
        )
    }
    assert {row["id"] for row in rows} == expected
    title = await pool.fetchval(
        "SELECT title FROM school_api.courses WHERE school_id = $1 AND id = $2",
        picked.school.id,
        course_id,
    )
    assert title == "Renamed by the agent"
    # The second consent asked only for what was new.
    assert "courses:write" in person.consents[1]

    # Registered on the platform (no school), and the token is the platform's, for /mcp.
    assert storage.client is not None and storage.tokens is not None
    row = await pool.fetchrow(
        "SELECT school_id FROM clients WHERE id = $1", storage.client.client_id
    )
    assert row is not None and row["school_id"] is None
    claims = orjson.loads(_b64(storage.tokens.access_token.split(".")[1]))
    assert claims["iss"] == system.platform
    assert claims["aud"] == system.mcp_resource
    assert claims["school_id"] == picked.school.id
    assert secrets.compare_digest(claims["client_id"], storage.client.client_id)


def _text(result: types.CallToolResult) -> str:
    return "".join(c.text for c in result.content if isinstance(c, types.TextContent))


def _b64(segment: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
