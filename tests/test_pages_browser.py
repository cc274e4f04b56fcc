"""A real browser through the flow: sign in, read the consent screen, Allow, land at the app.

Chromium enforces what an HTTP client does not: the CSP (a blocked stylesheet or a form
whose redirect chain leaves `form-action` would break the flow here), cookie rules, and
pages that must work with JavaScript switched off.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from libs.common import scopes as catalogue
from libs.common.config import Settings
from tests.support import without_handler_cancellation
from tests.test_authorize import authorize_url, make_world, pkce

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = "/tmp/consent.png"


def _chromium_found() -> bool:
    return os.path.exists(CHROMIUM) or shutil.which(CHROMIUM) is not None


@pytest.fixture
async def chromium() -> AsyncIterator[Any]:
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright==1.65.2)")
    if not _chromium_found():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.fixture
async def client_app(
    aiohttp_server: AiohttpServer,
) -> tuple[str, asyncio.Queue[dict[str, str]]]:
    """The OAuth client's redirect target: records what arrives at /cb."""
    arrivals: asyncio.Queue[dict[str, str]] = asyncio.Queue()

    async def callback(request: web.Request) -> web.Response:
        arrivals.put_nowait(dict(request.query))
        return web.Response(
            text="<!doctype html><title>App</title><h1>Back at the app</h1>",
            content_type="text/html",
        )

    app = web.Application()
    app.router.add_get("/cb", callback)
    server = await aiohttp_server(app, access_log=None, shutdown_timeout=2)
    return str(without_handler_cancellation(server).make_url("/cb")), arrivals


async def test_sign_in_consent_allow_in_chromium(
    identity_url: str,
    chromium: Any,
    client_app: tuple[str, asyncio.Queue[dict[str, str]]],
    pool: asyncpg.Pool,
    settings: Settings,
    unique: str,
    identity_port: int,
) -> None:
    redirect_uri, arrivals = client_app
    world = await make_world(
        pool,
        settings,
        unique,
        identity_port,
        redirect_uris=(redirect_uri,),
        scopes=("courses:read", "students:read", "orders:read"),
    )
    _, challenge = pkce()
    url = authorize_url(
        world.base,
        world.client.id,
        redirect_uri=redirect_uri,
        challenge=challenge,
        scope="openid profile courses:read students:read",
        state="browser-state",
    )
    # No JavaScript at all: the pages must work without it.
    context = await chromium.new_context(
        java_script_enabled=False, viewport={"width": 520, "height": 1000}
    )
    page = await context.new_page()
    console_errors: list[str] = []
    page.on("console", lambda m: console_errors.append(m.text) if m.type == "error" else None)
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    stylesheets: list[str] = []
    page.on(
        "response", lambda r: stylesheets.append(r.url) if r.ok and "/static/" in r.url else None
    )
    try:
        response = await page.goto(url)
        assert response is not None and response.status == 200
        assert "frame-ancestors 'none'" in (await response.all_headers())["content-security-policy"]
        await page.get_by_label("Email").fill(world.email)
        await page.get_by_label("Password").fill(world.password)
        await page.get_by_role("button", name="Sign in").click()
        await page.wait_for_url("**/v1/oauth/authorize/resume**")

        heading = await page.locator("h1").inner_text()
        assert "Gradebook Sync" in heading and world.school.name in heading
        listed = await page.locator("ul.scopes li .scope-text").all_inner_texts()
        expected = ["openid", "profile", "courses:read", "students:read"]
        assert listed == [catalogue.CATALOGUE[s].description for s in expected]
        # The stylesheet loaded, from this origin, under the CSP.
        assert any(u.endswith("/static/connect.css") for u in stylesheets), stylesheets
        await page.screenshot(path=SCREENSHOT, full_page=True)

        await page.get_by_role("button", name="Allow").click()
        arrived = await asyncio.wait_for(arrivals.get(), timeout=15)
        assert arrived["state"] == "browser-state"
        assert arrived["iss"] == world.base
        assert arrived["code"].startswith("lcc_")
        await page.wait_for_url(redirect_uri + "?**")
        landed = parse_qs(urlsplit(page.url).query)
        assert landed["code"] == [arrived["code"]]
        assert not [e for e in console_errors if "Content Security Policy" in e], console_errors
        assert not [u for u in failed if "/static/" in u], failed
    finally:
        await context.close()
