"""Test helpers: free ports, real servers on real sockets, and resolvers for test names.

Python does not resolve `demo.localhost` the way curl and browsers do, so clients built here use
`LocalhostResolver`, which maps every `*.localhost` name to 127.0.0.1 and leaves the URL (and
so the Host header) exactly as a user's browser would send it. `ExampleResolver` gives the
documentation names tests subscribe webhooks to (`hooks.example.com`, the API document's
`hooks.partner.example`) a public address, as a partner's real host would have; the webhooks
service refuses names that do not resolve.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalhostResolver(AbstractResolver):
    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        local = host == "localhost" or host.endswith(".localhost")
        address = "127.0.0.1" if local else host
        return [
            {
                "hostname": host,
                "host": address,
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


class ExampleResolver(AbstractResolver):
    """The names RFC 2606 reserves for documentation (`example`, `example.com`, `.net`,
    `.org` and their subdomains) resolve to example.com's published IPv6 address (a public
    one: the SSRF checks let it pass); any other name asks the system. IPv6 only, so a sender
    bound to an IPv4 egress address finds nothing to connect to and sends nothing off this
    machine."""

    ADDRESS = "2606:2800:21f:cb07:6820:80da:af6b:8b2c"
    DOMAINS = ("example", "example.com", "example.net", "example.org")

    def __init__(self) -> None:
        self._system: ThreadedResolver | None = None

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        name = host.rstrip(".").lower()
        if not any(name == d or name.endswith("." + d) for d in self.DOMAINS):
            self._system = self._system or ThreadedResolver()
            return await self._system.resolve(host, port, family)
        if family not in (socket.AF_UNSPEC, socket.AF_INET6):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            {
                "hostname": host,
                "host": self.ADDRESS,
                "port": port,
                "family": socket.AF_INET6,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        return None


def client_session(**kwargs: Any) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(resolver=LocalhostResolver(), force_close=False)
    return aiohttp.ClientSession(connector=connector, **kwargs)


@asynccontextmanager
async def running(app: web.Application, port: int) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1:port for the block; yields the base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def wait_for_port(port: int, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            return
        except OSError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)
