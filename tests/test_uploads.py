"""Uploads that land (issue 17 §1): announce, PUT the bytes to the signed URL, confirm, GET.

Real sockets throughout: identity and a gateway of this module in front of a school API of its
own (its object store a directory of this run), tokens from identity's token endpoint, the PUT
and GET with no token at all. The S3 backend runs against moto's S3 server on a free port,
a real S3 protocol server; the MCP tools through the MCP SDK client as tests/test_mcp.py does.
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import struct
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit
from uuid import uuid4

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from libs.common.config import ConfigError, Settings, load_settings
from services.school_api import upload_sweep, uploads
from services.school_api.app import create_app as school_api_app
from services.school_api.objectstore import open_store
from tests.support import free_port, running
from tests.test_gateway_support import World, extra_gateway, make_world, real_token

# test_mcp's fixtures: a gateway in front of the session's school API, a tenant, its tokens.
from tests.test_mcp import System, TenantToken, mcp_session, system, tenant, tenant_token  # noqa: F401

pytestmark = pytest.mark.timeout(90)


# Files ---------------------------------------------------------------------------------------


def png(size: int) -> bytes:
    head = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", 1, 1)
    return (head + secrets.token_bytes(size))[:size]


def jpeg(size: int) -> bytes:
    return (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + secrets.token_bytes(size))[:size]


def gif(size: int) -> bytes:
    return (b"GIF89a\x01\x00\x01\x00" + secrets.token_bytes(size))[:size]


def webp(size: int) -> bytes:
    return (b"RIFF" + struct.pack("<I", size - 8) + b"WEBPVP8 " + secrets.token_bytes(size))[:size]


MAKERS = {"image/png": png, "image/jpeg": jpeg, "image/gif": gif, "image/webp": webp}
SVG = (
    b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(document.domain)">'
    b"<script>alert(1)</script></svg>"
)
HTML = b"<!doctype html><html><body><script>alert(document.cookie)</script></body></html>"


# The system ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    gateway: str  # this module's gateway, http://127.0.0.1:port
    api: str  # its school API, directly
    settings: Settings
    world: World
    token: str

    @property
    def platform_host(self) -> str:
        return urlsplit(self.settings.urls.platform_url).netloc

    def public(self, url: str) -> str:
        """`url` (on the platform origin) as sent to this module's gateway."""
        parts = urlsplit(url)
        assert parts.netloc == self.platform_host, url
        return self.gateway + parts.path + (f"?{parts.query}" if parts.query else "")

    @property
    def api_headers(self) -> dict[str, str]:
        return {"Host": self.world.host, "Authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="module")
async def edge(
    gateway_env: dict[str, str],
    gateway_port: int,
    gateway_identity_url: str,
    pool: asyncpg.Pool,
) -> AsyncIterator[Edge]:
    # The sweep runs often here; it takes only uploads pending 15 minutes past their expiry,
    # which only test_expired_uploads_are_swept makes.
    settings = load_settings({**gateway_env, "UPLOAD_SWEEP_INTERVAL": "0.2"})
    async with (
        running(school_api_app(settings, relay=False), free_port()) as api,
        extra_gateway(gateway_env, SCHOOL_API_URL=api) as gateway,
        aiohttp.ClientSession() as http,
    ):
        world = await make_world(
            pool, settings, "upl", gateway_port, scopes=("storage:write", "courses:read")
        )
        token = (await real_token(http, gateway, world, scope="storage:write"))["access_token"]
        yield Edge(gateway, api, settings, world, token)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def announce(
    http: aiohttp.ClientSession,
    edge: Edge,
    content_type: str = "image/png",
    size: int = 4096,
    filename: str = "cover art.png",
) -> dict[str, Any]:
    async with http.post(
        edge.gateway + "/api/v1/uploads",
        json={"filename": filename, "content_type": content_type, "size_bytes": size},
        headers=edge.api_headers,
    ) as resp:
        body: dict[str, Any] = await resp.json()
        assert resp.status == 201, body
        return body


async def put(
    http: aiohttp.ClientSession, edge: Edge, url: str, data: Any, **headers: str
) -> tuple[int, Any]:
    async with http.put(
        edge.public(url), data=data, headers={"Host": edge.platform_host, **headers}
    ) as resp:
        text = await resp.read()
        return resp.status, (await resp.json() if text else None)


async def confirm(http: aiohttp.ClientSession, edge: Edge, upload_id: str) -> tuple[int, Any]:
    async with http.post(
        f"{edge.gateway}/api/v1/uploads/{upload_id}/confirm", headers=edge.api_headers
    ) as resp:
        return resp.status, await resp.json()


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return parts._replace(query=urlencode(query)).geturl()


# The round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("content_type", sorted(MAKERS))
async def test_announce_put_confirm_get_round_trip(
    edge: Edge, http: aiohttp.ClientSession, content_type: str
) -> None:
    size = 150_000  # past one 64 KiB chunk
    upload = await announce(http, edge, content_type, size, "Cover art (final).img")
    data = MAKERS[content_type](size)

    # A confirm before the bytes is refused, in the API's error shape.
    status, body = await confirm(http, edge, upload["id"])
    assert (status, body["error"]) == (409, "upload_incomplete")

    # The signature is the credential: no bearer token on the PUT (and a token is not one).
    status, _ = await put(http, edge, upload["upload_url"], data)
    assert status == 201

    status, body = await confirm(http, edge, upload["id"])
    assert (status, body["status"]) == (200, "confirmed"), body
    assert body["url"] == upload["url"]

    async with http.get(edge.public(upload["url"]), headers={"Host": edge.platform_host}) as resp:
        assert resp.status == 200
        assert await resp.read() == data
        assert resp.headers["Content-Type"] == content_type
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert "immutable" in resp.headers["Cache-Control"]
        assert "sandbox" in resp.headers["Content-Security-Policy"]
        etag = resp.headers["ETag"]
    async with http.get(
        edge.public(upload["url"]), headers={"Host": edge.platform_host, "If-None-Match": etag}
    ) as resp:
        assert resp.status == 304
    async with http.head(edge.public(upload["url"]), headers={"Host": edge.platform_host}) as resp:
        assert (resp.status, resp.headers["Content-Length"]) == (200, str(size))

    # Written once: the same URL cannot replace the bytes.
    status, body = await put(http, edge, upload["upload_url"], MAKERS[content_type](size))
    assert (status, body["error"]) == (409, "already_stored")
    # ... and says so before reading a body for it.
    parts = urlsplit(upload["upload_url"])
    sent, head, closed = await _send_until_answered(
        edge.api, edge.platform_host, f"{parts.path}?{parts.query}", 64 * 1024, 64 << 20
    )
    assert head == b"" or (head.startswith(b"HTTP/1.1 409") and b"already_stored" in head), head
    assert sent < 32 << 20 and closed
    # Another name under the same upload id is no file.
    other = upload["url"].rsplit("/", 1)[0] + "/other.png"
    async with http.get(edge.public(other), headers={"Host": edge.platform_host}) as resp:
        assert resp.status == 404


async def test_a_name_that_would_not_stay_one_path_segment_is_refused(
    edge: Edge, http: aiohttp.ClientSession
) -> None:
    for name in ("../escape.png", "a/b.png", "..", "tab\there.png"):
        async with http.post(
            edge.gateway + "/api/v1/uploads",
            json={"filename": name, "content_type": "image/png", "size_bytes": 10},
            headers=edge.api_headers,
        ) as resp:
            assert resp.status == 422, name
            assert (await resp.json())["fields"] == {"filename": "invalid"}


# Signatures ----------------------------------------------------------------------------------


async def test_forged_expired_or_altered_upload_urls_are_refused(
    edge: Edge, http: aiohttp.ClientSession
) -> None:
    size = 2048
    upload = await announce(http, edge, "image/png", size)
    url = upload["upload_url"]
    data = png(size)
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    forged = query["signature"][:-1] + ("0" if query["signature"][-1] != "0" else "1")
    path = urlsplit(url).path
    school, upload_id, name = path.split("/")[3:]
    # Signed by the school API's key, but expired a second ago.
    expired = uploads.urls_for(
        edge.settings,
        int(school),
        upload["id"],
        "cover art.png",
        "image/png",
        size,
        datetime.now(UTC) - uploads.UPLOAD_URL_TTL - timedelta(seconds=1),
    ).upload_url
    # A key that is not the school API's.
    other = load_settings(
        {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SECRET", "KEY_"))},
            "CONNECT_ENV": "test",
            "SECRET_PEPPER": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
            "KEY_ENCRYPTION_KEY": base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
            "PLATFORM_URL": edge.settings.urls.platform_url,
        }
    )
    foreign = uploads.urls_for(
        other, int(school), upload["id"], "cover art.png", "image/png", size, datetime.now(UTC)
    ).upload_url
    cases = {
        "forged signature": (with_query(url, signature=forged), 403, "invalid_signature"),
        "no signature": (url.split("&signature=")[0], 403, "invalid_signature"),
        "expired": (expired, 403, "upload_url_expired"),
        "another key": (foreign, 403, "invalid_signature"),
        "wrong upload id": (url.replace(upload_id, str(uuid4())), 403, "invalid_signature"),
        "other school": (url.replace(f"/{school}/", f"/{int(school) + 1}/"), 403, None),
        "other name": (url.replace(f"/{name}?", "/evil.html?"), 403, "invalid_signature"),
        "tampered size": (with_query(url, size=str(size * 2)), 403, "invalid_signature"),
        "tampered type": (with_query(url, type="image/gif"), 403, "invalid_signature"),
        "later expiry": (
            with_query(url, expires=str(int(query["expires"]) + 3600)),
            403,
            "invalid_signature",
        ),
    }
    for case, (bad, status, error) in cases.items():
        got, body = await put(http, edge, bad, data)
        assert got == status, (case, got, body)
        if error:
            assert body["error"] == error, case
    status, body = await confirm(http, edge, upload["id"])
    assert (status, body["error"]) == (409, "upload_incomplete")
    # The genuine URL still works after all that.
    assert (await put(http, edge, url, data))[0] == 201


# Contents ------------------------------------------------------------------------------------


async def test_bytes_of_another_type_or_size_are_refused(
    edge: Edge, http: aiohttp.ClientSession
) -> None:
    # SVG cannot even be announced.
    async with http.post(
        edge.gateway + "/api/v1/uploads",
        json={"filename": "logo.svg", "content_type": "image/svg+xml", "size_bytes": len(SVG)},
        headers=edge.api_headers,
    ) as resp:
        assert resp.status == 422
    polyglot = png(64) + HTML
    cases = {
        # (announced type, announced size, bytes sent) -> (status, error)
        "svg as png": ("image/png", len(SVG), SVG, 415, "unsupported_media_type"),
        "html as png": ("image/png", len(HTML), HTML, 415, "unsupported_media_type"),
        "jpeg as png": ("image/png", 5000, jpeg(5000), 415, "unsupported_media_type"),
        "png as webp": ("image/webp", 5000, png(5000), 415, "unsupported_media_type"),
        "gif as jpeg": ("image/jpeg", 5000, gif(5000), 415, "unsupported_media_type"),
        "polyglot, longer": ("image/png", 64, polyglot, 413, "payload_too_large"),
        "polyglot, shorter": ("image/png", len(polyglot) + 1000, polyglot, 400, "size_mismatch"),
        "empty body": ("image/png", 100, b"", 400, "size_mismatch"),
    }
    for case, (content_type, size, data, status, error) in cases.items():
        upload = await announce(http, edge, content_type, size)
        got, body = await put(http, edge, upload["upload_url"], data)
        assert (got, body["error"]) == (status, error), case
        assert (await confirm(http, edge, upload["id"]))[0] == 409, case
        async with http.get(
            edge.public(upload["url"]), headers={"Host": edge.platform_host}
        ) as resp:
            assert resp.status == 404, case


async def _send_until_answered(
    base: str, host: str, path: str, chunk: int, offered: int
) -> tuple[int, bytes, bool]:
    """PUT with chunked encoding on a raw socket, a chunk at a time, until the server answers
    or `offered` bytes went; (bytes sent, the answer's first bytes, whether the server then
    closed the connection)."""
    parts = urlsplit(base)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(
        f"PUT {path} HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n"
        "Content-Type: image/png\r\n\r\n".encode()
    )
    answer = asyncio.create_task(reader.read(4096))
    body = png(chunk)
    sent = 0
    try:
        while sent < offered and not answer.done():
            writer.write(f"{len(body):x}\r\n".encode() + body + b"\r\n")
            await writer.drain()
            sent += len(body)
            await asyncio.sleep(0)
    except ConnectionError:
        pass  # the server closed: what it answered is read below
    try:
        head = await asyncio.wait_for(answer, timeout=30)
    except ConnectionResetError:
        # The server answered and closed with our bytes unread: its RST can reach us before
        # we read the answer, which the kernel then drops (the edge closes at once rather than
        # lingering; README "Uploads"). It still stopped reading: `sent` says how early.
        head = b""
    try:
        await asyncio.wait_for(reader.read(), timeout=10)
        closed = True
    except ConnectionError:
        closed = True  # a reset: the server closed with our unread bytes in its buffer
    except TimeoutError:
        closed = False  # still open, so still reading what we send
    writer.close()
    return sent, head, closed


@pytest.mark.parametrize("via", ["gateway", "school API"])
async def test_more_than_announced_is_stopped_mid_stream(
    edge: Edge, http: aiohttp.ClientSession, via: str
) -> None:
    announced = 64 * 1024
    offered = 256 * 1024 * 1024  # what a server reading to the end would take in
    upload = await announce(http, edge, "image/png", announced)
    parts = urlsplit(upload["upload_url"])
    base = edge.gateway if via == "gateway" else edge.api
    sent, head, closed = await _send_until_answered(
        base, edge.platform_host, f"{parts.path}?{parts.query}", 64 * 1024, offered
    )
    # The answer, unless the edge's close reset the connection before we read it; through
    # the gateway, an upstream that answers and closes before the body ends comes back as a
    # 502 while the gateway is still sending (relaying its early answer is still to do:
    # README "Uploads"). Either way nothing past the limit was taken, and nothing stored.
    too_large = head.startswith(b"HTTP/1.1 413") and b"payload_too_large" in head
    early_close = via == "gateway" and head.startswith(b"HTTP/1.1 502")
    assert head == b"" or too_large or early_close, head
    # Answered while the client was still sending, long before the end, and the connection
    # closed rather than read to the end. (What was sent past the limit sits in socket buffers.)
    assert sent < offered // 8, sent
    assert closed
    assert (await confirm(http, edge, upload["id"]))[0] == 409


async def test_the_gateway_limits_a_public_body_as_it_streams(
    gateway_env: dict[str, str], http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    received: list[int] = []

    async def count(request: web.Request) -> web.Response:
        total = 0
        try:
            async for chunk in request.content.iter_chunked(65536):
                total += len(chunk)
        finally:
            received.append(total)
        return web.json_response({"received": total})

    upstream = web.Application()
    upstream.router.add_put("/storage/{tail:.*}", count)
    limit = 100_000
    async with running(upstream, free_port()) as counter:
        routes = tmp_path / "routes.toml"
        routes.write_text(
            f'[upstreams]\ncounter = "{counter}"\n\n'
            f'[[public]]\nprefix = "/storage/"\nupstream = "counter"\nmax_body = {limit}\n'
        )
        async with extra_gateway(gateway_env, routes_file=str(routes)) as gateway:
            host = urlsplit(gateway_env["PLATFORM_URL"]).netloc
            # Within the limit: passed through whole.
            async with http.put(
                gateway + "/storage/x", data=b"a" * limit, headers={"Host": host}
            ) as resp:
                assert (resp.status, await resp.json()) == (200, {"received": limit})
            # A Content-Length past it: refused before anything goes upstream.
            before = len(received)
            async with http.put(
                gateway + "/storage/x", data=b"a" * (limit + 1), headers={"Host": host}
            ) as resp:
                assert resp.status == 413
            assert len(received) == before
            # Chunked, past it: stopped as it streams; the upstream got no more than the limit.
            sent, head, closed = await _send_until_answered(
                gateway, host, "/storage/x", 16 * 1024, 256 * 1024 * 1024
            )
            assert head.startswith(b"HTTP/1.1 413"), head[:200]
            assert sent < 32 * 1024 * 1024 and closed
            await asyncio.sleep(0.2)
            assert received[-1] <= limit


# The sweep -----------------------------------------------------------------------------------


async def test_expired_uploads_are_swept(
    edge: Edge, http: aiohttp.ClientSession, pool: asyncpg.Pool
) -> None:
    never_put = await announce(http, edge, "image/png", 100)
    put_only = await announce(http, edge, "image/png", 100)
    done = await announce(http, edge, "image/png", 100)
    late = await announce(http, edge, "image/png", 100)
    for upload in (put_only, done, late):
        assert (await put(http, edge, upload["upload_url"], png(100)))[0] == 201
    assert (await confirm(http, edge, done["id"]))[0] == 200
    objects = open_store(edge.settings)
    # Bytes PUT just before the URL expired may still be confirmed within the grace.
    await pool.execute(
        "UPDATE school_api.uploads SET expires_at = now() - interval '1 minute' WHERE id = $1",
        late["id"],
    )
    assert (await confirm(http, edge, late["id"]))[0] == 200
    # Past the grace, the module's school API's supervised sweep (every 0.2 s) takes them.
    swept = [never_put["id"], put_only["id"], done["id"]]
    await pool.execute(
        "UPDATE school_api.uploads SET expires_at = now() - interval '1 hour'"
        " WHERE id = ANY($1::uuid[])",
        swept,
    )
    for _ in range(100):
        rows = await pool.fetch(
            "SELECT id::text, status FROM school_api.uploads WHERE id = ANY($1::uuid[])", swept
        )
        statuses = {row["id"]: row["status"] for row in rows}
        if statuses[put_only["id"]] == "expired" and statuses[never_put["id"]] == "expired":
            break
        await asyncio.sleep(0.1)
    assert statuses == {
        never_put["id"]: "expired",
        put_only["id"]: "expired",
        done["id"]: "confirmed",
    }
    school = edge.world.school.id
    assert not await objects.exists(uploads.object_key(school, put_only["id"]))
    assert await objects.exists(uploads.object_key(school, done["id"]))
    for upload in (never_put, put_only):
        status, body = await confirm(http, edge, upload["id"])
        assert (status, body["error"]) == (409, "upload_expired")
    # Nothing left to sweep: a pass changes nothing.
    assert await upload_sweep.sweep_once(pool, objects) == 0
    await objects.close()


# Configuration -------------------------------------------------------------------------------


def test_storage_url_is_validated_at_start(gateway_env: dict[str, str]) -> None:
    for bad in ("ftp://bucket", "file://relative/dir", "s3://Bad_Bucket", "s3://b?x=1"):
        with pytest.raises(ConfigError) as caught:
            load_settings({**gateway_env, "STORAGE_URL": bad})
        assert caught.value.variable == "STORAGE_URL", bad
    with pytest.raises(ConfigError) as caught:
        load_settings({**gateway_env, "STORAGE_URL": "s3://bucket?endpoint=ftp://x"})
    assert caught.value.variable == "STORAGE_URL"
    production = {
        "CONNECT_ENV": "production",
        "PUBLIC_URL_TEMPLATE": "https://{school}.example.com",
        "PLATFORM_URL": "https://example.com",
        "SECRET_PEPPER": gateway_env["SECRET_PEPPER"],
        "INTERNAL_TOKEN": secrets.token_urlsafe(32),
    }
    settings = load_settings(production, needs=frozenset({"SECRET_PEPPER", "INTERNAL_TOKEN"}))
    with pytest.raises(ConfigError) as caught:
        school_api_app(settings)
    assert caught.value.variable == "STORAGE_URL"


# The stores ----------------------------------------------------------------------------------


async def _store_contract(store: Any) -> None:
    """put/get/exists/delete as every backend keeps them; each key written once."""
    key = f"42/{uuid4()}"
    data = png(300_000)
    try:
        assert not await store.exists(key)
        assert await store.get(key) is None
        with tempfile.TemporaryFile() as body:
            body.write(data)
            body.seek(0)
            assert await store.put(
                key, body, size=len(data), content_type="image/png", name="été.png"
            )
            body.seek(0)
            # Written once: a second put of the key leaves the first as it was.
            assert not await store.put(
                key, body, size=len(data), content_type="image/jpeg", name="x"
            )
        assert await store.exists(key)
        found = await store.get(key)
        assert found is not None
        assert (found.content_type, found.size, found.name) == ("image/png", len(data), "été.png")
        assert b"".join([chunk async for chunk in found.chunks]) == data
        await store.delete(key)
        assert not await store.exists(key)
        await store.delete(key)  # deleting what is gone is no error
        with pytest.raises(ValueError):
            await store.exists("../../etc/passwd")
    finally:
        await store.close()


async def test_the_local_store_keeps_its_contract(
    gateway_env: dict[str, str], tmp_path: Path
) -> None:
    await _store_contract(
        open_store(load_settings({**gateway_env, "STORAGE_URL": tmp_path.as_uri()}))
    )


# S3 ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_s3() -> Any:
    """moto's S3 server (its Werkzeug server, on a free port in a thread of its own)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    # moto takes any credentials; the SDK needs some to sign with.
    os.environ["AWS_ACCESS_KEY_ID"] = "testing"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


async def test_the_s3_store_round_trips_against_a_real_s3_server(
    moto_s3: str, gateway_env: dict[str, str], http: aiohttp.ClientSession, migrated: None
) -> None:
    from aiobotocore.session import get_session

    bucket = f"uploads-{secrets.token_hex(4)}"
    async with get_session().create_client(
        "s3", endpoint_url=moto_s3, region_name="us-east-1"
    ) as s3:
        await s3.create_bucket(Bucket=bucket)
    env = {
        **gateway_env,
        "STORAGE_URL": f"s3://{bucket}/connect?endpoint={moto_s3}&region=us-east-1",
    }
    settings = load_settings(env)
    await _store_contract(open_store(settings))

    # And the storage edge on it: PUT to the signed URL, GET the same bytes.
    async with running(school_api_app(settings, relay=False, sweep=False), free_port()) as api:
        school, upload_id, size = 7, uuid4(), 5000
        urls = uploads.urls_for(
            settings, school, upload_id, "a.gif", "image/gif", size, datetime.now(UTC)
        )
        data = gif(size)
        put_url = api + urlsplit(urls.upload_url).path + "?" + urlsplit(urls.upload_url).query
        async with http.put(put_url, data=data) as resp:
            assert resp.status == 201, await resp.text()
        async with http.get(api + urlsplit(urls.url).path) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "image/gif"
            assert await resp.read() == data
        async with get_session().create_client(
            "s3", endpoint_url=moto_s3, region_name="us-east-1"
        ) as s3:
            head = await s3.head_object(Bucket=bucket, Key=f"connect/{school}/{upload_id}")
            assert head["ContentLength"] == size


# MCP -----------------------------------------------------------------------------------------


async def test_the_mcp_tools_upload_an_image(
    system: System,  # noqa: F811
    tenant_token: TenantToken,  # noqa: F811
    http: aiohttp.ClientSession,
) -> None:
    issued = await tenant_token(scopes=("openid", "storage:write"))
    data = jpeg(20_000)
    async with mcp_session(system, issued.access_token) as session:
        started = await session.call_tool(
            "upload_image",
            {"filename": "photo.jpg", "content_type": "image/jpeg", "size_bytes": len(data)},
        )
        assert started.is_error is False, started
        upload = started.structured_content
        assert upload is not None

        early = await session.call_tool("confirm_upload", {"id": upload["id"]})
        assert early.is_error is True
        assert "upload_incomplete" in str(early.content)

        parts = urlsplit(upload["upload_url"])
        async with http.put(
            f"{system.gateway}{parts.path}?{parts.query}",
            data=data,
            headers={"Host": system.platform_host},
        ) as resp:
            assert resp.status == 201, await resp.text()

        done = await session.call_tool("confirm_upload", {"id": upload["id"]})
        assert done.is_error is False, done
        assert done.structured_content is not None
        assert done.structured_content["status"] == "confirmed"
    async with http.get(
        system.gateway + urlsplit(upload["url"]).path, headers={"Host": system.platform_host}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "image/jpeg"
        assert await resp.read() == data


def test_urls_signed_before_a_pepper_rotation_stay_good(gateway_env: dict[str, str]) -> None:
    old, new = (base64.urlsafe_b64encode(secrets.token_bytes(32)).decode() for _ in range(2))
    before = load_settings({**gateway_env, "SECRET_PEPPER": old})
    during = load_settings({**gateway_env, "SECRET_PEPPER": new, "SECRET_PEPPER_PREVIOUS": old})
    after = load_settings({**gateway_env, "SECRET_PEPPER": new})
    upload_id = uuid4()
    urls = uploads.urls_for(before, 9, upload_id, "a b.png", "image/png", 10, datetime.now(UTC))
    query = {k: v[0] for k, v in parse_qs(urlsplit(urls.upload_url).query).items()}
    path = f"{uploads.UPLOADS_PATH}/9/{upload_id}/a b.png"  # as the edge sees it, decoded

    def check(settings: Settings) -> uploads.Grant:
        return uploads.check(
            settings, path, "9", str(upload_id), "a b.png", query, datetime.now(UTC).timestamp()
        )

    assert check(before).key == f"9/{upload_id}"
    assert (check(during).size, check(during).content_type) == (10, "image/png")
    with pytest.raises(uploads.Refused):
        check(after)
