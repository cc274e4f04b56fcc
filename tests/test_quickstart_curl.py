"""Seed 001's quickstart, run with curl as printed (only the host replaced), from registration
to refresh, against the `demo` school with school_id 42."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import shutil
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlencode, urlsplit

import asyncpg
import pytest

from libs.common.config import Settings
from services.identity import schools, store, users
from tests.test_authorize import PASSWORD, Browser

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


async def curl(*args: str) -> dict[str, object]:
    """Run curl as the quickstart prints it; return the JSON it answered."""
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    answer: dict[str, object] = json.loads(out)
    return answer


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    b = Browser()
    yield b
    await b.close()


async def _demo_school(pool: asyncpg.Pool, settings: Settings) -> store.School:
    found = await store.school_by_subdomain(pool, "demo")
    if found is None:
        try:
            found = await schools.create_school(pool, settings, "demo", "Demo School", 42)
        except asyncpg.UniqueViolationError:
            found = await store.school_by_subdomain(pool, "demo")
    assert found is not None
    return found


async def test_quickstart_as_printed(
    identity_url: str,
    identity_port: int,
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    browser: Browser,
) -> None:
    demo = await _demo_school(pool, settings)
    assert demo.id == 42
    host = f"http://demo.localhost:{identity_port}"
    admin, _ = await users.create_user(
        pool, school_id=42, email=f"quick-{unique}@example.com", password=PASSWORD, role="admin"
    )

    # Step 1, option B: dynamic client registration.
    registered = await curl(
        "-X",
        "POST",
        f"{host}/api/oauth/register",
        "-H",
        "Content-Type: application/json",
        "-d",
        """{
"client_name": "My Integration",
"redirect_uris": ["https://myapp.com/callback"],
"grant_types": ["authorization_code", "refresh_token"],
"response_types": ["code"],
"token_endpoint_auth_method": "none"
}""",
    )
    client_id = str(registered["client_id"])
    assert registered["client_name"] == "My Integration"
    assert registered["redirect_uris"] == ["https://myapp.com/callback"]
    assert registered["token_endpoint_auth_method"] == "none"
    assert registered["scope"] == (
        "read write courses:read courses:write students:read students:write analytics:read "
        "curriculum:read curriculum:write orders:read school:read"
    )

    # Step 2: the user's browser goes to the authorization URL exactly as the guide builds it.
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
    query = urlencode(
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": "https://myapp.com/callback",
            "scope": "read courses:read students:read",
            "state": "RANDOM_STATE_VALUE",
            "code_challenge": challenge.rstrip(b"=").decode(),
            "code_challenge_method": "S256",
        }
    )
    status, headers, page = await browser.get(f"{host}/oauth/authorize?{query}")
    assert status == 200, page
    status, headers, page = await browser.login(host, page, admin.email, PASSWORD)
    status, headers, page = await browser.follow(host, status, headers, page)
    assert status == 200, page
    assert "Read course details, curriculum, and enrollment data" in page
    status, headers, _ = await browser.decide(host, page, "allow")
    callback = urlsplit(headers["Location"])
    assert f"{callback.scheme}://{callback.netloc}{callback.path}" == "https://myapp.com/callback"
    params = {k: v[0] for k, v in parse_qs(callback.query).items()}
    assert params["state"] == "RANDOM_STATE_VALUE"

    # Step 3: exchange the code for tokens.
    tokens = await curl(
        "-X",
        "POST",
        f"{host}/api/oauth/token",
        "-H",
        "Content-Type: application/x-www-form-urlencoded",
        "-d",
        "grant_type=authorization_code",
        "-d",
        f"code={params['code']}",
        "-d",
        "redirect_uri=https://myapp.com/callback",
        "-d",
        f"client_id={client_id}",
        "-d",
        f"code_verifier={verifier}",
    )
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 7200
    assert tokens["scope"] == "read courses:read students:read"
    assert tokens["school_id"] == 42
    assert tokens["school_subdomain"] == "demo"
    assert str(tokens["access_token"]).startswith("eyJ")
    assert tokens["refresh_token"]

    # Refreshing tokens, as printed.
    refreshed = await curl(
        "-X",
        "POST",
        f"{host}/api/oauth/token",
        "-d",
        "grant_type=refresh_token",
        "-d",
        f"refresh_token={tokens['refresh_token']}",
        "-d",
        f"client_id={client_id}",
    )
    assert refreshed["token_type"] == "Bearer"
    assert refreshed["school_id"] == 42
    assert refreshed["refresh_token"] != tokens["refresh_token"]
    assert refreshed["scope"] == "read courses:read students:read"
