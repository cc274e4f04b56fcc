"""The webhook SSRF guard against every spelling of an address the HTTP client folds.

yarl, which aiohttp parses URLs with, folds a host with IDNA/UTS 46 and NFKC before the
connector dials it: `127。0。0。1` is dialled as the literal 127.0.0.1. The guard must judge that
folded host, refuse at subscribe time a name that does not resolve, and at delivery judge the
address each connection is actually made to. Every target here is on 127.0.0.1 (or names no
reachable host at all); the policies under test forbid loopback, as production's does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as redis_asyncio
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from pytest_aiohttp import AiohttpClient, AiohttpServer

from libs.common import db, streams
from libs.common.config import load_settings
from services.webhooks import ssrf
from services.webhooks.delivery import egress
from services.webhooks.delivery.attempt import post
from tests.support import (
    ExampleResolver,
    base_url,
    connect,
    database_env,
    without_handler_cancellation,
)
from tests.test_webhooks import (
    Api,
    Caller,
    api_without_workers,
    eventually,
    new_school,
    publish,
    strict_api,
)

# The subscription API as production checks URLs: loopback refused (no workers).
__all__ = ["strict_api"]

pytestmark = pytest.mark.timeout(60)

STRICT = ssrf.AddressPolicy(allow_loopback=False)


class Receiver:
    """A real HTTP server on 127.0.0.1 that records every request it is sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append((request.method, request.path))
        return web.Response(text="internal secret")


@pytest.fixture
async def receiver(aiohttp_server: AiohttpServer) -> Receiver:
    found = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", found.handle)
    server = without_handler_cancellation(
        await aiohttp_server(app, access_log=None, shutdown_timeout=0.5)
    )
    assert server.port is not None
    found.port = server.port
    return found


@pytest.fixture
async def dev_api(
    webhooks_env: dict[str, str],
    migrated: None,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
) -> Api:
    """The subscription API as development checks URLs: loopback allowed (no workers)."""
    settings = load_settings(webhooks_env)
    assert settings.webhooks.allow_loopback
    return await api_without_workers(aiohttp_server, aiohttp_client, settings)


async def _subscribe(api: Api, url: str) -> tuple[int, Any]:
    return await api.call(
        "POST", "/api/v1/webhooks", Caller(new_school()), {"url": url, "event_types": ["course.*"]}
    )


# -------------------------------------------------------------------------------------------------
# Subscribe time: the folded host, judged; names that do not resolve, refused

REFUSED = [
    # The report: ideographic full stops and a segmented digit fold to 0.0.0.0.
    "http://0。0。0。🯰:9/x",
    "http://10。0。0。🯵/",
    # Full-width, ideographic and halfwidth dots.
    "http://127．0．0．1/",
    "http://127。0。0。1/",
    "http://127｡0｡0｡1/",
    "http://10．0．0．1/",
    # Digits NFKC folds to ASCII: full-width, circled, mathematical bold.
    "http://１２７.０.０.１/",
    "http://①②⑦.0.0.1/",
    "http://𝟏𝟐𝟕.𝟎.𝟎.𝟏/",
    "http://⑯⑨.②⑤④.⑯⑨.②⑤④/latest/meta-data/",
    "http://①⓪.0.0.1/",
    "http://１９２.１６８.０.１/",
    # Decimal, octal, hex and short IPv4.
    "http://2130706433/",
    "http://017700000001/",
    "http://0177.0.0.1/",
    "http://0x7f.0.0.1/",
    "http://0x7f000001/",
    "http://0x7f.1/",
    "http://127.0.0.0x1/",
    "http://127.1/",
    "http://127.0.1/",
    "http://0/",
    "http://0300.0250.0.1/",
    "http://２１３０７０６４３３/",
    # IPv4-mapped, -compatible, NAT64 and 6to4 IPv6.
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[0:0:0:0:0:ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[::127.0.0.1]/",
    "http://[64:ff9b::127.0.0.1]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[64:ff9b:1::a00:1]/",
    "http://[2002:7f00:1::]/",
    # The unspecified address, every way.
    "http://[::]/",
    "http://[::]:8080/",
    "http://[0:0::0]/",
    "http://0.0.0.0/",
    "http://0。0。0。0/",
    # Site-local IPv6 (fec0::/10, deprecated), item 5f.
    "http://[fec0::1]/",
    "http://[fefe::1]/",
    "http://[FEC0::ffff:1]/",
    # Trailing dots.
    "http://127.0.0.1./",
    "http://127。0。0。1。/",
    "http://localhost./",
    "http://localhost../",
    "http://sub.localhost./",
    # Mixed case and full-width letters.
    "http://LocalHost/",
    "http://LOCALHOST./",
    "http://ｌｏｃａｌｈｏｓｔ/",
    "http://Ｌｏｃａｌｈｏｓｔ:8080/",
    "HTTP://127.0.0.1/",
    # Percent-encoding and zone identifiers.
    "http://127%2e0%2e0%2e1/",
    "http://%31%32%37.0.0.1/",
    "http://%6c%6fcalhost/",
    "http://[::1%25lo]/",
    "http://[fe80::1%25eth0]/",
    "http://hooks.example.com%40127.0.0.1/",
    # Userinfo tricks.
    "http://hooks.example.com@127.0.0.1/",
    "http://127.0.0.1:80@hooks.example.com/",
    "http://@127.0.0.1/",
    "http://hooks.example.com\\@127.0.0.1/",
    "http://127.0.0.1\\@hooks.example.com/",
    "http://user@hooks.example.com/",
    "http://:@hooks.example.com/",
    # Ports, folded or out of range, on forbidden and allowed hosts.
    "http://127。0。0。1:８０８０/",
    "http://[::1]:80/",
    "http://hooks.example.com:0/",
    "http://hooks.example.com:65536/",
    "http://hooks.example.com:-1/",
    # Names that resolve nowhere (now, or ever).
    "https://no-such-host.invalid/",
    "https://0.0.0.xn--tb0i/",
    "http://[v1.hooks]/",
    "http://a<b>.example.com/",
]


@pytest.mark.parametrize("url", REFUSED)
async def test_every_spelling_of_a_forbidden_target_is_refused_at_subscribe_time(
    strict_api: Api, url: str
) -> None:
    status, body = await _subscribe(strict_api, url)
    assert status == 422, body
    assert (body["error"], body["field"]) == ("invalid_request", "url")


@pytest.mark.parametrize(
    "url",
    [
        "https://hooks.example.com/in",
        "https://HOOKS.Example.COM./in",
        # Folds to hooks.example.com, which resolves to a public address.
        "https://hooks．ｅｘａｍｐｌｅ。com/in",
        # An internationalised name: IDNA-encoded, then resolved.
        "https://bücher.example.com/in",
        "https://hooks.example.com:8443/in",
        "http://8.8.8.8/",
        "http://[2606:4700:4700::1111]:8080/",
    ],
)
async def test_public_targets_still_pass_however_spelled(strict_api: Api, url: str) -> None:
    status, body = await _subscribe(strict_api, url)
    assert status == 201, body
    assert body["url"] == url


async def test_development_allows_loopback_but_still_needs_names_to_resolve(
    dev_api: Api,
) -> None:
    for allowed in ("http://localhost:9/hooks", "http://127.0.0.1:9/", "http://127。0。0。1:9/"):
        status, body = await _subscribe(dev_api, allowed)
        assert status == 201, (allowed, body)
    for refused in (
        "http://no-such-host.invalid/",
        "http://0.0.0.xn--tb0i:9/x",
        "http://10。0。0。🯵/",
        "http://[fec0::1]/",
        "http://2130706433/",
    ):
        status, body = await _subscribe(dev_api, refused)
        assert (status, body["field"]) == (422, "url"), (refused, body)


async def test_a_changed_url_is_checked_the_same_way(strict_api: Api) -> None:
    caller = Caller(new_school())
    made = await strict_api.subscribe(caller, "https://hooks.example.com/")
    for url in ("http://127。0。0。1/", "http://[fec0::1]/", "https://no-such-host.invalid/"):
        status, body = await strict_api.call(
            "PATCH", f"/api/v1/webhooks/{made['id']}", caller, {"url": url}
        )
        assert (status, body["field"]) == (422, "url"), (url, body)


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("fec0::1", "site-local"),
        ("feff:ffff::1", "site-local"),
        ("::ffff:7f00:1", "loopback"),
        ("64:ff9b::a9fe:a9fe", "metadata"),
    ],
)
def test_address_policy_names_the_reason(address: str, reason: str) -> None:
    assert reason in (STRICT.problem(address) or "")


# -------------------------------------------------------------------------------------------------
# The folded host is the one aiohttp dials


class Recording(AbstractResolver):
    """Records every name aiohttp asks about, and resolves none."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        raise OSError(f"{host} not resolved here")

    async def close(self) -> None:
        return None


@pytest.mark.parametrize(
    "spelling",
    ["127。0。0。1", "１２７．０．０．１", "①②⑦.0.0.1", "𝟏𝟐𝟕.𝟎.𝟎.𝟏", "127｡0｡0｡1", "127.0.0.1"],
)
async def test_the_guard_reads_the_host_as_the_client_dials_it(
    receiver: Receiver, spelling: str
) -> None:
    """What `ssrf.target` calls a literal, a plain aiohttp client connects to without asking
    any resolver: so the literal, not the spelling, is what must be judged."""
    url = f"http://{spelling}:{receiver.port}/dialled"
    found = ssrf.target(url)
    assert found.address == ipaddress.ip_address("127.0.0.1")
    resolver = Recording()
    connector = aiohttp.TCPConnector(resolver=resolver)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(url, data=b"{}") as response,
    ):
        assert response.status == 200
    assert resolver.asked == []
    assert receiver.requests == [("POST", "/dialled")]


# -------------------------------------------------------------------------------------------------
# Delivery time: the connection's peer


def _settings(**extra: str) -> Any:
    return load_settings(
        {"CONNECT_ENV": "test", "KEY_ENCRYPTION_KEY": "A" * 43, "SECRET_PEPPER": "B" * 43, **extra}
    )


async def test_a_connection_to_a_forbidden_peer_carries_no_request(receiver: Receiver) -> None:
    """The session's connector judges the socket's peer however the request got there; here
    a request made on the session directly, past every check `attempt.post` makes first."""
    resolver = ssrf.GuardedResolver(STRICT)
    async with egress.make_session(_settings(), resolver) as session:
        for host in ("127.0.0.1", "127。0。0。1", "[::ffff:127.0.0.1]"):
            url = f"http://{host}:{receiver.port}/peer"
            with pytest.raises(aiohttp.ClientConnectorError) as caught:
                async with session.post(url, data=b"{}"):
                    pass
            assert isinstance(caught.value.os_error, ssrf.BlockedAddress), host
            assert "connected to a loopback address" in str(caught.value.os_error)
    assert receiver.requests == []


async def test_delivery_post_refuses_every_folded_spelling(receiver: Receiver) -> None:
    """`attempt.post` refuses before connecting: the folded literal, legacy forms the
    connector would refuse, names that resolve to loopback; nothing reaches the receiver."""
    resolver = ssrf.GuardedResolver(STRICT)
    port = receiver.port
    async with egress.make_session(_settings(), resolver) as session:
        for url in (
            f"http://127。0。0。1:{port}/x",
            f"http://①②⑦.0.0.1:{port}/x",
            f"http://[::ffff:127.0.0.1]:{port}/x",
            f"http://127.0.0.1.:{port}/x",
            f"http://2130706433:{port}/x",
            f"http://0x7f.1:{port}/x",
            f"http://localhost:{port}/x",
            f"http://LocalHost:{port}/x",
            f"http://ｌｏｃａｌｈｏｓｔ:{port}/x",
        ):
            result = await post(
                session, url, b"{}", {}, timeout=2, policy=STRICT, resolver=resolver
            )
            assert result.status is None, url
            assert "refused" in (result.error or ""), (url, result)
    # And without the session's own guard, the check before connecting holds alone.
    async with aiohttp.ClientSession() as plain:
        result = await post(
            plain, f"http://127。0。0。1:{port}/x", b"{}", {}, timeout=2, policy=STRICT,
            resolver=resolver,
        )  # fmt: skip
        assert "loopback" in (result.error or ""), result
    assert receiver.requests == []


class Proxy:
    """A forward proxy on 127.0.0.1 that records each request head and answers 200 itself."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            head = await reader.readuntil(b"\r\n\r\n")
            self.heads.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        writer.close()


@pytest.fixture
async def proxy() -> AsyncIterator[tuple[Proxy, int]]:
    found = Proxy()
    server = await asyncio.start_server(found.handle, "127.0.0.1", 0)
    try:
        yield found, server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def test_the_egress_proxy_is_exempt_and_the_target_is_still_pinned(
    proxy: tuple[Proxy, int], receiver: Receiver
) -> None:
    """Through WEBHOOK_EGRESS_PROXY the connection's peer is the proxy (here on loopback,
    which the policy forbids for targets): allowed. The target the proxy is handed is still
    a checked address, and a webhook naming the proxy's own host gets no exemption."""
    seen, port = proxy
    proxy_url = f"http://localhost:{port}"
    settings = _settings(WEBHOOK_EGRESS_PROXY=proxy_url)
    resolver = egress.make_resolver(settings, STRICT, ExampleResolver())
    async with egress.make_session(settings, resolver) as session:
        result = await post(
            session, "http://hooks.example.com/in", b"{}", {}, timeout=3, policy=STRICT,
            resolver=resolver, proxy=proxy_url,
        )  # fmt: skip
        assert result.status == 200, result
        (head,) = seen.heads
        assert head.startswith(f"POST http://[{ExampleResolver.ADDRESS}]/in HTTP/1.1".encode())
        assert b"Host: hooks.example.com\r\n" in head

        for url in (
            f"http://localhost:{receiver.port}/x",
            f"http://LOCALHOST:{port}/x",
            f"http://ｌｏｃａｌｈｏｓｔ:{receiver.port}/x",
            f"http://127。0。0。1:{receiver.port}/x",
        ):
            result = await post(
                session, url, b"{}", {}, timeout=3, policy=STRICT, resolver=resolver,
                proxy=proxy_url,
            )  # fmt: skip
            assert result.status is None, (url, result)
            assert "refused" in (result.error or ""), (url, result)
        # A name that resolves nowhere is a failed attempt, not an error out of post().
        result = await post(
            session, "http://no-such-host.invalid/x", b"{}", {}, timeout=3, policy=STRICT,
            resolver=resolver, proxy=proxy_url,
        )  # fmt: skip
        assert result.status is None
        assert (result.error or "").startswith("connection failed"), result
    assert len(seen.heads) == 1
    assert receiver.requests == []


# -------------------------------------------------------------------------------------------------
# End to end: a stored URL that folds to a forbidden address is never POSTed to


@pytest.fixture
async def strict_service(
    webhooks_env: dict[str, str],
    redis: redis_asyncio.Redis,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
) -> AsyncIterator[tuple[Api, Any]]:
    """A webhooks service with workers and production's policy (loopback forbidden), on a
    database and stream of its own, so the run's own (loopback-allowing) sender never takes
    its deliveries."""
    from services.webhooks.app import create_app

    env = {
        **webhooks_env,
        "WEBHOOK_ALLOW_LOOPBACK": "false",
        **database_env(webhooks_env, webhooks_env["DATABASE_URL"] + "_ssrf"),
        "REDIS_KEY_PREFIX": f"{webhooks_env['REDIS_KEY_PREFIX']}ssrf{secrets.token_hex(3)}:",
    }
    settings = load_settings(env)
    await db.migrate(settings.database_url)
    try:
        app = create_app(settings, resolver=ExampleResolver())
        server = await aiohttp_server(app, access_log=None, shutdown_timeout=2)
        # Stopped (with its workers) at the block's end, before its database goes.
        async with await aiohttp_client(without_handler_cancellation(server)) as client:
            yield Api(client.session, base_url(server), settings), settings
    finally:
        await db.drop_database(settings.database_url)
        await redis.delete(settings.stream(streams.EVENTS))


async def test_a_stored_url_that_folds_to_a_forbidden_address_is_never_posted_to(
    strict_service: tuple[Api, Any], receiver: Receiver, redis: redis_asyncio.Redis
) -> None:
    """Subscriptions stored before the guard read hosts as the client does (the row's URL is
    set directly, as such a row would hold it): each attempt is refused before a request,
    the receiver on 127.0.0.1 gets nothing, and the delivery log says why."""
    api, settings = strict_service
    port = receiver.port
    legacy = [
        f"http://127。0。0。1:{port}/hooks",
        f"http://①②⑦.0.0.1:{port}/hooks",
        f"http://１２７．０．０．１:{port}/hooks",
        f"http://ｌｏｃａｌｈｏｓｔ:{port}/hooks",
        f"http://127.0.0.1.:{port}/hooks",
    ]
    caller = Caller(new_school())
    made = []
    conn = await connect(settings.database_url)
    try:
        for url in legacy:
            hook = await api.subscribe(caller, "https://hooks.example.com/in")
            await conn.execute(
                "UPDATE webhooks.subscriptions SET url = $2 WHERE id = $1",
                uuid.UUID(hook["id"]),
                url,
            )
            made.append(hook["id"])
    finally:
        await conn.close()
    await publish(redis, settings, caller.school_id)

    attempts: dict[str, list[dict[str, Any]]] = {}

    async def every_delivery_dead() -> bool:
        for webhook_id in made:
            found = await api.deliveries(caller, webhook_id)
            if not found or found[0]["status"] != "dead":
                return False
            attempts[webhook_id] = found[0]["attempts"]
        return True

    # Three retries on this run's 0.2/0.4/0.8 s schedule, then the dead-letter list.
    await eventually(every_delivery_dead, timeout=10)
    for webhook_id, url in zip(made, legacy, strict=True):
        assert len(attempts[webhook_id]) == 4, url
        for attempt in attempts[webhook_id]:
            assert attempt["response_status"] is None, (url, attempt)
            assert attempt["response_excerpt"] is None, (url, attempt)
            assert "refused" in attempt["error"], (url, attempt)
    assert receiver.requests == []
