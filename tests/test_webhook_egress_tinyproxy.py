"""Deliveries through a real tinyproxy with the configuration deploy/k8s ships
(deploy/k8s/base/tinyproxy.conf, the webhook egress proxy's): they reach the receiver through
it, unmarked, and the SSRF checks still judge the target before anything is sent.

https (production's only scheme) goes through CONNECT to the address the checks pinned, the
name carried in TLS (SNI) and in the Host inside the tunnel. Plain http (development) is sent
in absolute form to the pinned address, and a standard proxy then names that address in Host
(RFC 9112 3.2.2): fine for the receivers of development, not for a name-based virtual host."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from libs.common.config import load_settings
from services.webhooks import ssrf
from services.webhooks.delivery import attempt, egress
from tests.support import free_port, kill_process, running, wait_for_port

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("tinyproxy") is None, reason="no tinyproxy here")


@pytest.fixture
async def tinyproxy(tmp_path: Path) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """tinyproxy in the foreground with the shipped file, on a free loopback port."""
    port = free_port()
    shipped = (ROOT / "deploy" / "k8s" / "base" / "tinyproxy.conf").read_text()
    assert "Port 8888" in shipped and "Listen 0.0.0.0" in shipped
    conf = tmp_path / "tinyproxy.conf"
    conf.write_text(
        shipped.replace("Port 8888", f"Port {port}").replace("Listen 0.0.0.0", "Listen 127.0.0.1")
    )
    proc = await asyncio.create_subprocess_exec(
        "tinyproxy",
        "-d",
        "-c",
        str(conf),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_for_port(port)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        await kill_process(proc)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
    seen: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append({"headers": dict(request.headers), "body": await request.read()})
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hooks", hook)
    port = free_port()
    async with running(app, port):
        yield port, seen


async def test_deliveries_leave_through_tinyproxy_and_ssrf_still_applies(
    tinyproxy: tuple[str, asyncio.subprocess.Process],
    receiver: tuple[int, list[dict[str, Any]]],
    tmp_path: Path,
) -> None:
    proxy_url, proxy = tinyproxy
    port, seen = receiver
    settings = load_settings(
        {
            "CONNECT_ENV": "test",
            "CONNECT_DEV_SECRETS": str(tmp_path / "dev-secrets"),
            "WEBHOOK_EGRESS_PROXY": proxy_url,
        }
    )
    assert settings.webhooks.egress_proxy == proxy_url

    async def deliver(url: str, policy: ssrf.AddressPolicy) -> attempt.AttemptResult:
        resolver = egress.make_resolver(settings, policy)
        async with egress.make_session(settings, resolver) as session:
            return await attempt.post(
                session, url, b'{"event":"course.updated"}',
                {"content-type": "application/json"}, timeout=5, policy=policy,
                resolver=resolver, proxy=settings.webhooks.egress_proxy,
            )  # fmt: skip

    # Where loopback targets are allowed (a laptop): through the proxy to the pinned address
    # (which the proxy puts in Host), nothing added by the proxy (no Via, no X-Tinyproxy).
    relaxed = ssrf.AddressPolicy(allow_loopback=True)
    result = await deliver(f"http://localhost:{port}/hooks", relaxed)
    assert result.status == 204, result
    (got,) = seen
    assert got["body"] == b'{"event":"course.updated"}'
    assert got["headers"]["Host"] == f"127.0.0.1:{port}"
    assert not {"Via", "X-Tinyproxy"} & set(got["headers"])

    # Production's policy: a loopback target is refused before anything is sent, by name or
    # by address, though the proxy itself is on loopback.
    strict = ssrf.AddressPolicy(allow_loopback=False)
    for url in (f"http://localhost:{port}/hooks", f"http://127.0.0.1:{port}/hooks"):
        refused = await deliver(url, strict)
        assert refused.status is None, (url, refused)
        assert "loopback" in (refused.error or "") or "refused" in (refused.error or ""), refused
    assert len(seen) == 1

    # The path goes through the proxy: without it, the same delivery fails.
    await kill_process(proxy)
    result = await deliver(f"http://localhost:{port}/hooks", relaxed)
    assert result.status is None, result
    assert (result.error or "").startswith("connection failed"), result
    assert len(seen) == 1


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


async def test_https_deliveries_tunnel_to_the_pinned_address_with_the_name_in_tls(
    tinyproxy: tuple[str, asyncio.subprocess.Process], tmp_path: Path
) -> None:
    """An https delivery asks tinyproxy to CONNECT to the checked address, and the TLS
    handshake that arrives names the receiver (SNI). The receiver's certificate is one no
    store trusts, so the attempt ends there, as a certificate failure, not a sent request."""
    proxy_url, proxy = tinyproxy
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    names: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: names.append(name)  # type: ignore[assignment]

    async def tls(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await reader.read(1)
        writer.close()

    server = await asyncio.start_server(tls, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    settings = load_settings(
        {
            "CONNECT_ENV": "test",
            "CONNECT_DEV_SECRETS": str(tmp_path / "dev-secrets"),
            "WEBHOOK_EGRESS_PROXY": proxy_url,
        }
    )
    policy = ssrf.AddressPolicy(allow_loopback=True)
    resolver = egress.make_resolver(settings, policy)

    async def deliver() -> attempt.AttemptResult:
        async with egress.make_session(settings, resolver) as session:
            return await attempt.post(
                session, f"https://localhost:{port}/hooks", b"{}", {}, timeout=5,
                policy=policy, resolver=resolver, proxy=proxy_url,
            )  # fmt: skip

    try:
        result = await deliver()
        assert result.status is None, result
        assert "certificate" in (result.error or "").lower(), result
        assert names == ["localhost"]
        # Through the proxy, not around it: without it, nothing reaches the receiver.
        await kill_process(proxy)
        result = await deliver()
        assert (result.error or "").startswith("connection failed"), result
        assert names == ["localhost"]
    finally:
        server.close()
